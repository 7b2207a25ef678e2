"""OpenAI's Files and Fine-tuning API shapes, field for field as the `openai` client reads and sends them."""

from __future__ import annotations

import re
from typing import Annotated, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, field_validator, model_validator

from tunesmith.jobs.records import Hyperparameters
from tunesmith.jobs.store import CheckpointRecord, EventRecord, FileRecord, JobRecord

Item = TypeVar("Item")
SUFFIX = re.compile(r"[A-Za-z0-9_-]{1,64}")
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512
Auto = Literal["auto"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _auto_or_between(low: float, high: float, above_low: bool = False) -> AfterValidator:
    """Accept "auto", or a number from `low` (above it with `above_low`) up to `high`."""

    def check(value):
        if value != "auto" and not (low < value <= high if above_low else low <= value <= high):
            raise ValueError(f"{value} is out of range; use a number {'above' if above_low else 'from'} {low} up to "
                             f"{high}, or 'auto'")
        return value

    return AfterValidator(check)


class SupervisedHyperparameters(_Strict):
    n_epochs: Annotated[int | Auto, _auto_or_between(1, 50)] = "auto"
    batch_size: Annotated[int | Auto, _auto_or_between(1, 256)] = "auto"
    learning_rate_multiplier: Annotated[float | Auto, _auto_or_between(0, 10, above_low=True)] = "auto"


class DpoHyperparameters(SupervisedHyperparameters):
    beta: Annotated[float | Auto, _auto_or_between(0, 2, above_low=True)] = "auto"


class SupervisedMethod(_Strict):
    hyperparameters: SupervisedHyperparameters = SupervisedHyperparameters()


class DpoMethod(_Strict):
    hyperparameters: DpoHyperparameters = DpoHyperparameters()


class Method(_Strict):
    type: str
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None

    @field_validator("type")
    @classmethod
    def _trained_here(cls, kind: str) -> str:
        if kind not in ("supervised", "dpo"):
            raise ValueError(f"{kind!r} is not trained here; use supervised or dpo")
        return kind

    @model_validator(mode="after")
    def _settings_match_type(self):
        other = "dpo" if self.type == "supervised" else "supervised"
        if getattr(self, other) is not None:
            raise ValueError(f"settings under `{other}` for a {self.type} job; put them under `{self.type}`")
        return self

    def chosen_hyperparameters(self) -> SupervisedHyperparameters | None:
        settings = getattr(self, self.type)
        return settings.hyperparameters if settings is not None else None


class JobCreate(BaseModel):
    """The body of `POST /v1/fine_tuning/jobs`."""

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = None
    metadata: dict[str, str] | None = None
    hyperparameters: SupervisedHyperparameters | None = None
    """Deprecated by OpenAI in favour of `method`; still accepted for supervised jobs."""
    method: Method | None = None
    integrations: list[dict] | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, body):
        unknown = sorted(set(body) - set(cls.model_fields)) if isinstance(body, dict) else []
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}; this server takes "
                             f"{', '.join(cls.model_fields)}")
        return body

    @field_validator("suffix")
    @classmethod
    def _suffix_shape(cls, suffix: str | None) -> str | None:
        if suffix is not None and not SUFFIX.fullmatch(suffix):
            raise ValueError(f"{suffix!r}: use 1-64 letters, digits, '-' or '_' (it becomes part of the model name)")
        return suffix

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, metadata: dict | None) -> dict | None:
        if metadata is None:
            return None
        if len(metadata) > METADATA_PAIRS:
            raise ValueError(f"{len(metadata)} pairs; at most {METADATA_PAIRS} are kept")
        for key, value in metadata.items():
            if len(key) > METADATA_KEY_CHARS or len(value) > METADATA_VALUE_CHARS:
                raise ValueError(f"key {key[:70]!r}: keys take at most {METADATA_KEY_CHARS} characters, values "
                                 f"{METADATA_VALUE_CHARS}")
        return metadata

    @field_validator("integrations")
    @classmethod
    def _no_integrations(cls, integrations: list | None) -> list | None:
        if integrations:
            raise ValueError("this server runs no integrations (such as wandb); leave the list empty")
        return integrations

    @model_validator(mode="after")
    def _one_place_for_hyperparameters(self):
        if self.hyperparameters is not None and self.method is not None:
            if self.method.type != "supervised" or self.method.chosen_hyperparameters() is not None:
                raise ValueError("hyperparameters given both at the top level (deprecated) and in `method`; "
                                 "give them in `method` only")
        return self

    def method_type(self) -> Literal["supervised", "dpo"]:
        return self.method.type if self.method else "supervised"

    def chosen_hyperparameters(self) -> Hyperparameters:
        """The job's settings in the runner's terms ("auto" where the caller left them out)."""
        chosen = (self.method.chosen_hyperparameters() if self.method else None) or self.hyperparameters
        return Hyperparameters(**chosen.model_dump()) if chosen else Hyperparameters()


# --- responses ---------------------------------------------------------------------------------------------------


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"

    @classmethod
    def of(cls, record: FileRecord) -> FileObject:
        return cls(id=record.id, bytes=record.bytes, created_at=record.created_at, filename=record.filename,
                   purpose=record.purpose)


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: SupervisedHyperparameters
    model: str
    organization_id: str = "org-tunesmith"
    result_files: list[str]
    seed: int
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"]
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None
    metadata: dict[str, str] | None
    method: Method
    integrations: list = []

    @classmethod
    def of(cls, job: JobRecord) -> FineTuningJob:
        chosen = job.hyperparameters
        supervised = SupervisedHyperparameters(**{name: chosen[name] for name in SupervisedHyperparameters.model_fields
                                                  if name in chosen})
        method = (Method(type="dpo", dpo=DpoMethod(hyperparameters=DpoHyperparameters(**chosen)))
                  if job.method == "dpo" else Method(type="supervised", supervised=SupervisedMethod(
                      hyperparameters=supervised)))
        return cls(id=job.id, created_at=job.created_at, error=JobError(**job.error) if job.error else None,
                   fine_tuned_model=job.fine_tuned_model, finished_at=job.finished_at, hyperparameters=supervised,
                   model=job.model, result_files=job.result_files, seed=job.seed, status=job.status,
                   trained_tokens=job.trained_tokens, training_file=job.training_file,
                   validation_file=job.validation_file, estimated_finish=job.estimated_finish,
                   metadata=job.metadata, method=method)


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict | None = None

    @classmethod
    def of(cls, event: EventRecord) -> FineTuningJobEvent:
        return cls(id=event.id, created_at=event.created_at, level=event.level, message=event.message,
                   type=event.type, data=event.data)


class CheckpointMetrics(BaseModel):
    model_config = ConfigDict(extra="ignore")

    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class FineTuningJobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int

    @classmethod
    def of(cls, checkpoint: CheckpointRecord) -> FineTuningJobCheckpoint:
        return cls(id=checkpoint.id, created_at=checkpoint.created_at,
                   fine_tuned_model_checkpoint=checkpoint.fine_tuned_model_checkpoint,
                   fine_tuning_job_id=checkpoint.job_id, metrics=CheckpointMetrics(**checkpoint.metrics),
                   step_number=checkpoint.step_number)


class Page(BaseModel, Generic[Item]):
    """OpenAI's cursor page: pass the last item's id as `after` for the next one while `has_more`."""

    object: Literal["list"] = "list"
    data: list[Item]
    has_more: bool


class FilePage(Page[FileObject]):
    first_id: str | None = None
    last_id: str | None = None
