"""Crash-safe footing for TRL trainers (DPO, KTO, GRPO): the checkpoints, safe stops, NaN guard, validation curve,
early stopping and progress bar of SFT's own loop, as a transformers callback around `trainer.train()`.

A checkpoint keeps SFT's layout (progress.json, config.json, trainable.safetensors for adapters, files.json,
COMPLETE) and holds the trainer's own checkpoint (weights, optimizer, scheduler, RNG, data position) in `trainer/`,
so `--resume` continues exactly through `Trainer.train(resume_from_checkpoint=...)` and checkpoints.py verifies it.

Use: merge `footing_arguments(settings, validates)` into the trainer's config, then
`progress = train_with_footing(trainer, run_dir, settings, resumed_from)` instead of `trainer.train()`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from transformers import TrainerCallback

from tunesmith.config import TrainConfig
from tunesmith.train.checkpoints import (PROGRESS_FILE, WEIGHTS_FILE, checkpoint_path, staged_checkpoint,
                                         write_progress_and_config)
from tunesmith.train.loop import LoopProgress, StopSignals, TrainingStopped, non_finite_loss
from tunesmith.train.progress import LoopProgressBar

TRAINER_DIR = "trainer"
"""Inside a checkpoint: the TRL trainer's own checkpoint folder."""
BEST_WEIGHTS_FILE = "best_trainable.safetensors"
"""Inside a checkpoint: the trainable weights at the best validation loss so far (with early stopping only)."""


def footing_arguments(settings: TrainConfig, validates: bool) -> dict:
    """Trainer arguments the footing relies on: it decides when to save; validation every `train.eval_steps`."""
    return {
        "save_strategy": "no", "logging_steps": settings.logging_steps, "report_to": [], "disable_tqdm": True,
        "eval_strategy": "steps" if validates else "no",
        "eval_steps": settings.eval_steps or 0.25,  # a share of the run's steps: four validations per run, as SFT
    }


def train_with_footing(trainer, run_dir: Path, settings: TrainConfig, resumed_from: Path | None = None,
                       on_step=None) -> LoopProgress:
    """`trainer.train()`, continued exactly from `resumed_from` (one of our checkpoints) when given.

    Checkpoints every `train.checkpoint_steps`; SIGTERM/Ctrl-C saves one and raises TrainingStopped; a NaN/inf loss
    stops before its update; early stopping keeps the best weights. `on_step(progress, total_steps)` after each step."""
    from transformers import PrinterCallback, ProgressCallback

    footing = RunFooting(Path(run_dir), settings, on_step)
    if resumed_from is not None:
        footing.restore(resumed_from)
        # The run's own interval, not its share of the steps, so transformers sees no argument changed since then
        state = json.loads((resumed_from / TRAINER_DIR / "trainer_state.json").read_text(encoding="utf-8"))
        trainer.args.eval_steps = state["eval_steps"]
    trainer.add_callback(footing)
    for noisy in (PrinterCallback, ProgressCallback):  # the progress bar shows the losses
        trainer.remove_callback(noisy)
    _stop_on_non_finite_loss(trainer, footing.run_dir, settings)
    with StopSignals() as footing.signals:
        try:
            trainer.train(resume_from_checkpoint=str(resumed_from / TRAINER_DIR) if resumed_from else None)
        finally:
            footing.close_bar()
    footing.keep_best(trainer.model)
    return footing.progress


def footing_section(progress: LoopProgress, run_dir: Path, resumed_from: Path | None) -> dict:
    """The manifest `train` fields every method records under SFT's names (the overfitting check reads them)."""
    return {
        "resumed_from": resumed_from and str(resumed_from.relative_to(run_dir)),
        "loss_curve": progress.loss_curve,
        "validation_curve": progress.validation_curve,
        "stopped_early": progress.stop_reason == "early_stopping",
        "warnings": progress.warnings,
    }


def final_evaluation(log_history: list[dict], progress: LoopProgress) -> dict:
    """The trainer's evaluation metrics of the kept weights: the best step's after early stopping, else the last."""
    evaluations = [entry for entry in log_history if "eval_loss" in entry]
    if progress.best_weights_restored:
        evaluations = [entry for entry in evaluations if entry["step"] == progress.best_step]
    return evaluations[-1] if evaluations else {}


