"""The files a fine-tuning job's supervisor and its runner process talk through, as typed records.

A job's folder (`<home>/jobs/runs/<job id>/`):
  job.json            JobSpec, written by the supervisor before it starts the runner
  events.jsonl        JobEventLine per line, appended by the runner (fsync'd)
  checkpoints.jsonl   CheckpointLine per line, appended by the runner when a checkpoint is complete
  result.json         JobResult, written once (atomically) by the runner when the job ends for good
  run/                the tunesmith run directory (prepare, train, evaluate), so `--resume` finds its checkpoints

The runner is `python -m tunesmith.jobs.runner JOB_DIR`; SIGTERM makes it save a checkpoint and exit 143 without
a result (the supervisor then marks the job paused or cancelled, as was asked, and starting the runner again on
the same folder resumes from the newest checkpoint).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

JOB_RECORDS_VERSION = 1


class _Line(BaseModel):
    model_config = ConfigDict(extra="allow")


class Hyperparameters(_Line):
    """OpenAI's names; "auto" leaves tunesmith's default (see jobs.config_mapping for the mapping)."""

    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"
    beta: float | Literal["auto"] = "auto"
    """DPO only."""


class JobSpec(_Line):
    version: int = JOB_RECORDS_VERSION
    job_id: str
    """`ftjob-...`"""
    owner: str | None
    """The API key id that created the job (None: a server without keys)."""
    owner_name: str | None
    """The API key's name, used in the `ft:` model name (None: `tunesmith`)."""
    model: str
    """The base as the client named it (`SmolLM2-135M-Instruct`, or a name from serve.jobs.models)."""
    base_model: str
    """What tunesmith's config takes as `base_model`: `default`, a local folder or a Hub id."""
    method: Literal["supervised", "dpo"] = "supervised"
    hyperparameters: Hyperparameters = Hyperparameters()
    training_file: str
    """Absolute path of the uploaded training file's bytes."""
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = None
    fine_tuned_model: str
    """The name the result will be served under: `ft:<base>:<owner name>:<suffix>:<job id>`."""


class JobEventLine(_Line):
    created_at: int
    """Unix seconds."""
    level: Literal["info", "warn", "error"] = "info"
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict | None = None
    """metrics events: {step, total_steps, train_loss, valid_loss, train_mean_token_accuracy, trained_tokens}."""


class CheckpointLine(_Line):
    created_at: int
    step_number: int
    metrics: dict
    """{step, train_loss, valid_loss, full_valid_loss, train_mean_token_accuracy, ...} as OpenAI reports them."""
    path: str
    """Folder with the checkpoint's adapter (safetensors) that a server can load."""
    fine_tuned_model_checkpoint: str
    """`<fine_tuned_model>:ckpt-step-<N>`"""


class JobError(_Line):
    code: str
    """OpenAI-style: invalid_training_file, invalid_validation_file, invalid_hyperparameters, training_failed, ..."""
    message: str
    param: str | None = None


class JobResult(_Line):
    version: int = JOB_RECORDS_VERSION
    status: Literal["succeeded", "failed"]
    fine_tuned_model: str | None = None
    registry_reference: str | None = None
    """`NAME@VERSION` of the registered result, which a server loads to serve `fine_tuned_model`."""
    trained_tokens: int | None = None
    result_files: list[str] = []
    """Absolute paths of files to publish as the job's result files (step metrics CSV, evaluation report)."""
    error: JobError | None = None
