"""Export a registered default-model run in every format: time, size and agreement with what it was made from.

Baseline in the same invocation: peft's plain `merge_and_unload()` + `save_pretrained()` with no check, the step
every export starts from. Then `tunesmith export` for merged fp32/bf16 and GGUF f16/bf16/q8_0/q4_0 (+ Ollama);
each row prints seconds (and the ratio to the baseline), size, greedy agreement on held-out prompts, the largest
logit difference and the perplexity change. Finally llama.cpp (llama-cpp-python, when installed) answers the
held-out prompts from the f16 GGUF and is compared with the merged model's greedy answers.
Run (under the shared bench lock), after `tunesmith run examples/quickstart/config.yaml`:
    flock /tmp/tunesmith-bench.lock .venv/bin/python bench/export.py --run runs/quickstart
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

EXPORTS = [("merged", "fp32"), ("merged", "bf16"), ("gguf", "f16"), ("gguf", "bf16"), ("gguf", "q8_0"),
           ("gguf", "q4_0"), ("ollama", "f16")]


def plain_merge_seconds(run_dir: Path, scratch: Path) -> tuple[float, int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.registry.run import Run

    run = Run.open(run_dir)
    started = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(run.base_source)
    merged = PeftModel.from_pretrained(base, str(run.weights_dir)).merge_and_unload()
    merged.save_pretrained(scratch / "plain")
    seconds = time.perf_counter() - started
    return seconds, sum(p.stat().st_size for p in (scratch / "plain").rglob("*") if p.is_file())


def llama_cpp_agreement(gguf: Path, merged_dir: Path, run_dir: Path, count: int, max_tokens: int) -> str:
    """llama.cpp's greedy answers from the GGUF vs transformers' from the merged folder, on held-out prompts."""
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        return f"skipped: llama-cpp-python is not installed ({exc}); `pip install llama-cpp-python` builds llama.cpp"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.evaluate.examples import evaluation_examples
    from tunesmith.registry.run import Run

    examples = evaluation_examples(Run.open(run_dir))[:count]
    llm = Llama(model_path=str(gguf), n_ctx=1024, verbose=False, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    same = 0
    for example in examples:
        messages = example.prompt_messages()
        reply = llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=max_tokens)
        llama_text = (reply["choices"][0]["message"]["content"] or "").strip()
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
        hf_text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        same += llama_text == hf_text
    return f"llama.cpp (f16 GGUF) vs transformers (merged): {same}/{len(examples)} identical greedy answers"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--check-examples", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--only", nargs="*", default=None, help="FORMAT:DTYPE pairs (default: all)")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}")

    from tunesmith.cli.export_command import export_version
    from tunesmith.registry.register import register_run
    from tunesmith.registry.store import Registry

    with tempfile.TemporaryDirectory(prefix="bench-export-") as scratch_name:
        scratch = Path(scratch_name)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'mlflow.db'}"
        registry = Registry()
        info, _ = register_run(registry, args.run, "bench")
        baseline, baseline_bytes = plain_merge_seconds(args.run, scratch)
        print(f"baseline: peft merge_and_unload + save_pretrained, no check: {baseline:.1f} s, "
              f"{baseline_bytes / 2**20:.1f} MiB")
        print(f"{'export':<14} {'seconds':>8} {'x base':>7} {'MiB':>8} {'agree':>7} {'max logit diff':>15} {'ppl change':>11}")
        selected = [tuple(item.split(":")) for item in args.only] if args.only else EXPORTS
        rows = {}
        for fmt, dtype in selected:
            target = scratch / f"{fmt}-{dtype}"
            export_version(f"bench@{info.version}", fmt, dtype, target, args.check_examples, args.max_new_tokens)
            record = json.loads((target / "export.json").read_text())
            checks = record["checks"]
            rows[(fmt, dtype)] = target
            print(f"{fmt + ' ' + dtype:<14} {record['seconds']:>8.1f} {record['seconds'] / baseline:>7.2f} "
                  f"{record['bytes'] / 2**20:>8.1f} {checks['agreement']:>7.1%} {checks['max_logit_difference']:>15.4g} "
                  f"{checks['perplexity_change']:>+11.2%}", flush=True)
        f16 = rows.get(("gguf", "f16"))
        merged = rows.get(("merged", "fp32"))
        if f16 and merged:
            gguf_file = next(f16.glob("*.gguf"))
            print(llama_cpp_agreement(gguf_file, merged, args.run, min(args.check_examples, 20), args.max_new_tokens))


if __name__ == "__main__":
    main()
