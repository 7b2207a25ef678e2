"""The run contract: typed records of what each stage writes into a run directory (`manifest.json`,
`eval/report.json`). Stages read them through `registry.run.Run`, never as raw dicts. stdlib + pydantic only.

The request log (`request_log.py`) holds one `RequestLogRecord` per line; serving writes it, monitoring and
`tunesmith logs export` read it.

Sections keep keys they do not name (`extra="allow"`), so a report written by a newer tunesmith still loads;
the fields named here are the ones other stages rely on, and they are checked on every read.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MANIFEST_VERSION = 2
"""1: the layout before typed records (no `version` key; same sections). 2: adds `version`, the trained
weights' hash and the base model's weights hash."""
REPORT_VERSION = 2
"""1: every model against the base. 2: adds `against_parent` and `against_prompting` (both optional, so version 1
reports still load)."""

DataKind = Literal["sft", "preference", "unpaired_preference"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")


class BaseModelRef(_Record):
    name: str
    """As the config named it: `default`, a folder, or a Hub id."""
    source: str
    """What `from_pretrained` loaded: the resolved folder or Hub id."""


class CurvePoint(_Record):
    step: int
    loss: float


class ReplaySection(_Record):
    """General rows mixed into SFT training beside the training split (`data.replay`)."""

    source: str
    """`self_distill` (the base model's own answers to tunesmith's general prompts) or the replay data file."""
    share: float
    rows: int
    file: str = "data/replay.jsonl"
    sha256: str
    """Hash of the replay file, checked before training reads it."""


class DataSection(_Record):
    kind: DataKind = "sft"
    train_file: str = "data/train.jsonl"
    validation_file: str = "data/validation.jsonl"
    card: str = "data/card.md"
    dropped_file: str | None = None
    rows: dict[str, int]
    accounting: dict = Field(default_factory=dict)
    """Rows read, kept, dropped (by reason) and flagged."""
    tokens: dict = Field(default_factory=dict)
    """Token statistics per split (see the data card)."""
    dataset_hash: str
    """Content version of the data: the same rows give the same hash, whatever their order or file names."""
    train_hash: str | None = None
    validation_hash: str | None = None
    chat_template_sha: str
    """Fingerprint of the chat template the data was checked with; training, evaluation and serving must match it."""
    replay: ReplaySection | None = None
    """Replay rows trained on beside the training split; not part of the dataset hash."""


class ParentRef(_Record):
    """The earlier run a run continued from (`train.init_from`)."""

    run_dir: str
    name: str | None = None
    method: str | None = None
    data_hash: str | None = None


class TrainSection(_Record):
    method: str
    adapter: str
    adapter_dir: str | None = None
    model_dir: str | None = None
    parent: ParentRef | None = None
    data_hash: str
    base_model: BaseModelRef
    config: dict
    precision: str | None = None
    metrics: dict[str, float | int | None] = Field(default_factory=dict)
    loss_curve: list[CurvePoint] = Field(default_factory=list)
    validation_curve: list[CurvePoint] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    wall_time_s: float | None = None
    weights_sha256: str | None = None
    """Hash of the trained files (see `registry.hashing.folder_sha256`); absent in runs trained before version 2."""

    @property
    def weights_subdir(self) -> str:
        return self.adapter_dir or self.model_dir

    @property
    def full_fine_tune(self) -> bool:
        return not self.adapter_dir


class GateOutcome(_Record):
    gate: str
    model: str
    metric: str
    value: float
    threshold: float
    margin: float
    passed: bool


class EvaluateSection(_Record):
    report: str
    results: dict[str, dict[str, float]]
    gates: list[GateOutcome] = Field(default_factory=list)
    passed: bool = True


class Manifest(_Record):
    """`manifest.json`: one section per stage that ran, plus what the run was made from."""

    version: int = 1
    name: str
    base_model: BaseModelRef
    data: DataSection
    train: TrainSection | None = None
    evaluate: EvaluateSection | None = None
    environment: dict = Field(default_factory=dict)
    tracking: dict | None = None
    """The MLflow run this run was logged to: {uri, run_id, weights_sha256}."""


class LostGround(_Record):
    """A metric on which the run is significantly worse than its parent (paired test on the same examples)."""

    metric: str
    parent: float
    child: float
    delta: float
    p_value: float


class ParentComparison(_Record):
    """The run against the run it continued from (`train.init_from`): child minus parent, per metric."""

    label: str
    """The parent's label in `results` (`parent`, or `champion` when the parent is the champion being evaluated)."""
    run_dir: str
    name: str | None = None
    metrics: dict[str, dict]
    lost_ground: list[LostGround] = Field(default_factory=list)
    """Every metric the child is significantly worse on; empty when it lost nothing."""


class PromptingComparison(_Record):
    """Fine-tuning against prompting the base model with k training examples: fine-tuned minus prompt baseline."""

    examples_per_prompt: int
    selection: str
    metrics: dict[str, dict]
    extra_prompt_tokens: float
    """Mean prompt tokens the few-shot turns add to each request (what the fine-tuned model saves)."""
    prompt_token_price: float
    """Price of 1M prompt tokens (evaluate.prompt_token_price)."""
    cost_per_million_requests: float
    """What the extra prompt tokens of 1M requests cost at that price."""


