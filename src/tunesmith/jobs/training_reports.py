"""What a job reports about its training: a metrics event per step, a line per checkpoint, the step-metrics CSV."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

from tunesmith.jobs.checkpoint_export import CheckpointExporter
from tunesmith.jobs.job_folder import JobFolder
from tunesmith.jobs.records import CheckpointLine
from tunesmith.records import TrainSection
from tunesmith.registry.run_dir import write_text_atomic
from tunesmith.train.checkpoints import PROGRESS_FILE, complete_checkpoints

EXPORTED_CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_ADAPTER = "adapter"
"""Inside a checkpoint's folder: its peft adapter (the folder itself is a servable run directory)."""
STEP_METRICS_FILE = "step_metrics.csv"
STEP_METRICS_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")


class TrainingReporter:
    """Turns what training writes (loop progress, checkpoints, the manifest) into the job's events and checkpoints."""

    def __init__(self, folder: JobFolder, fine_tuned_model: str, exporter: CheckpointExporter):
        self.folder, self.fine_tuned_model, self.exporter = folder, fine_tuned_model, exporter
        self.reported = folder.reported_checkpoint_steps()

    def on_step(self, progress, total_steps: int) -> None:
        """After each training step: any checkpoint training wrote after the step before, then this step's metrics."""
        self.report_new_checkpoints()
        self.folder.metrics(step_metrics(progress.step, total_steps, progress.loss_curve, progress.validation_curve,
                                         progress.tokens_seen))

    def report_new_checkpoints(self) -> None:
        """A CheckpointLine (and an exported adapter) for each complete training checkpoint not reported yet."""
        for checkpoint in complete_checkpoints(self.folder.run_dir):
            progress = json.loads((checkpoint / PROGRESS_FILE).read_text(encoding="utf-8"))
            if progress["step"] in self.reported:
                continue
            exported = self.exporter.export(checkpoint, self._exported(progress["step"]))
            self._report(progress["step"], exported, progress["loss_curve"], progress["validation_curve"])

    def report_trained(self, trained: TrainSection, run_dir: Path) -> None:
        """The finished model as the job's last checkpoint."""
        steps = int(trained.metrics.get("steps") or 0)
        losses = [point.model_dump() for point in trained.loss_curve]
        validation = [point.model_dump() for point in trained.validation_curve]
        if steps not in self.reported:
            exported = self.exporter.copy_trained(run_dir / trained.weights_subdir, self._exported(steps))
            self._report(steps, exported, losses, validation)

    def _exported(self, step: int) -> Path:
        return self.folder.directory / EXPORTED_CHECKPOINTS_DIR / f"step-{step}" / CHECKPOINT_ADAPTER

    def _servable(self, step: int, adapter: Path) -> Path:
        """The checkpoint's folder as a run directory a server opens like any other (`tunesmith serve PATH`): the
        job run's manifest, trained with this adapter, whose hash is checked before it loads."""
        from tunesmith.registry.hashing import folder_sha256
        from tunesmith.registry.run import Run, write_manifest

        run = Run.open(self.folder.run_dir)
        train = TrainSection(method="sft", adapter="lora", adapter_dir=CHECKPOINT_ADAPTER,
                             data_hash=run.manifest.data.dataset_hash, base_model=run.manifest.base_model,
                             config={}, weights_sha256=folder_sha256(adapter))
        manifest = run.manifest.model_copy(update={"name": f"ckpt-step-{step}", "train": train, "evaluate": None})
        write_manifest(adapter.parent / "manifest.json", manifest)
        return adapter.parent

    def _report(self, step: int, adapter: Path, losses: list[dict], validation: list[dict]) -> None:
        path = self._servable(step, adapter)
        metrics = step_metrics(step, None, losses, validation, None)
        if "valid_loss" in metrics:
            metrics["full_valid_loss"] = metrics["valid_loss"]  # tunesmith validates on the whole split
        self.folder.checkpoint(CheckpointLine(
            created_at=int(time.time()), step_number=step, metrics=metrics, path=str(path.resolve()),
            fine_tuned_model_checkpoint=f"{self.fine_tuned_model}:ckpt-step-{step}"))
        self.folder.event(f"Checkpoint created at step {step}")
        self.reported.add(step)


def step_metrics(step: int, total_steps: int | None, losses: list[dict], validation: list[dict],
                 trained_tokens: int | None) -> dict:
    """OpenAI's metrics of one step, from tunesmith's loss curves; what is not known is left out."""
    data = {"step": step, "total_steps": total_steps, "train_loss": _at(losses, step),
            "valid_loss": _at(validation, step), "trained_tokens": trained_tokens}
    return {name: value for name, value in data.items() if value is not None}


def write_step_metrics(trained: TrainSection, job_dir: Path) -> Path:
    """OpenAI's result file: `step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy`, a row per step."""
    validation = {point.step: point.loss for point in trained.validation_curve}
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(STEP_METRICS_COLUMNS)
    for point in trained.loss_curve:  # tunesmith measures no token accuracy: those columns stay empty
        writer.writerow([point.step, point.loss, "", validation.get(point.step, ""), ""])
    path = Path(job_dir) / STEP_METRICS_FILE
    write_text_atomic(path, text.getvalue())
    return path


def _at(curve: list[dict], step: int) -> float | None:
    return next((point["loss"] for point in reversed(curve) if point["step"] == step), None)
