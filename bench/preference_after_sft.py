"""DPO after SFT, judged against its parent: does preference tuning on the SFT model's own mistakes help?

For each seed: train (or reuse) the quickstart SFT parent, mine preference pairs from its sampled answers to its own
training prompts (`tunesmith data mine-pairs`), train DPO from it (`examples/preference/config.yaml` with
`train.init_from`), and evaluate base, parent and child on the same held-out examples twice: greedy (with the general
questions, the forgetting check) and sampled at temperature 1 (what the preference data teaches: fewer of the
mistakes the model makes when it samples, as an API client with default settings gets). Prints a table of means over
seeds; results go to a JSON file as they come, so an interrupted run continues where it stopped.
Run (under the shared bench lock; about 20 minutes per seed on 2 CPU cores):
    flock /tmp/tunesmith-bench.lock .venv/bin/python bench/preference_after_sft.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("base", "parent", "fine-tuned")


def parent_run(seed: int, output_dir: Path, reuse: Path | None) -> Path:
    from tunesmith.config import load_config
    from tunesmith.data.prepare import prepare
    from tunesmith.registry.run import Run
    from tunesmith.train.sft import train_sft

    for candidate in [reuse, output_dir / f"sft-s{seed}"]:
        if candidate and (candidate / "manifest.json").is_file() and Run.open(candidate).is_trained:
            return candidate
    config = load_config(ROOT / "examples/quickstart/config.yaml",
                         [f"seed={seed}", f"name=sft-s{seed}", f"output_dir={output_dir}"])
    run_dir = prepare(config, overwrite=True)
    train_sft(run_dir, config, restart=True)
    return run_dir


def child_run(seed: int, parent: Path, output_dir: Path, args) -> dict:
    from tunesmith.config import load_config
    from tunesmith.data.prepare import prepare
    from tunesmith.evaluate.mined_pairs import mine_pairs
    from tunesmith.evaluate.run import evaluate_run
    from tunesmith.registry.run import Run
    from tunesmith.train.preference import train_preference

    pairs, stats = output_dir / f"mined-s{seed}.jsonl", output_dir / f"mined-s{seed}.stats.json"
    if not (pairs.is_file() and stats.is_file()):  # mining is the slow part: done once per parent
        started = time.perf_counter()
        mined = mine_pairs(parent, pairs, samples=args.mine_samples, temperature=1.0, max_prompts=args.mine_prompts,
                           seed=seed)
        stats.write_text(json.dumps({"pairs": mined.pairs, "error_rate": mined.error_rate,
                                     "seconds": time.perf_counter() - started}))
    mined = json.loads(stats.read_text())
    overrides = [f"seed={seed}", f"name=dpo-s{seed}", f"output_dir={output_dir}", f"data.train={pairs}",
                 f"train.init_from={parent}", f"evaluate.max_examples={args.examples}", "evaluate.bootstrap_samples=500",
                 *args.override]
    config = load_config(ROOT / "examples/preference/config.yaml", overrides)
    run_dir = prepare(config, overwrite=True)
    started = time.perf_counter()
    train_preference(run_dir, config, restart=True)
    dpo_seconds = time.perf_counter() - started
    # Held out: the parent's validation split (`evaluate.test_file: parent` in the example), which the pairs mined
    # from its training prompts never saw. The base is evaluated with the first seed only (it does not change).
    base = f"evaluate.compare_base={'true' if seed == args.seeds[0] else 'false'}"
    greedy = evaluate_run(run_dir, load_config(ROOT / "examples/preference/config.yaml", [*overrides, base]))
    sampled = evaluate_run(run_dir, load_config(ROOT / "examples/preference/config.yaml", [
        *overrides, "evaluate.compare_base=false", "evaluate.temperature=1.0", f"evaluate.samples={args.eval_samples}",
        "evaluate.general_check=false"]))
    row = {"seed": seed, "pairs": mined["pairs"], "mined_error_rate": mined["error_rate"], "mine_seconds": mined["seconds"],
           "dpo_seconds": dpo_seconds, "train_steps": Run.open(run_dir).trained.metrics.get("steps")}
    for label in MODELS:
        if label in greedy["results"]:
            row[label] = {"exact_match": greedy["results"][label]["exact_match"],
                          "json_valid": greedy["results"][label].get("json_valid"),
                          "general_qa": greedy["results"][label].get("general_qa"),
                          "sampled_exact_match": sampled["results"].get(label, {}).get("exact_match"),
                          "sampled_json_valid": sampled["results"].get(label, {}).get("json_valid")}
    row["against_parent"] = {"greedy": greedy.get("against_parent"), "sampled": sampled.get("against_parent")}
    row["sampled_per_example"] = sampled_per_example(run_dir)
    return row


def sampled_per_example(run_dir: Path) -> dict[str, list[float]]:
    """Parent's and child's sampled exact match on each held-out example (the share of its samples that was right),
    from the evaluation's predictions (the sampled evaluation is the last one written)."""
    from tunesmith.evaluate.run import EVAL_DIR

    rows = [json.loads(line) for line in (run_dir / EVAL_DIR / "predictions.jsonl").read_text().splitlines()]
    return {label: [float(row[label]["exact_match"]) for row in rows] for label in ("parent", "fine-tuned")}