class EvaluationReport(_Record):
    """`eval/report.json`: every model's scores on the same held-out examples, compared with the base (and with
    the run's parent and a prompting baseline, when evaluated)."""

    version: int = REPORT_VERSION
    run: str
    base_model: BaseModelRef
    examples: int
    data_hash: str
    models: dict[str, dict]
    generation: dict
    results: dict[str, dict[str, float]]
    intervals: dict[str, dict[str, list[float]]] = Field(default_factory=dict)
    confidence: float = 0.95
    comparisons: dict[str, dict] = Field(default_factory=dict)
    overfitting: dict = Field(default_factory=dict)
    gates: list[GateOutcome] = Field(default_factory=list)
    passed: bool = True
    against_parent: ParentComparison | None = None
    against_prompting: PromptingComparison | None = None


LINEAGE_VERSION = 1


class CodeVersion(_Record):
    tunesmith: str | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None


class Lineage(_Record):
    """Where a registered version came from: data, base model, config, code, parent, evaluation."""

    version: int = LINEAGE_VERSION
    model: str
    run_name: str
    content_id: str
    """sha256 of the trained weights' hash, the training config and the data hash: the version's identity."""
    weights_sha256: str
    files_sha256: str
    """Hash of every file in the registered run snapshot (see `registry.hashing.folder_manifest`)."""
    data: dict
    base_model: dict
    """name, source, and the sha256 of its weight files when it is a local folder."""
    config: dict
    train: dict
    code: CodeVersion
    environment: dict = Field(default_factory=dict)
    parent: dict | None = None
    """The parent run (`train.init_from`) and, when it was registered, its version."""
    evaluation: dict | None = None
    """Results against the base with intervals and gates, from the run's evaluation report."""
    registered_at: str


class ExportRecord(_Record):
    format: str
    dtype: str | None = None
    path: str
    files: dict[str, str]
    """File name -> sha256."""
    bytes: int
    seconds: float
    checks: dict = Field(default_factory=dict)
    """Agreement with base + adapter (or with the merged model), largest logit difference, perplexity change."""
    created_at: str


class AliasMove(_Record):
    model: str
    alias: str
    kind: Literal["promote", "rollback", "set"]
    from_version: str | None = None
    to_version: str
    when: str
    why: str
    evidence: dict = Field(default_factory=dict)


class VersionInfo(_Record):
    """A registered version as `tunesmith registry show` prints it."""

    model: str
    version: str
    aliases: list[str] = Field(default_factory=list)
    mlflow_run_id: str | None = None
    source: str
    lineage: Lineage
    exports: list[ExportRecord] = Field(default_factory=list)


REQUEST_LOG_VERSION = 1
"""1: the first request log layout (`requests.jsonl`, one record per line)."""


class RequestLogRecord(_Record):
    """One line of the request log: a request the server answered (or refused), and what it answered."""

    version: int = REQUEST_LOG_VERSION
    id: str
    """The response id the client got (`chatcmpl-...`, `cmpl-...`)."""
    time: str
    """When the request arrived: ISO-8601 UTC with milliseconds (`request_log.utc_timestamp`)."""
    endpoint: Literal["chat", "completions"]
    key_id: str | None = None
    """The API key's id (never the key itself); None when the server runs without keys."""
    key_name: str | None = None
    """The API key's human name, as configured."""
    user: str | None = None
    """The OpenAI `user` field the client sent."""
    model: str
    """The model name the client asked for."""
    served: str
    """The served name that answered, e.g. `orders@production` or `orders@candidate`."""
    registry_model: str | None = None
    registry_version: str | None = None
    route: str | None = None
    """The public route name, when traffic routing chose the arm."""
    arm: str | None = None
    """The arm traffic routing chose."""
    shadow: bool = False
    """This answer was a shadow copy, not returned to the client."""
    messages: list[dict] | None = None
    """Chat messages as sent (chat endpoint); None for completions or when the content was not kept."""
    prompt: str | None = None
    """The prompt (completions endpoint); None for chat or when the content was not kept."""
    answers: list[str] = Field(default_factory=list)
    """One answer per choice; empty when the content was not kept or the request failed."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float
    """Seconds from arrival to the last token."""
    ttft_s: float | None = None
    """Seconds from arrival to the first token (streamed answers)."""
    finish_reason: str | None = None
    """Why choice 0 stopped: `stop`, `length`, ..."""
    status: int
    """The HTTP status the client got."""
    error: str | None = None
    """The error message the client got, when the status is not 200."""
    json_valid: bool | None = None
    """Whether choice 0 parsed as JSON, when the request asked for JSON; None otherwise."""
    content: Literal["full", "redacted", "none"] = "full"
    """What this record kept of messages, prompt and answers: as sent, PII-redacted, or nothing."""

    @field_validator("time")
    @classmethod
    def _utc_iso_time(cls, time: str) -> str:
        try:
            moment = datetime.fromisoformat(time)
        except ValueError:
            raise ValueError(f"time {time!r} is not ISO-8601 (e.g. 2026-11-30T12:00:00.000Z)") from None
        if moment.tzinfo is None:
            raise ValueError(f"time {time!r} has no time zone; write UTC (a trailing Z)")
        return time


FEEDBACK_VERSION = 1
"""1: the first feedback layout (`feedback.jsonl` beside the request log, one record per line)."""


class FeedbackRecord(_Record):
    """A caller's verdict on one logged answer (`POST /v1/feedback`): what monitoring counts and the next training
    set is made of."""

    version: int = FEEDBACK_VERSION
    id: str
    """`fb-...`"""
    time: str
    """When it arrived: ISO-8601 UTC with milliseconds."""
    completion_id: str
    """The `id` of the answer it judges (a request log record's id)."""
    key_id: str | None = None
    """The API key that sent it; only the key that got the answer may judge it."""
    rating: Literal["positive", "negative", "neutral"]
    corrected: str | None = None
    """The answer the caller wanted instead (becomes the training target)."""
    comment: str | None = None
