"""Preference tuning (DPO, KTO) on TRL's trainers, from the base model or an earlier run (`train.init_from`).

Read top to bottom: (resume) -> data -> model (as SFT builds it) -> TRL trainer on tunesmith's footing
(checkpoints, safe stops, NaN guard, validation curve: trl_footing) -> save -> manifest.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from tunesmith.config import RunConfig
from tunesmith.data.prepare import read_preference_split
from tunesmith.errors import TunesmithError
from tunesmith.models import load_tokenizer
from tunesmith.registry.run import Run
from tunesmith.registry.run_dir import staged_dir
from tunesmith.train.checkpoints import resume_point, settings_of
from tunesmith.machine import pick_precision, set_cpu_threads
from tunesmith.train.loop import LoopProgress
from tunesmith.train.preference_data import ACCEPTED_KINDS, check_preference_kind, dpo_token_rows, trl_rows
from tunesmith.train.run_record import ADAPTER_DIR, FULL_MODEL_DIR, parent_of, record_trained, train_section
from tunesmith.train.trl_footing import (final_evaluation, footing_arguments, footing_section, train_with_footing,
                                         trl_training_model)

# TRL's evaluation metric -> the manifest's name for it (KTO logs no pairwise accuracy).
PREFERENCE_METRICS = {
    "eval_rewards/accuracies": "reward_accuracy", "eval_rewards/margins": "reward_margin",
    "eval_rewards/chosen": "chosen_reward", "eval_rewards/rejected": "rejected_reward", "eval_kl": "kl",
}


def train_preference(run_dir: Path, config: RunConfig, resume: bool = False, restart: bool = False,
                     on_step: Callable[[LoopProgress, int], None] | None = None) -> dict:
    """Train with DPO or KTO on the run's preference split; write `<run_dir>/adapter` (or `model`) and manifest `train`.

    Checkpoints of an earlier attempt are continued (`resume`, exactly) or deleted (`restart`), never dropped
    silently. `on_step(progress, total_steps)` is called after every optimizer step (a fine-tuning job reports)."""
    import torch
    from datasets import Dataset
    from transformers import set_seed

    run_dir, settings = Path(run_dir), config.train
    if settings.method not in ACCEPTED_KINDS:
        raise TunesmithError(f"train.method={settings.method} is not a preference method; choose {', '.join(ACCEPTED_KINDS)}")
    run = Run.open(run_dir)
    check_preference_kind(run, settings.method)
    resumed_from = resume_point(run_dir, resume, restart)
    if resumed_from:
        settings = settings_of(resumed_from, settings)
    tokenizer = load_tokenizer(run.base_source)
    run.check_template(tokenizer)
    parent = parent_of(run, settings)
    precision = pick_precision(settings.precision)
    threads = set_cpu_threads(settings.threads)
    set_seed(config.seed)
    rows = (lambda split: dpo_token_rows(tokenizer, split)) if settings.method == "dpo" else trl_rows
    train_set = Dataset.from_list(rows(read_preference_split(run_dir, "train")))
    val_set = Dataset.from_list(rows(read_preference_split(run_dir, "validation")))

    # A parent's adapter is trained further, and TRL keeps a frozen copy of it as the reference policy.
    model, config, (trainable, total) = trl_training_model(run, parent, config, precision, resumed_from)
    settings = config.train
    started = time.perf_counter()
    target = run_dir / (FULL_MODEL_DIR if settings.adapter == "full" else ADAPTER_DIR)
    with staged_dir(target) as staging:
        args = _trainer_arguments(config, precision, staging / "_trainer", use_cpu=not torch.cuda.is_available())
        trainer = _trainer_class(settings.method)(
            model=model, args=args, processing_class=tokenizer, train_dataset=train_set, eval_dataset=val_set)
        progress = train_with_footing(trainer, run_dir, settings, resumed_from, on_step)
        save_kwargs = {} if settings.adapter == "full" else {"selected_adapters": ["default"]}  # not TRL's "ref" copy
        trainer.model.save_pretrained(staging, **save_kwargs)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(staging / "_trainer", ignore_errors=True)
    section = {
        **train_section(config, settings, run, parent, precision, threads, (trainable, total)),
        **footing_section(progress, run_dir, resumed_from),
        "processes": trainer.args.world_size,
        "metrics": _metrics(progress, final_evaluation(trainer.state.log_history, progress)),
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    return record_trained(run, section)


def _metrics(progress: LoopProgress, evaluation: dict) -> dict:
    """SFT's metric names where they apply, and the preference metrics of the kept weights' evaluation."""
    seconds = max(progress.train_seconds, 1e-9)
    return {
        "train_loss": round(progress.loss_curve[-1]["loss"], 4) if progress.loss_curve else None,
        "validation_loss": round(evaluation["eval_loss"], 4) if evaluation else None,
        **{name: round(evaluation[key], 4) for key, name in PREFERENCE_METRICS.items() if key in evaluation},
        "best_validation_loss": progress.best_validation and round(progress.best_validation, 4),
        "steps": progress.step,
        "tokens_seen": progress.tokens_seen,
        "tokens_per_second": round(progress.tokens_seen / seconds, 1),
        "train_seconds": round(progress.train_seconds, 1),
    }


def _trainer_arguments(config: RunConfig, precision: str, output_dir: Path, use_cpu: bool):
    from trl import DPOConfig, KTOConfig

    train = config.train
    return (DPOConfig if train.method == "dpo" else KTOConfig)(
        output_dir=str(output_dir), per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size, gradient_accumulation_steps=train.grad_accum,
        num_train_epochs=train.epochs, max_steps=train.max_steps or -1, learning_rate=train.learning_rate,
        warmup_steps=train.warmup_ratio, weight_decay=train.weight_decay,
        lr_scheduler_type="constant_with_warmup" if train.lr_scheduler == "constant" else train.lr_scheduler,
        max_grad_norm=train.max_grad_norm or 0.0, bf16=precision == "bf16", fp16=precision == "fp16",
        use_cpu=use_cpu, seed=config.seed, data_seed=config.seed, dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding", **footing_arguments(train, validates=True),
        # build_training_model already applied train.gradient_checkpointing; TRL would turn it on by default.
        gradient_checkpointing=False, beta=train.preference.beta, max_length=config.data.max_length,
        **_dpo_losses(train),
    )


def _dpo_losses(train) -> dict:
    """DPO's sigmoid loss, plus the SFT loss on chosen answers when `train.preference.sft_weight` asks for it."""
    if train.method != "dpo" or not train.preference.sft_weight:
        return {}
    return {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, train.preference.sft_weight]}


def _trainer_class(method: str):
    from trl import DPOTrainer, KTOTrainer

    class TokenizedDPOTrainer(DPOTrainer):
        """DPO on rows `preference_data.dpo_token_rows` tokenized already (TRL would re-tokenize them its way)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return TokenizedDPOTrainer if method == "dpo" else KTOTrainer
