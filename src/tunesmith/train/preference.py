"""Preference tuning (DPO, KTO) on TRL's trainers, from the base model or an earlier run (`train.init_from`).

Read top to bottom: data -> model (as SFT builds it) -> TRL trainer -> save -> manifest.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from tunesmith.config import RunConfig
from tunesmith.data.prepare import read_preference_split
from tunesmith.errors import TunesmithError
from tunesmith.models import load_tokenizer
from tunesmith.registry.run import Run
from tunesmith.registry.run_dir import staged_dir
from tunesmith.train.devices import pick_precision, set_cpu_threads
from tunesmith.train.learning_rate import with_learning_rate
from tunesmith.train.model_setup import build_training_model, trainable_parameter_counts
from tunesmith.train.preference_data import ACCEPTED_KINDS, check_preference_kind, trl_rows
from tunesmith.train.progress import RichProgressCallback
from tunesmith.train.run_record import (ADAPTER_DIR, FULL_MODEL_DIR, parent_of, record_trained, train_section,
                                        weights_source)

# TRL's evaluation metric -> the manifest's name for it (KTO logs no pairwise accuracy).
PREFERENCE_METRICS = {
    "eval_rewards/accuracies": "reward_accuracy", "eval_rewards/margins": "reward_margin",
    "eval_rewards/chosen": "chosen_reward", "eval_rewards/rejected": "rejected_reward", "eval_kl": "kl",
}


def train_preference(run_dir: Path, config: RunConfig, resume: bool = False, restart: bool = False) -> dict:
    """Train with DPO or KTO on the run's preference split; write `<run_dir>/adapter` (or `model`) and manifest `train`."""
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, set_seed

    run_dir, settings = Path(run_dir), config.train
    if resume:
        raise TunesmithError(f"--resume works for train.method=sft only (this run uses {settings.method})")
    if settings.method not in ACCEPTED_KINDS:
        raise TunesmithError(f"train.method={settings.method} is not a preference method; choose {', '.join(ACCEPTED_KINDS)}")
    run = Run.open(run_dir)
    check_preference_kind(run, settings.method)
    tokenizer = load_tokenizer(run.base_source)
    run.check_template(tokenizer)
    parent = parent_of(run, settings)
    precision = pick_precision(settings.precision)
    threads = set_cpu_threads(settings.threads)
    set_seed(config.seed)
    train_set = Dataset.from_list(trl_rows(read_preference_split(run_dir, "train")))
    val_set = Dataset.from_list(trl_rows(read_preference_split(run_dir, "validation")))

    # A parent's adapter is trained further, and TRL keeps a frozen copy of it as the reference policy.
    model_source, parent_adapter = weights_source(run, parent, settings)
    model = build_training_model(model_source, settings, precision, parent_adapter)
    settings = with_learning_rate(settings, model.config)
    config = config.model_copy(update={"train": settings})
    trainable, total = trainable_parameter_counts(model)
    started = time.perf_counter()
    target = run_dir / (FULL_MODEL_DIR if settings.adapter == "full" else ADAPTER_DIR)
    with staged_dir(target) as staging:
        args = _trainer_arguments(config, precision, staging / "_trainer", use_cpu=not torch.cuda.is_available())
        trainer = _trainer_class(settings.method)(
            model=model, args=args, processing_class=tokenizer, train_dataset=train_set, eval_dataset=val_set,
            callbacks=[RichProgressCallback()])
        trainer.remove_callback(PrinterCallback)  # the progress bar shows the loss; no raw dict dumps
        result = trainer.train()
        train_seconds = time.perf_counter() - started
        eval_metrics = trainer.evaluate()
        save_kwargs = {} if settings.adapter == "full" else {"selected_adapters": ["default"]}  # not TRL's "ref" copy
        trainer.model.save_pretrained(staging, **save_kwargs)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(staging / "_trainer", ignore_errors=True)
    tokens = trainer.state.num_input_tokens_seen
    section = {
        **train_section(config, settings, run, parent, precision, threads, (trainable, total)),
        "metrics": {
            "train_loss": round(result.training_loss, 4),
            "validation_loss": round(eval_metrics["eval_loss"], 4),
            **{name: round(eval_metrics[key], 4) for key, name in PREFERENCE_METRICS.items() if key in eval_metrics},
            "steps": trainer.state.global_step,
            "tokens_seen": tokens,
            "tokens_per_second": round(tokens / train_seconds, 1),
        },
        "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h],
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    return record_trained(run, section)


def _trainer_arguments(config: RunConfig, precision: str, output_dir: Path, use_cpu: bool):
    from trl import DPOConfig, KTOConfig

    train = config.train
    return (DPOConfig if train.method == "dpo" else KTOConfig)(
        output_dir=str(output_dir), per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size, gradient_accumulation_steps=train.grad_accum,
        num_train_epochs=train.epochs, max_steps=train.max_steps or -1, learning_rate=train.learning_rate,
        warmup_steps=train.warmup_ratio, weight_decay=train.weight_decay,
        lr_scheduler_type="constant_with_warmup" if train.lr_scheduler == "constant" else train.lr_scheduler,
        max_grad_norm=train.max_grad_norm or 0.0, logging_steps=train.logging_steps, save_strategy="no",
        eval_strategy="no", report_to=[], bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=use_cpu,
        seed=config.seed, data_seed=config.seed, disable_tqdm=True, dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        # build_training_model already applied train.gradient_checkpointing; TRL would turn it on by default.
        gradient_checkpointing=False, beta=train.preference.beta, max_length=config.data.max_length,
    )


def _trainer_class(method: str):
    from trl import DPOTrainer, KTOTrainer

    return DPOTrainer if method == "dpo" else KTOTrainer
