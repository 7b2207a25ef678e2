"""How close `tunesmith plan` comes to the real peak memory of training on this CPU.

For each case, in one invocation: `tunesmith plan CONFIG --json` gives the estimate, then a fresh process runs a
short real training run of the default model on sequences that fill `data.max_length`, and reports its peak
resident set size (getrusage). Prints estimate vs measured and the error; the target is within +-25%.

    flock /tmp/tunesmith-bench.lock .venv/bin/python bench/plan_accuracy.py
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

CASES = [  # (mode, batch size, sequence length)
    ("lora", 4, 256),
    ("lora", 8, 256),
    ("lora", 4, 512),
    ("full", 4, 256),
    ("full", 8, 256),
]
TARGET = 0.25
WORDS = "order lamp mug blue red city send ship quantity color please thanks deliver box paper window river".split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per measured run")
    parser.add_argument("--child", nargs=2, metavar=("RUN_DIR", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(Path(args.child[0]), args.child[1])
    rows = []
    with tempfile.TemporaryDirectory(prefix="plan-accuracy-") as work:
        data = _write_long_examples(Path(work) / "long.jsonl")
        for mode, batch, seq_len in CASES:
            config = _write_config(Path(work), data, mode, batch, seq_len, args.steps)
            estimate = _estimate(config, mode)
            measured = _measure(config, mode)
            error = (estimate - measured) / measured
            rows.append((mode, batch, seq_len, estimate, measured, error))
            print(f"{mode:5} batch {batch:2} seq {seq_len:4}: estimate {estimate / 2**30:6.2f} GiB  measured peak RSS "
                  f"{measured / 2**30:6.2f} GiB  error {error:+6.1%}", flush=True)
    worst = max(abs(r[-1]) for r in rows)
    print(f"\nworst error {worst:.1%} (target within {TARGET:.0%}): {'MET' if worst <= TARGET else 'NOT MET'}")


def _write_long_examples(path: Path, count: int = 48) -> Path:
    """Chat examples whose answers are longer than any case's max_length, so every sequence is truncated to it."""
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as handle:
        for n in range(count):
            answer = " ".join(rng.choice(WORDS) for _ in range(700))
            row = {"messages": [{"role": "user", "content": f"Write order notes {n}."},
                                {"role": "assistant", "content": answer}]}
            handle.write(json.dumps(row) + "\n")
    return path


def _write_config(work: Path, data: Path, mode: str, batch: int, seq_len: int, steps: int) -> Path:
    name = f"{mode}-b{batch}-s{seq_len}"
    config = {"name": name, "base_model": "default", "output_dir": str(work / "runs"),
              "data": {"train": str(data), "validation_fraction": 0.1, "max_length": seq_len},
              "train": {"adapter": mode, "batch_size": batch, "max_steps": steps, "logging_steps": 1}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _estimate(config: Path, mode: str) -> int:
    out = subprocess.run([sys.executable, "-m", "tunesmith", "plan", str(config), "--device", "cpu", "--json"],
                         check=True, capture_output=True, text=True).stdout
    plans = {plan["mode"]: plan for plan in json.loads(out)["plans"]}
    return plans[mode]["total_bytes"]


def _measure(config: Path, mode: str) -> int:
    prepare = [sys.executable, "-m", "tunesmith", "prepare", str(config), "--overwrite"]
    subprocess.run(prepare, check=True, capture_output=True)
    run_dir = Path(yaml.safe_load(config.read_text())["output_dir"]) / config.stem
    result = subprocess.run([sys.executable, __file__, "--child", str(run_dir), mode], check=True,
                            capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_bytes"]


def _child(run_dir: Path, mode: str) -> None:
    """Train in this fresh process with tunesmith's SFT (`train.adapter=MODE`) and print its peak resident set size."""
    from tunesmith.config import load_run_config
    from tunesmith.train.sft import train_sft

    train_sft(run_dir, load_run_config(run_dir, [f"train.adapter={mode}"]))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"peak_rss_bytes": peak_kib * 1024}))


if __name__ == "__main__":
    main()
