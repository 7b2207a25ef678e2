"""Supervised fine-tuning (full, LoRA, DoRA, QLoRA) on accelerate + peft, reading and writing the run directory.

Read top to bottom: data -> model -> optimizer -> (resume) -> loop -> save -> manifest.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from tunesmith.config import RunConfig, TrainConfig
from tunesmith.data.prepare import read_split
from tunesmith.data.replay import read_replay
from tunesmith.data.template import tokenize_example
from tunesmith.models import load_tokenizer
from tunesmith.registry.run import Run
from tunesmith.registry.run_dir import staged_dir
from tunesmith.train.batches import StepPlan
from tunesmith.train.checkpoints import CHECKPOINTS_DIR, resume_point, settings_of
from tunesmith.machine import pick_precision, set_cpu_threads
from tunesmith.train.distributed import default_threads, make_accelerator
from tunesmith.train.learning_rate import with_learning_rate
from tunesmith.train.loop import LoopProgress, SftLoop, trained_token_loss_module
from tunesmith.train.model_setup import build_training_model, trainable_parameter_counts
from tunesmith.train.progress import LoopProgressBar
from tunesmith.train.run_record import (ADAPTER_DIR, FULL_MODEL_DIR, parent_of, record_trained, train_section,
                                        weights_source)


def train_sft(run_dir: Path, config: RunConfig, resume: bool = False, restart: bool = False,
              on_step: Callable[[LoopProgress, int], None] | None = None) -> dict:
    """Train on the run's training split; write `<run_dir>/adapter` (or `model` for full) and the manifest's `train`.

    Checkpoints of an earlier attempt are continued (`resume`) or deleted (`restart`), never dropped silently.
    `on_step(progress, total_steps)` is called after every optimizer step (a fine-tuning job reports from it)."""
    import torch
    from transformers import get_scheduler

    run_dir, settings = Path(run_dir), config.train
    run = Run.open(run_dir)
    resumed_from = resume_point(run_dir, resume, restart)
    if resumed_from:
        settings = settings_of(resumed_from, settings)
    tokenizer = load_tokenizer(run.base_source)
    run.check_template(tokenizer)
    parent = parent_of(run, settings)
    precision = pick_precision(settings.precision)
    accelerator = make_accelerator(settings, precision)
    threads = set_cpu_threads(default_threads(settings.threads))
    # Replay rows (data.replay) are trained on like the task's rows; validation stays the task's own.
    train_examples = _tokenized(tokenizer, read_split(run_dir, "train") + read_replay(run), config.data.max_length)
    validation_examples = _tokenized(tokenizer, read_split(run_dir, "validation"), config.data.max_length)

    torch.manual_seed(config.seed)  # adapter initialisation
    model_source, parent_adapter = weights_source(run, parent, settings)
    model = build_training_model(model_source, settings, precision, parent_adapter)
    settings = with_learning_rate(settings, model.config)
    trainable, total = trainable_parameter_counts(model)
    module = trained_token_loss_module(model)
    if settings.compile:
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        causal_lm.get_decoder().compile(dynamic=True)  # in place: parameter names (and checkpoints) stay the same
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    lengths = tuple(len(e.input_ids) for e in train_examples) if settings.group_by_length else None
    plan = StepPlan(len(train_examples), settings.batch_size * settings.grad_accum, config.seed, lengths)
    total_steps = plan.total_steps(settings.epochs, settings.max_steps)
    scheduler = get_scheduler(_scheduler_name(settings), optimizer, num_training_steps=total_steps,
                              num_warmup_steps=math.ceil(settings.warmup_ratio * total_steps))
    module, optimizer = accelerator.prepare(module, optimizer)
    loop = SftLoop(accelerator, module, optimizer, scheduler, train_examples, validation_examples, plan, total_steps,
                   settings, config.seed, tokenizer.pad_token_id, run_dir)

    if resumed_from:
        loop.restore(resumed_from)
    elif accelerator.is_main_process:
        shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)  # an earlier attempt's, not this run's
    started = time.perf_counter()
    with LoopProgressBar(total_steps, loop.progress, enabled=accelerator.is_main_process) as bar:

        def after_step(progress: LoopProgress) -> None:
            bar.update(progress)
            if on_step and accelerator.is_main_process:
                on_step(progress, total_steps)

        progress = loop.run(on_step=after_step)
    accelerator.wait_for_everyone()

    unwrapped = loop.inner_model
    section = {
        **train_section(config, settings, run, parent, precision, threads, (trainable, total)),
        "resumed_from": resumed_from and str(resumed_from.relative_to(run_dir)),
        "processes": accelerator.num_processes,
        "metrics": _metrics(progress),
        "loss_curve": progress.loss_curve,
        "validation_curve": progress.validation_curve,
        "stopped_early": progress.stop_reason == "early_stopping",
        "warnings": progress.warnings,
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    # Every process takes part in gathering a sharded (FSDP / ZeRO) full model; the main one writes.
    full_state = accelerator.get_state_dict(loop.module) if settings.adapter == "full" else None
    if accelerator.is_main_process:
        _save_trained(run_dir, unwrapped, tokenizer, settings, full_state)
        record_trained(run, section)
    return section


def _tokenized(tokenizer, examples, max_length: int):
    return [tokenize_example(tokenizer, e.message_dicts(), max_length, e.tools) for e in examples]


def _scheduler_name(settings: TrainConfig) -> str:
    return "constant_with_warmup" if settings.lr_scheduler == "constant" else settings.lr_scheduler


def _metrics(progress) -> dict:
    final = progress.validation_curve[-1]["loss"] if progress.validation_curve else float("nan")
    if progress.best_weights_restored:
        final = progress.best_validation
    seconds = max(progress.train_seconds, 1e-9)
    return {
        "train_loss": round(progress.loss_curve[-1]["loss"], 4) if progress.loss_curve else None,
        "validation_loss": round(final, 4),
        "validation_perplexity": round(math.exp(min(final, 50)), 3),
        "best_validation_loss": progress.best_validation and round(progress.best_validation, 4),
        "steps": progress.step,
        "tokens_seen": progress.tokens_seen,
        "trained_tokens": progress.trained_tokens,
        "tokens_per_second": round(progress.tokens_seen / seconds, 1),
        "train_seconds": round(progress.train_seconds, 1),
    }


def _save_trained(run_dir: Path, model, tokenizer, settings: TrainConfig, full_state: dict | None) -> None:
    """The adapter (or the full model) with its tokenizer, written to a staging folder and renamed into place."""
    target = run_dir / (FULL_MODEL_DIR if settings.adapter == "full" else ADAPTER_DIR)
    with staged_dir(target) as staging:
        if settings.adapter == "full":
            model.config.use_cache = True
            prefix = "model."  # the state dict is the loss wrapper's; the model's own names follow this prefix
            model.save_pretrained(staging, state_dict={k.removeprefix(prefix): v for k, v in full_state.items()})
        else:
            model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