def pooled_against_parent(rows: list[dict]) -> str:
    """Child minus parent on sampled exact match over every seed's held-out examples together: each (seed, example)
    is one pair, so the seeds' small gains are tested as one effect (paired bootstrap interval, sign-flip test)."""
    from tunesmith.evaluate.compare import paired_comparison

    seeded = [r["sampled_per_example"] for r in rows if "sampled_per_example" in r]
    if len(seeded) < 2:
        return ""
    parent = [score for scores in seeded for score in scores["parent"]]
    child = [score for scores in seeded for score in scores["fine-tuned"]]
    result = paired_comparison(parent, child, confidence=0.95, resamples=10_000)
    return (f"\npooled over {len(seeded)} seeds ({len(parent)} seed-example pairs), sampled exact match: parent "
            f"{result['base']:.1%} -> child {result['candidate']:.1%}, {result['delta']:+.1%} "
            f"[{result['delta_low']:+.1%}, {result['delta_high']:+.1%}], p = {result['p_value']:.4f}"
            f"{' (significant)' if result['significant'] else ' (not significant)'}; "
            f"examples better {result['wins']}, worse {result['losses']}, same {result['ties']}")


def table(rows: list[dict]) -> str:
    lines = ["| model | seeds | exact match (greedy) | exact match (sampled, T=1) | valid JSON (sampled) | general questions |",
             "|---|---|---|---|---|---|"]
    for label in MODELS:
        group = [r[label] for r in rows if label in r]
        if not group:
            continue

        def mean(key):
            values = [g[key] for g in group if g.get(key) is not None]
            return f"{statistics.mean(values):.1%}" if values else "-"
        lines.append(f"| {label} | {len(group)} | {mean('exact_match')} | {mean('sampled_exact_match')} | "
                     f"{mean('sampled_json_valid')} | {mean('general_qa')} |")
    rates = [r["mined_error_rate"] for r in rows if r.get("mined_error_rate") is not None]
    lines.append(f"\nmined pairs per seed: {', '.join(str(r['pairs']) for r in rows)}"
                 + (f" (parents wrong on {statistics.mean(rates):.1%} of sampled answers to their training prompts)"
                    if rates else ""))
    lines.append(pooled_against_parent(rows))
    return "\n".join(line for line in lines if line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--examples", type=int, default=90, help="held-out examples evaluated")
    parser.add_argument("--mine-prompts", type=int, default=None, help="training prompts asked when mining (all)")
    parser.add_argument("--mine-samples", type=int, default=4)
    parser.add_argument("--eval-samples", type=int, default=4, help="sampled answers per held-out example")
    parser.add_argument("--parents", type=Path, nargs="*", default=[],
                        help="trained quickstart runs to reuse as parents, one per seed in order")
    parser.add_argument("--override", nargs="*", default=[], help="extra overrides of the DPO config")
    parser.add_argument("--output-dir", type=Path, default=Path("/tmp/tunesmith-preference"))
    args = parser.parse_args()
    results_file = args.output_dir / "results.json"
    rows = json.loads(results_file.read_text()) if results_file.exists() else []
    for number, seed in enumerate(args.seeds):
        if any(r["seed"] == seed for r in rows):
            continue
        reuse = args.parents[number] if number < len(args.parents) else None
        rows.append(child_run(seed, parent_run(seed, args.output_dir, reuse), args.output_dir, args))
        args.output_dir.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(rows, indent=1))
        print(table(rows), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
