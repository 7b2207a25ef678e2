"""Data stage at scale: a synthetic chat dataset (default 1,000,000 rows, ~200 tokens each, 5% exact and 5% near
duplicates) through validate + clean + dedup + split + token stats + card (`tunesmith data prepare`).

Prints wall time, peak RSS of the whole process tree (main + workers, sampled with psutil), duplicate recall,
and the ratio against a baseline measured in the same invocation: reading and JSON-parsing every row, nothing else.
Targets: <= 600 s, <= 4 GiB, recall >= 0.95. Run it under the shared lock:

    flock /tmp/tunesmith-bench.lock .venv/bin/python bench/data_million.py --rows 1000000
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

GENERATOR_VERSION = "v2"  # v2: ~200-token rows
WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "po", "ru", "si", "ta", "vo", "ze", "bra", "cle", "dri", "fro")
         for b in ("n", "r", "s", "t", "l", "m", "x", "ng", "st", "rd", "mp", "nk", "ll", "ss", "th")]
WORDS = [w + s for w in WORDS for s in ("", "a", "o", "er", "ing", "ed", "ly", "ish", "ful", "ion")]


def generate(path: Path, rows: int, seed: int = 0) -> tuple[list[tuple[int, int]], int]:
    """Write the dataset; returns (copy line, original line) for every injected duplicate."""
    rng = random.Random(seed)
    truth, originals = [], []
    with path.open("w", encoding="utf-8") as out:
        for line in range(1, rows + 1):
            draw = rng.random()
            if originals and draw < 0.05:  # exact duplicate, up to case and whitespace
                source_line, record = rng.choice(originals)
                user, answer = record
                user = "  " + user.upper() if rng.random() < 0.5 else user
                truth.append((line, source_line))
            elif originals and draw < 0.10:  # near duplicate: 2 of the answer's 56 words changed
                source_line, (user, answer) = rng.choice(originals)
                words = answer.split()
                for _ in range(2):
                    words[rng.randrange(len(words))] = rng.choice(WORDS)
                answer = " ".join(words)
                truth.append((line, source_line))
            else:
                # 14 + 56 words: ~198 tokens a row with SmolLM2's tokenizer and chat template (measured).
                user = " ".join(rng.choices(WORDS, k=14)) + "?"
                answer = " ".join(rng.choices(WORDS, k=56)) + "."
                if len(originals) < 200_000:
                    originals.append((line, (user, answer)))
            out.write(json.dumps({"messages": [{"role": "user", "content": user},
                                               {"role": "assistant", "content": answer}]}) + "\n")
    return truth, rows


def baseline(path: Path) -> float:
    started = time.perf_counter()
    with path.open("rb") as handle:
        for line in handle:
            json.loads(line)
    return time.perf_counter() - started


def run_prepare(config: Path, out_dir: Path, overrides: list[str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS of the process tree in GiB, exit code."""
    started = time.perf_counter()
    process = subprocess.Popen([str(Path(sys.executable).parent / "tunesmith"), "data", "prepare", str(config),
                                f"output_dir={out_dir}", *overrides, "--overwrite"])
    peak, parent = 0, psutil.Process(process.pid)
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            try:
                procs = [parent] + parent.children(recursive=True)
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    code = process.wait()
    done.set()
    thread.join()
    return time.perf_counter() - started, peak / 2**30, code


def recall(run_dir: Path, data_file: Path, truth: list[tuple[int, int]]) -> tuple[float, int]:
    """Share of injected duplicate pairs that ended in one cluster; and dropped rows that were not injected copies."""
    parent = {}
    with (run_dir / "data" / "dropped.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if row["reason"] in ("exact_duplicate", "near_duplicate", "leakage"):
                twin = row["message"].rsplit(":", 1)[-1]
                parent[row["line"]] = int(twin) if twin.isdigit() else row["line"]

    def root(line: int) -> int:
        seen = set()
        while line in parent and parent[line] != line and line not in seen:
            seen.add(line)
            line = parent[line]
        return line

    found = sum(root(copy) == root(original) for copy, original in truth)
    injected = {copy for copy, _ in truth} | {original for _, original in truth}
    false_drops = sum(1 for line in parent if line not in injected)
    return found / max(len(truth), 1), false_drops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tunesmith-bench-data"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for `tunesmith data prepare`, e.g. data.minhash_permutations=128")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    data_file = args.workdir / f"chat-{args.rows}-{GENERATOR_VERSION}.jsonl"  # cached; a new generator, a new file
    truth_file = data_file.with_suffix(".truth.json")
    if not truth_file.exists():
        started = time.perf_counter()
        truth, _ = generate(data_file, args.rows)
        truth_file.write_text(json.dumps(truth))
        print(f"generated {args.rows:,} rows ({data_file.stat().st_size / 2**20:,.0f} MiB) in {time.perf_counter() - started:.0f} s")
    truth = [tuple(pair) for pair in json.loads(truth_file.read_text())]
    config = args.workdir / "config.yaml"
    config.write_text(f"name: million\nbase_model: default\ndata:\n  train: {data_file}\n  max_length: 512\n"
                      "  validation_fraction: 0.02\n  preflight_examples: 3\n")
    base_s = baseline(data_file)
    wall_s, peak_gib, code = run_prepare(config, args.workdir / "runs", args.set)
    if code:
        sys.exit(f"prepare failed with exit code {code}")
    share, false_drops = recall(args.workdir / "runs" / "million", data_file, truth)
    manifest = json.loads((args.workdir / "runs" / "million" / "manifest.json").read_text())
    print(json.dumps({"rows": args.rows, "accounting": manifest["data"]["accounting"],
                      "rows_out": manifest["data"]["rows"]}, indent=1))
    print(f"baseline (read + json.loads every row): {base_s:.1f} s")
    print(f"tunesmith data prepare {' '.join(args.set)}: {wall_s:.1f} s ({wall_s / base_s:.1f}x the baseline), "
          f"peak RSS {peak_gib:.2f} GiB "
          f"(targets: <= 600 s, <= 4 GiB)")
    print(f"duplicate recall: {share:.4f} over {len(truth):,} injected duplicates (target >= 0.95); "
          f"rows dropped as duplicates that were not injected: {false_drops:,}")


if __name__ == "__main__":
    main()