class RunFooting(TrainerCallback):
    """Keeps a LoopProgress as SFT's loop does and writes, restores and stops on it."""

    def __init__(self, run_dir: Path, settings: TrainConfig, on_step=None):
        self.run_dir, self.settings, self.on_step = run_dir, settings, on_step
        self.progress = LoopProgress()
        self.best_weights: dict | None = None
        self.signals: StopSignals | None = None
        self.bar: LoopProgressBar | None = None
        self.total_steps, self.reported_step, self.step_started = 0, 0, 0.0

    def restore(self, checkpoint: Path) -> None:
        """Progress and best weights of a checkpoint; the trainer restores its own state from `trainer/`."""
        from safetensors.torch import load_file

        self.progress = LoopProgress(**json.loads((checkpoint / PROGRESS_FILE).read_text(encoding="utf-8")))
        self.reported_step = self.progress.step
        if (checkpoint / BEST_WEIGHTS_FILE).is_file():
            self.best_weights = load_file(str(checkpoint / BEST_WEIGHTS_FILE))

    def on_train_begin(self, args, state, control, **kwargs):
        self.total_steps = state.max_steps
        self.bar = LoopProgressBar(state.max_steps, self.progress, enabled=state.is_world_process_zero).__enter__()

    def on_step_begin(self, args, state, control, **kwargs):
        self.report()  # the step before, now that its loss, validation and checkpoint are recorded
        self.step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        progress, every = self.progress, self.settings.checkpoint_steps
        progress.step = state.global_step
        progress.train_seconds += time.perf_counter() - self.step_started
        progress.tokens_seen = int(state.num_input_tokens_seen or 0)
        if state.global_step >= state.max_steps:
            control.should_log = True  # the last step's loss is on the curve, as SFT records it
        periodic = every and state.global_step % every == 0 and state.global_step < state.max_steps
        if periodic or self.signals.received:
            control.should_save = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:  # training logs; evaluations arrive in on_evaluate
            self.progress.loss_curve.append({"step": state.global_step, "loss": round(logs["loss"], 6)})

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        patience = self.settings.early_stopping_patience
        if self.progress.record_validation(metrics["eval_loss"], patience) and patience:
            self.best_weights = {name: p.detach().clone() for name, p in _trainable(model).items()}
        if self.progress.stop_reason:
            control.should_training_stop = True

    def on_save(self, args, state, control, model=None, **kwargs):
        trainer_checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"  # Trainer's own name
        path = self.seal(trainer_checkpoint, model) if state.is_world_process_zero else None
        if self.signals.received and not self.progress.stop_reason:
            self.report()
            raise TrainingStopped(state.global_step, path, self.signals.received)

    def on_train_end(self, args, state, control, **kwargs):
        self.report()

    def seal(self, trainer_checkpoint: Path, model) -> Path:
        """Move the trainer's checkpoint into one of ours, beside the loop progress, settings and adapter tensors."""
        from safetensors.torch import save_file

        step, settings = self.progress.step, self.settings
        with staged_checkpoint(self.run_dir, step, settings.keep_checkpoints) as staging:
            os.replace(trainer_checkpoint, staging / TRAINER_DIR)
            write_progress_and_config(staging, asdict(self.progress), settings.model_dump(mode="json"))
            if settings.adapter != "full":  # under the training names, as SFT's (a job exports it); small
                save_file(_on_cpu(_trainable(model)), str(staging / WEIGHTS_FILE))
            if self.best_weights is not None:
                save_file(_on_cpu(self.best_weights), str(staging / BEST_WEIGHTS_FILE))
        return checkpoint_path(self.run_dir, step)

    def report(self) -> None:
        """Progress bar and `on_step` for a step not reported yet."""
        if self.progress.step == self.reported_step:
            return
        self.reported_step = self.progress.step
        if self.bar:
            self.bar.update(self.progress)
        if self.on_step:
            self.on_step(self.progress, self.total_steps)

    def close_bar(self) -> None:
        if self.bar:
            self.bar.__exit__(None, None, None)

    def keep_best(self, model) -> None:
        """After early stopping, put back the weights of the best validation loss (as SFT does)."""
        progress = self.progress
        if self.best_weights is not None and progress.best_step != progress.step:
            model.load_state_dict(self.best_weights, strict=False)
            progress.best_weights_restored = True


def _stop_on_non_finite_loss(trainer, run_dir: Path, settings: TrainConfig) -> None:
    """Check each training loss before its backward pass, so a NaN/inf never reaches the weights."""
    import torch

    compute_loss = trainer.compute_loss

    def finite_loss(model, inputs, *args, **kwargs):
        result = compute_loss(model, inputs, *args, **kwargs)
        loss = (result[0] if isinstance(result, tuple) else result).detach()
        if model.training and not torch.isfinite(loss).all():
            raise non_finite_loss(loss.float().mean().item(), trainer.state.global_step + 1, run_dir, settings)
        return result

    trainer.compute_loss = finite_loss


def _trainable(model) -> dict:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _on_cpu(weights: dict) -> dict:
    return {name: tensor.detach().contiguous().cpu() for name, tensor in weights.items()}


def trl_training_model(run, parent, config, precision: str, resumed_from: Path | None):
    """The model a TRL trainer trains (a parent's adapter trained further), the config with its learning rate filled
    in, and (trainable, total) parameters; an earlier attempt's checkpoints go unless this run resumes from them."""
    import shutil

    from tunesmith.train.checkpoints import CHECKPOINTS_DIR
    from tunesmith.train.learning_rate import with_learning_rate
    from tunesmith.train.model_setup import build_training_model, trainable_parameter_counts
    from tunesmith.train.run_record import weights_source

    model_source, parent_adapter = weights_source(run, parent, config.train)
    model = build_training_model(model_source, config.train, precision, parent_adapter)
    config = config.model_copy(update={"train": with_learning_rate(config.train, model.config)})
    if not resumed_from:
        shutil.rmtree(run.directory / CHECKPOINTS_DIR, ignore_errors=True)  # an earlier attempt's, not this run's
    return model, config, trainable_parameter_counts(model)
