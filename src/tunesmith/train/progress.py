"""Rich progress bars for training: steps, live loss, tokens per second, time left."""

from __future__ import annotations

import time

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from transformers import TrainerCallback

from tunesmith.progress_display import LoggedProgress


class RichProgressCallback(TrainerCallback):
    def __init__(self):
        self.progress: LoggedProgress | None = None
        self.task = None
        self.started = 0.0
        self.loss = float("nan")

    def on_train_begin(self, args, state, control, **kwargs):
        self.progress = LoggedProgress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} tok/s"), TimeRemainingColumn(), transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, loss="-", speed="-")
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.progress.update(self.task, completed=state.global_step,
                             speed=f"{state.num_input_tokens_seen / elapsed:,.0f}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and self.progress:
            self.progress.update(self.task, loss=f"{logs['loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress:
            self.progress.stop()


class LoopProgressBar:
    """A rich progress bar over a LoopProgress (SFT's loop, TRL trainers via trl_footing): steps, losses, tok/s."""

    def __init__(self, total_steps: int, progress, enabled: bool = True):
        self.total_steps, self.enabled, self.start_step = total_steps, enabled, progress.step
        self.bar: LoggedProgress | None = None
        self.task = None

    def __enter__(self):
        if self.enabled:
            self.bar = LoggedProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                TextColumn("val {task.fields[val]}"), TextColumn("{task.fields[speed]} tok/s"), TimeRemainingColumn(),
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=self.total_steps, completed=self.start_step, loss="-",
                                          val="-", speed="-")
        return self

    def update(self, progress) -> None:
        if not self.bar:
            return
        loss = f"{progress.loss_curve[-1]['loss']:.4f}" if progress.loss_curve else "-"
        val = f"{progress.validation_curve[-1]['loss']:.4f}" if progress.validation_curve else "-"
        speed = f"{progress.tokens_seen / max(progress.train_seconds, 1e-9):,.0f}"
        self.bar.update(self.task, completed=progress.step, loss=loss, val=val, speed=speed)

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()
        return False
