"""Evaluation's generation (tunesmith's continuous-batching engine) vs static batches of `generate` vs one at a time.

All answer the same quickstart-style prompts with the embedded default model, greedy, in one invocation; the
static baseline is plain transformers `generate` on left-padded batches sorted by length (what evaluation used
before the engine): a batch runs until its longest answer ends. The one-at-a-time baseline is plain `generate`, one
prompt per call (the issue's baseline); the engine with one row at a time is timed too (`--engine-single`), to show how
much of the gain is batching. Prints seconds, answers per second and ratios.
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


def static_batches(model, tokenizer, conversations, stop_ids, max_new_tokens: int, batch_size: int) -> list[str]:
    """Plain `generate` on left-padded batches of similar length; answers in input order."""
    import torch

    from tunesmith.data.template import generation_prompt_ids

    prompts = [generation_prompt_ids(tokenizer, messages) for messages in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in batch)
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(prompts[i])) + prompts[i] for i in batch])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in batch])
        with torch.inference_mode():
            output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    do_sample=False, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
        for row, index in enumerate(batch):
            new = output[row, width:].tolist()
            end = next((k for k, token in enumerate(new) if token in stop_ids), len(new))
            answers[index] = tokenizer.decode(new[:end], skip_special_tokens=True).strip()
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--baseline-examples", type=int, default=None,
                        help="time one-at-a-time on the first N only and scale to --examples (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--adapter", type=Path, default=None, help="a run's adapter folder (default: base model)")
    parser.add_argument("--engine-single", action="store_true", help="also time the engine one row at a time")
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
    print(f"engine (continuous batching, up to {args.batch_size}): {batched_s:.1f} s, {len(prompts) / batched_s:.2f} answers/s, "
          f"{sum(g.new_tokens for g in batched) / batched_s:.1f} new tokens/s")

    started = time.perf_counter()
    static = static_batches(model, tokenizer, prompts, stop_ids, args.max_new_tokens, args.batch_size)
    static_s = time.perf_counter() - started
    print(f"static batches of generate (batch {args.batch_size}): {static_s:.1f} s, "
          f"{len(prompts) / static_s:.2f} answers/s")
    print(f"identical answers engine vs static batches: "
          f"{sum(a.text == b for a, b in zip(batched, static)) / len(prompts):.1%}")
    print(f"RATIO static batches / engine = {static_s / batched_s:.2f}x")

    baseline_prompts = prompts[: args.baseline_examples or len(prompts)]
    scaled = "" if len(baseline_prompts) == len(prompts) else f" (timed on {len(baseline_prompts)}, scaled)"
    if args.engine_single:
        started = time.perf_counter()
        generate_batched(model, tokenizer, baseline_prompts, stop_ids, args.max_new_tokens, batch_size=1)
        engine_single_s = (time.perf_counter() - started) * len(prompts) / len(baseline_prompts)
        print(f"engine one row at a time: {engine_single_s:.1f} s{scaled}; RATIO to batched = "
              f"{engine_single_s / batched_s:.2f}x")
    started = time.perf_counter()
    single = static_batches(model, tokenizer, baseline_prompts, stop_ids, args.max_new_tokens, batch_size=1)
    single_s = (time.perf_counter() - started) * len(prompts) / len(baseline_prompts)
    print(f"one-at-a-time generate: {single_s:.1f} s{scaled}, {len(prompts) / single_s:.2f} answers/s")

    same = sum(a.text == b for a, b in zip(batched, single)) / len(single)
    print(f"identical answers engine vs one-at-a-time generate: {same:.1%}")
    print(f"RATIO one-at-a-time / batched = {single_s / batched_s:.2f}x "
          f"(evaluating {len(prompts)} examples: {batched_s / 60:.1f} min batched vs {single_s / 60:.1f} min)")


if __name__ == "__main__":
    main()
