"""Forgetting ablation on the quickstart: which training default keeps the task gain and the base's general ability.

Each variant trains the quickstart config (with overrides) for several seeds and is evaluated on the task (exact match
on held-out examples) and on the shipped general sets (general questions, general-text perplexity); the base model is
evaluated once. Prints a table of means over seeds, each variant's tokens trained and training time relative to the
first variant's (time only means something when the machine was equally quiet for both). Results go to a JSON file as they come, so an interrupted ablation continues where it stopped.
Run (under the shared bench lock; about 6 minutes per run on 2 CPU cores):
    flock /tmp/tunesmith-bench.lock .venv/bin/python bench/forgetting_ablation.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "LoRA, no replay": ["data.replay.share=0"],
    "replay 0.25 (self-distilled)": ["data.replay.share=0.25"],
    "lr 1e-4, no replay": ["data.replay.share=0", "train.learning_rate=0.0001"],
    "rank 4, q/v only, no replay": ["data.replay.share=0", "train.lora.r=4", "train.lora.alpha=8",
                                    "train.lora.target_modules=[q_proj,v_proj]"],
}


def run_variant(name: str, overrides: list[str], seed: int, output_dir: Path, examples: int, with_base: bool) -> dict:
    from tunesmith.config import load_config
    from tunesmith.data.prepare import prepare
    from tunesmith.evaluate.run import evaluate_run
    from tunesmith.registry.run import Run
    from tunesmith.train.sft import train_sft

    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    config = load_config(ROOT / "examples/quickstart/config.yaml", [
        *overrides, f"seed={seed}", f"name=ablation-{slug}-s{seed}", f"output_dir={output_dir}",
        f"evaluate.max_examples={examples}", f"evaluate.compare_base={'true' if with_base else 'false'}",
        "evaluate.bootstrap_samples=200"])
    run_dir = prepare(config, overwrite=True)
    train_sft(run_dir, config, restart=True)
    report = evaluate_run(run_dir, config)
    trained = Run.open(run_dir).trained
    row = {"variant": name, "seed": seed, "train_seconds": trained.metrics["train_seconds"],
           "tokens_seen": trained.metrics["tokens_seen"], **_scores(report["results"]["fine-tuned"])}
    if with_base:
        row["base"] = _scores(report["results"]["base"])
    return row


def _scores(results: dict) -> dict:
    return {"exact_match": results["exact_match"], "general_qa": results["general_qa"],
            "general_ppl": results["general_ppl"]}


def table(rows: list[dict]) -> str:
    base = next((r["base"] for r in rows if "base" in r), None)
    by_variant: dict[str, list[dict]] = {}
    for row in rows:
        by_variant.setdefault(row["variant"], []).append(row)
    default_rows = next(iter(by_variant.values()))
    default_time = statistics.mean(r["train_seconds"] for r in default_rows)
    default_tokens = statistics.mean(r["tokens_seen"] for r in default_rows)
    lines = ["| variant | seeds | exact match | general questions (vs base) | general ppl | tokens trained (x first) "
             "| train time (x first) |", "|---|---|---|---|---|---|---|"]
    if base:
        lines.append(f"| base model | - | {base['exact_match']:.1%} | {base['general_qa']:.1%} | "
                     f"{base['general_ppl']:.2f} | - | - |")
    for name, group in by_variant.items():
        def mean(key):
            return statistics.mean(r[key] for r in group)
        spread = (f" (min {min(r['general_qa'] for r in group):.1%})" if len(group) > 1 else "")
        versus = f" ({(mean('general_qa') - base['general_qa']) * 100:+.1f} pts)" if base else ""
        lines.append(f"| {name} | {len(group)} | {mean('exact_match'):.1%} | {mean('general_qa'):.1%}{versus}{spread} | "
                     f"{mean('general_ppl'):.2f} | {mean('tokens_seen') / default_tokens:.2f} | "
                     f"{mean('train_seconds') / default_time:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--examples", type=int, default=40, help="held-out task examples evaluated per run")
    parser.add_argument("--output-dir", type=Path, default=Path("/tmp/tunesmith-ablation"))
    args = parser.parse_args()
    results_file = args.output_dir / "results.json"
    rows = json.loads(results_file.read_text()) if results_file.exists() else []
    for seed in args.seeds:
        for name in args.variants:
            if any(r["variant"] == name and r["seed"] == seed for r in rows):
                continue
            with_base = not any("base" in r for r in rows)
            rows.append(run_variant(name, VARIANTS[name], seed, args.output_dir, args.examples, with_base))
            args.output_dir.mkdir(parents=True, exist_ok=True)
            results_file.write_text(json.dumps(rows, indent=1))
            print(table(rows), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
