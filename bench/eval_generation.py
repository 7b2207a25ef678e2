"""Batched generation with KV cache (what `tunesmith evaluate` uses) vs one-at-a-time `generate`.

Both answer the same quickstart-style prompts with the embedded default model, greedy, in one
invocation; prints seconds, answers per second and the speed-up ratio.
Run (under the shared bench lock):
    flock /tmp/tunesmith-bench.lock .venv/bin/python bench/eval_generation.py --examples 500
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quickstart_prompts(count: int, seed: int) -> list[list[dict]]:
    """Fresh quickstart-style conversations (system + user), from the example's own generator."""
    spec = importlib.util.spec_from_file_location("make_data", ROOT / "examples/quickstart/make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    rng = random.Random(seed)
    return [make_data.make_row(rng)["messages"][:-1] for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--baseline-examples", type=int, default=None,
                        help="time one-at-a-time on the first N only and scale to --examples (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--adapter", type=Path, default=None, help="a run's adapter folder (default: base model)")
    args = parser.parse_args()

    import torch

    from tunesmith.data.template import end_of_turn_token_ids
    from tunesmith.evaluate.generate import generate_batched
    from tunesmith.models import load_model, load_tokenizer, load_with_adapter, resolve_base_model

    source = resolve_base_model("default")
    tokenizer = load_tokenizer(source)
    model = load_with_adapter(source, args.adapter) if args.adapter else load_model(source)
    stop_ids = end_of_turn_token_ids(tokenizer)
    prompts = quickstart_prompts(args.examples, seed=1234)
    print(f"model {source.name}{' + ' + str(args.adapter) if args.adapter else ''}, {len(prompts)} prompts, "
          f"greedy, max {args.max_new_tokens} new tokens, {torch.get_num_threads()} threads")

    started = time.perf_counter()
    batched = generate_batched(model, tokenizer, prompts, stop_ids, args.max_new_tokens, args.batch_size)
    batched_s = time.perf_counter() - started
    print(f"batched (batch {args.batch_size}, KV cache): {batched_s:.1f} s, {len(prompts) / batched_s:.2f} answers/s, "
          f"{sum(g.new_tokens for g in batched) / batched_s:.1f} new tokens/s")

    baseline_prompts = prompts[: args.baseline_examples or len(prompts)]
    started = time.perf_counter()
    single = generate_batched(model, tokenizer, baseline_prompts, stop_ids, args.max_new_tokens, batch_size=1)
    single_s = (time.perf_counter() - started) * len(prompts) / len(baseline_prompts)
    scaled = "" if len(baseline_prompts) == len(prompts) else f" (timed on {len(baseline_prompts)}, scaled)"
    print(f"one-at-a-time generate: {single_s:.1f} s{scaled}, {len(prompts) / single_s:.2f} answers/s")

    same = sum(a.text == b.text for a, b in zip(batched, single)) / len(single)
    print(f"identical answers batched vs one-at-a-time: {same:.1%}")
    print(f"RATIO one-at-a-time / batched = {single_s / batched_s:.2f}x "
          f"(evaluating {len(prompts)} examples: {batched_s / 60:.1f} min batched vs {single_s / 60:.1f} min)")


if __name__ == "__main__":
    main()
