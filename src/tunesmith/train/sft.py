"""LoRA supervised fine-tuning on transformers' Trainer + peft, reading and writing the run directory."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

from tunesmith.config import RunConfig
from tunesmith.data.prepare import read_split
from tunesmith.data.template import template_fingerprint, tokenize_example
from tunesmith.errors import TunesmithError
from tunesmith.models import load_model, load_tokenizer
from tunesmith.registry.run_dir import read_manifest, staged_dir, update_manifest
from tunesmith.data.batching import PaddingCollator, TokenizedDataset
from tunesmith.train.devices import pick_precision, set_cpu_threads
from tunesmith.train.progress import RichProgressCallback

ADAPTER_DIR = "adapter"


def train_sft(run_dir: Path, config: RunConfig) -> dict:
    """Train a LoRA adapter on the run's training split; write `<run_dir>/adapter` and the manifest's `train`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    base_source = manifest["base_model"]["source"]
    tokenizer = load_tokenizer(base_source)
    if template_fingerprint(tokenizer) != manifest["data"]["chat_template_sha"]:
        raise TunesmithError(f"{run_dir}: the base model's chat template changed since `prepare`; re-run prepare")
    set_seed(config.seed)
    threads = set_cpu_threads(config.train.threads)
    precision = pick_precision(config.train.precision)
    max_length = config.data.max_length
    train_set = TokenizedDataset([_tokenize(tokenizer, e, max_length) for e in read_split(run_dir, "train")])
    val_set = TokenizedDataset([_tokenize(tokenizer, e, max_length) for e in read_split(run_dir, "validation")])

    lora = config.train.lora
    model = get_peft_model(load_model(base_source), LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    ))
    trainable, total = model.get_nb_trainable_parameters()
    started = time.perf_counter()
    with staged_dir(run_dir / ADAPTER_DIR) as staging:
        args = TrainingArguments(
            output_dir=str(staging / "_trainer"), per_device_train_batch_size=config.train.batch_size,
            per_device_eval_batch_size=config.train.batch_size, gradient_accumulation_steps=config.train.grad_accum,
            num_train_epochs=config.train.epochs, max_steps=config.train.max_steps or -1,
            learning_rate=config.train.learning_rate, warmup_steps=config.train.warmup_ratio,
            weight_decay=config.train.weight_decay, lr_scheduler_type="linear",
            logging_steps=config.train.logging_steps, save_strategy="no", eval_strategy="no", report_to=[],
            bf16=precision == "bf16", use_cpu=not torch.cuda.is_available(), seed=config.seed,
            data_seed=config.seed, disable_tqdm=True, train_sampling_strategy="group_by_length", dataloader_num_workers=0,
            include_num_input_tokens_seen="non_padding", remove_unused_columns=False,
        )
        progress = RichProgressCallback()
        trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=val_set,
                          data_collator=PaddingCollator(tokenizer.pad_token_id), callbacks=[progress])
        trainer.remove_callback(PrinterCallback)  # our progress bar shows the loss; no raw dict dumps
        result = trainer.train()
        train_seconds = time.perf_counter() - started
        eval_metrics = trainer.evaluate()
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _remove_trainer_scratch(staging / "_trainer")
    tokens = trainer.state.num_input_tokens_seen
    section = {
        "method": "lora-sft",
        "adapter_dir": ADAPTER_DIR,
        "data_hash": manifest["data"]["dataset_hash"],
        "base_model": manifest["base_model"],
        "config": config.train.model_dump(mode="json"),
        "max_length": max_length,
        "precision": precision,
        "threads": threads,
        "parameters": {"trainable": trainable, "total": total},
        "metrics": {
            "train_loss": round(result.training_loss, 4),
            "validation_loss": round(eval_metrics["eval_loss"], 4),
            "validation_perplexity": round(math.exp(min(eval_metrics["eval_loss"], 50)), 3),
            "steps": trainer.state.global_step,
            "tokens_seen": tokens,
            "tokens_per_second": round(tokens / train_seconds, 1),
        },
        "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h],
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    update_manifest(run_dir, "train", section)
    return section


def _tokenize(tokenizer, example, max_length: int):
    return tokenize_example(tokenizer, [m.model_dump() for m in example.messages], max_length)


def _remove_trainer_scratch(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
