"""Training speed: TRL's SFTTrainer with its defaults vs tunesmith with its defaults, same model, data and tokens.

In one invocation: a bf16 matmul peak is measured, then each trainer runs in its own fresh process on the
default model (SmolLM2-135M-Instruct) over the same training split for the same number of epochs. Printed per
trainer: tokens/s, peak RSS, final validation loss (one shared fp32 evaluation: mean loss over the assistant
tokens of the held-out split), MFU against the measured peak; then tunesmith / TRL. Targets: >= 2x TRL's
tokens/s at equal or better validation loss, MFU >= 40%.

    flock /tmp/tunesmith-bench.lock .venv/bin/python bench/train_speed.py            # about 10 minutes on 2 cores
    flock /tmp/tunesmith-bench.lock .venv/bin/python bench/train_speed.py --rows 200 # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORDERS = REPO / "examples" / "quickstart" / "orders.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=600, help="rows of examples/quickstart/orders.jsonl to use")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the training split, both trainers")
    parser.add_argument("--child", nargs=3, metavar=("WHO", "RUN_DIR", "EPOCHS"), help=argparse.SUPPRESS)
    parser.add_argument("--override", action="append", default=[], help="tunesmith config override (ablations)")
    parser.add_argument("--skip-trl", action="store_true", help="run tunesmith only (for ablations of its defaults)")
    args = parser.parse_args()
    if args.child:
        who, run_dir, epochs = args.child
        result = (_train_trl if who == "trl" else _train_tunesmith)(Path(run_dir), float(epochs), args.override)
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        result["load_average"] = os.getloadavg()[1]  # 5-minute: other work on the machine skews both trainers
        print("RESULT " + json.dumps(result), flush=True)
        return
    # The peak is measured before and after every trainer and the highest kept: on a shared VM a single
    # measurement can land in a slow moment, which would flatter MFU.
    peaks = [bf16_matmul_peak()]
    with tempfile.TemporaryDirectory(prefix="train-speed-") as work:
        run_dir = _prepare(Path(work), args.rows)
        results = {}
        for who in ("tunesmith",) if args.skip_trl else ("trl", "tunesmith"):
            results[who] = _run_child(who, run_dir, args.epochs, args.override)
            peaks.append(bf16_matmul_peak())
    peak = max(peaks)
    print(f"bf16 matmul peak on this machine: {peak / 1e9:.1f} GFLOP/s (best of "
          f"{', '.join(f'{p / 1e9:.0f}' for p in peaks)})", flush=True)
    for who, result in results.items():
        _print_row(who, result, peak)
    if args.skip_trl:
        return
    trl, ours = results["trl"], results["tunesmith"]
    ratio = ours["tokens_per_s"] / trl["tokens_per_s"]
    loss_ok = ours["validation_loss"] <= trl["validation_loss"]
    mfu = ours["flops_per_s"] / peak
    print(f"\ntunesmith / TRL tokens/s: {ratio:.2f}x (target >= 2x: {'MET' if ratio >= 2 else 'NOT MET'}); "
          f"validation loss {ours['validation_loss']:.4f} vs {trl['validation_loss']:.4f} "
          f"({'equal or better' if loss_ok else 'WORSE'}); tunesmith MFU {mfu:.1%} "
          f"(target >= 40%: {'MET' if mfu >= 0.4 else 'NOT MET'})")


def bf16_matmul_peak(size: int = 2048, repeats: int = 8) -> float:
    """Best sustained FLOP/s of a square bf16 matmul on all cores: the ceiling MFU is measured against."""
    import torch

    a = torch.randn(size, size, dtype=torch.bfloat16)
    b = torch.randn(size, size, dtype=torch.bfloat16)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 * repeats / best


def _prepare(work: Path, rows: int) -> Path:
    import yaml

    lines = ORDERS.read_text(encoding="utf-8").splitlines()[:rows]
    data = work / "orders.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {"name": "bench", "base_model": "default", "output_dir": str(work / "runs"),
              "data": {"train": str(data), "validation_fraction": 0.15, "max_length": 256}}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    subprocess.run([sys.executable, "-m", "tunesmith", "prepare", str(path)], check=True, capture_output=True)
    return work / "runs" / "bench"


def _run_child(who: str, run_dir: Path, epochs: float, overrides: list[str]) -> dict:
    command = [sys.executable, __file__, "--child", who, str(run_dir), str(epochs)]
    command += [f"--override={item}" for item in overrides]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{who} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _print_row(who: str, result: dict, peak: float) -> None:
    print(f"{who:9}  {result['tokens']:7,} tokens in {result['seconds']:7.1f} s = {result['tokens_per_s']:7.1f} "
          f"tokens/s   peak RSS {result['peak_rss_gib']:.2f} GiB   validation loss {result['validation_loss']:.4f}   "
          f"MFU {result['flops_per_s'] / peak:.1%}   load avg {result['load_average']:.1f}   ({result['setup']})",
          flush=True)


def _examples(run_dir: Path, split: str):
    from tunesmith.data.prepare import read_split

    return read_split(run_dir, split)


def _train_trl(run_dir: Path, epochs: float, overrides: list[str]) -> dict:
    """TRL's SFTTrainer with its defaults (full fine-tuning, bf16, gradient checkpointing, lr 2e-5, batch 8)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tunesmith.models import load_model, load_tokenizer, resolve_base_model

    source = resolve_base_model("default")
    tokenizer = load_tokenizer(source)
    rows = [{"prompt": e.prompt_messages(), "completion": [e.messages[-1].model_dump()]}
            for e in _examples(run_dir, "train")]
    # use_cpu is required for TRL's default bf16=True to start on a CPU; everything else is TRL's default.
    args = SFTConfig(output_dir=str(run_dir / "trl"), num_train_epochs=epochs, use_cpu=True, report_to=[],
                     save_strategy="no", disable_tqdm=True)
    trainer = SFTTrainer(model=load_model(source), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    metrics = trainer.train().metrics
    tokens = int(sum(len(ids) for ids in trainer.train_dataset["input_ids"]) * epochs)
    model = trainer.model
    counts = _parameter_counts(model)
    flops = tokens * 6 * (counts["backbone"] + counts["head"])  # every weight gets gradients; every position logits
    return {"tokens": tokens, "seconds": metrics["train_runtime"], "tokens_per_s": tokens / metrics["train_runtime"],
            "flops_per_s": flops / metrics["train_runtime"], "validation_loss": _validation_loss(model, tokenizer, run_dir),
            "setup": f"full fine-tuning, bf16={args.bf16}, gradient_checkpointing={args.gradient_checkpointing}, "
                     f"lr={args.learning_rate}, batch={args.per_device_train_batch_size}"}


def _train_tunesmith(run_dir: Path, epochs: float, overrides: list[str]) -> dict:
    """tunesmith's defaults: `tunesmith train` with nothing set but the epochs."""
    from tunesmith.config import load_run_config
    from tunesmith.data.template import tokenize_example
    from tunesmith.models import load_tokenizer, load_with_adapter
    from tunesmith.train.batches import trained_token_count
    from tunesmith.train.sft import train_sft

    config = load_run_config(run_dir, [f"train.epochs={epochs}", "train.checkpoint_steps=0", *overrides])
    section = train_sft(run_dir, config)
    metrics = section["metrics"]
    source = section["base_model"]["source"]
    tokenizer = load_tokenizer(source)
    model = load_with_adapter(source, run_dir / section["adapter_dir"])
    counts = _parameter_counts(model)
    trained = sum(trained_token_count(tokenize_example(tokenizer, e.message_dicts(), 256))
                  for e in _examples(run_dir, "train"))
    # The method's work: frozen weights need forward + input gradients (4 FLOPs/weight/token) except the first
    # layer's q/k/v, whose input (the frozen embedding, normed) needs none; adapters all 6; the vocabulary
    # projection runs only where a token is trained. Attention's own score matmuls are not counted.
    flops = (metrics["tokens_seen"] * (4 * counts["backbone"] - 2 * counts["first_qkv"] + 6 * counts["adapter"])
             + trained * epochs * 4 * counts["head"])
    setup = section["config"]
    return {"tokens": metrics["tokens_seen"], "seconds": metrics["train_seconds"],
            "tokens_per_s": metrics["tokens_per_second"], "flops_per_s": flops / metrics["train_seconds"],
            "validation_loss": _validation_loss(model, tokenizer, run_dir),
            "setup": f"{setup['adapter']} r={setup['lora']['r']} {setup['lora']['target_modules']}, "
                     f"{section['precision']}, packing={setup['packing']}, lr={setup['learning_rate']}, "
                     f"batch={setup['batch_size']}"}


def _parameter_counts(model) -> dict:
    """Weights of the transformer blocks (and of the first layer's q/k/v), of the vocabulary projection, of LoRA adapters."""
    counts = {"backbone": 0, "head": 0, "adapter": 0, "first_qkv": 0}
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            counts["adapter"] += parameter.numel()
            continue
        if re.search(r"layers\.0\.self_attn\.[qkv]_proj\.(base_layer\.)?weight$", name):
            counts["first_qkv"] += parameter.numel()
        if "embed_tokens" in name or "lm_head" in name:
            counts["head"] = max(counts["head"], parameter.numel())  # tied: one matrix
        else:
            counts["backbone"] += parameter.numel()
    return counts


def _validation_loss(model, tokenizer, run_dir: Path) -> float:
    """Mean fp32 loss over the assistant tokens (and their end-of-turn) of the held-out split: same for both."""
    import torch

    from tunesmith.data.template import tokenize_example
    from tunesmith.train.batches import padded_batch, trained_token_count
    from tunesmith.train.loop import trained_token_loss_module

    model = model.float().eval()
    loss = trained_token_loss_module(model)
    examples = [tokenize_example(tokenizer, e.message_dicts(), 256)
                for e in _examples(run_dir, "validation")]
    total = tokens = 0.0
    with torch.no_grad():
        for start in range(0, len(examples), 8):
            chunk = examples[start:start + 8]
            total += loss(**padded_batch(chunk, tokenizer.pad_token_id)).item()
            tokens += sum(trained_token_count(e) for e in chunk)
    return total / tokens


if __name__ == "__main__":
    main()
