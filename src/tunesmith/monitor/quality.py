"""Output quality over time and callers' feedback, per window and per served version (route arm), from the log.

The log's records are reduced to the columns monitoring needs as they stream past (`RequestTable`), so 100k
requests cost a few arrays, not 100k pydantic records.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field, computed_field

from tunesmith.errors import TunesmithError
from tunesmith.monitor.drift import last_user_text
from tunesmith.records import FeedbackRecord, RequestLogRecord

REFUSAL_PHRASES = ("i can't help", "i cannot help", "i can't assist", "i cannot assist", "i'm sorry, but",
                   "i am sorry, but", "i'm unable to", "i am unable to", "i won't be able to", "as an ai",
                   "i can't comply", "i cannot comply", "i must decline")
"""An answer containing one of these (lower-cased) counts as a refusal."""
FORMAT_CHECKS = ("schema_valid", "regex_match")
"""`AnswerFormat` checks; each is a quality column `<name>_rate`."""


@dataclass
class RequestTable:
    """One entry per logged request of the monitored model (shadow copies included), in log order."""

    ids: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    """Arrival, seconds since the epoch."""
    arms: list[str] = field(default_factory=list)
    """`served`, then ` (shadow)` for shadow copies: the version (route arm) that answered."""
    status: list[int] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    """NaN when the answer was not streamed."""
    stopped: list[bool] = field(default_factory=list)
    answers: list[str | None] = field(default_factory=list)
    """Choice 0 of an answered request whose text was kept; None otherwise."""
    json_logged: list[bool | None] = field(default_factory=list)
    prompts: list[str | None] = field(default_factory=list)
    """The last user message (chat) or the prompt (completions); None for shadow copies and dropped texts."""
    versions: Counter = field(default_factory=Counter)
    """(registry model, registry version) -> requests it answered."""

    def add(self, record: RequestLogRecord) -> None:
        self.ids.append(record.id)
        self.times.append(datetime.fromisoformat(record.time).timestamp())
        self.arms.append(record.served + (" (shadow)" if record.shadow else ""))
        self.status.append(record.status)
        self.latency.append(record.latency_s)
        self.ttft.append(np.nan if record.ttft_s is None else record.ttft_s)
        self.stopped.append(record.finish_reason == "stop")
        kept = record.status == 200 and record.content != "none" and bool(record.answers)
        self.answers.append(record.answers[0] if kept else None)
        self.json_logged.append(record.json_valid)
        prompt = record.prompt if record.endpoint == "completions" else last_user_text(record.messages)
        self.prompts.append(None if record.shadow else prompt)
        if record.registry_model and record.registry_version:
            self.versions[record.registry_model, record.registry_version] += 1

    def __len__(self) -> int:
        return len(self.ids)


class QualityRow(BaseModel):
    """What one arm answered in one window (or over the whole period, `window` None)."""

    window: str | None
    arm: str
    requests: int
    server_error_rate: float
    """Share of requests answered with status >= 500."""
    client_error_rate: float
    """Share answered 4xx (the caller's mistake, or a limit)."""
    stop_rate: float | None
    """Share of answered (200) requests whose choice 0 ended with finish_reason `stop` (not cut at max_tokens)."""
    answer_chars: float | None
    """Mean length of choice 0 in characters, over answers whose text was kept."""
    empty_rate: float | None
    refusal_rate: float | None
    json_valid_rate: float | None
    """Share of checked answers that parse as JSON: logged `json_valid`, else parsed when training answers are JSON."""
    json_checked: int
    schema_valid_rate: float | None = None
    """Share of kept answers that parse as JSON and validate against `--json-schema` (None: no schema given)."""
    regex_match_rate: float | None = None
    """Share of kept answers that `--regex` fully matches (None: no pattern given)."""
    format_checked: int = 0
    """Kept answers checked against `--json-schema` and `--regex`."""
    latency_p50: float | None
    latency_p95: float | None
    ttft_p50: float | None


@dataclass(frozen=True)
class AnswerFormat:
    """What every answer must look like beyond valid JSON: a JSON schema to validate against, a pattern to match."""

    schema_valid: Callable[[str], bool] | None = None
    regex_match: Callable[[str], bool] | None = None

    @property
    def checks(self) -> dict[str, Callable[[str], bool]]:
        """Column name -> the check, for the checks given."""
        return {name: check for name, check in zip(FORMAT_CHECKS, (self.schema_valid, self.regex_match))
                if check is not None}


def answer_format(json_schema: Path | None = None, regex: str | None = None) -> AnswerFormat:
    """`--json-schema FILE` and `--regex PATTERN` as checks of an answer; a bad schema or pattern is a user error."""
    return AnswerFormat(_schema_check(Path(json_schema)) if json_schema is not None else None,
                        _regex_check(regex) if regex is not None else None)


def _schema_check(path: Path) -> Callable[[str], bool]:
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TunesmithError(f"--json-schema {path}: cannot read it ({exc.strerror or exc}); give a JSON Schema "
                             "file") from None
    except ValueError as exc:
        raise TunesmithError(f"--json-schema {path}: not JSON ({exc}); give a JSON Schema file") from None
    if not isinstance(schema, (dict, bool)):
        raise TunesmithError(f"--json-schema {path}: not a JSON Schema (an object, or true/false); give a JSON "
                             "Schema file")
    validator_type = validator_for(schema)
    try:
        validator_type.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(map(str, exc.path)) or "the top level"
        raise TunesmithError(f"--json-schema {path}: not a valid JSON Schema at {where} ({exc.message}); fix the "
                             "schema") from None
    validator = validator_type(schema, format_checker=validator_type.FORMAT_CHECKER)

    def schema_valid(answer: str) -> bool:
        try:
            return validator.is_valid(json.loads(answer))
        except ValueError:
            return False

    return schema_valid


def _regex_check(pattern: str) -> Callable[[str], bool]:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise TunesmithError(f"--regex {pattern!r}: not a valid regular expression ({exc}); fix the pattern "
                             "(Python re syntax)") from None
    return lambda answer: compiled.fullmatch(answer) is not None


def is_refusal(answer: str) -> bool:
    lowered = answer.lower()
    return any(phrase in lowered for phrase in REFUSAL_PHRASES)


def parses_as_json(text: str) -> bool:
    """An object or array, as a JSON answer would be (a bare number or word is not counted)."""
    try:
        return isinstance(json.loads(text), (dict, list))
    except ValueError:
        return False


def quality_rows(table: RequestTable, windows: np.ndarray, starts: list[str], parse_json: bool,
                 answers_must: AnswerFormat = AnswerFormat()) -> list[QualityRow]:
    """Per arm over the whole period (window None), then per window and arm; `windows[i]`: request i's window."""
    status = np.asarray(table.status)
    columns = {"status": status, "latency": np.asarray(table.latency, dtype=float),
               "ttft": np.asarray(table.ttft, dtype=float), "stopped": np.asarray(table.stopped, dtype=bool),
               "answered": status == 200, **_answer_columns(table, parse_json, answers_must)}
    arms = np.asarray(table.arms, dtype=object)
    rows = [_row(None, arm, columns, arms == arm) for arm in sorted(set(table.arms))]
    for number, start in enumerate(starts):
        in_window = windows == number
        rows += [_row(start, arm, columns, in_window & (arms == arm)) for arm in sorted(set(arms[in_window]))]
    return rows


def _answer_columns(table: RequestTable, parse_json: bool, answers_must: AnswerFormat) -> dict[str, np.ndarray]:
    """Per request: answer kept, its length, empty, refusal, JSON checked and JSON valid, and each format check."""
    size = len(table)
    kept, chars, empty, refusal = (np.zeros(size, bool), np.zeros(size), np.zeros(size, bool), np.zeros(size, bool))
    json_checked, json_valid = np.zeros(size, bool), np.zeros(size, bool)
    formats = {name: (check, np.zeros(size, bool)) for name, check in answers_must.checks.items()}
    for i, (answer, logged) in enumerate(zip(table.answers, table.json_logged)):
        if logged is not None:
            json_checked[i], json_valid[i] = True, logged
        if answer is None:
            continue
        kept[i], chars[i], empty[i], refusal[i] = True, len(answer), not answer.strip(), is_refusal(answer)
        if logged is None and parse_json:
            json_checked[i], json_valid[i] = True, parses_as_json(answer)
        for check, passed in formats.values():
            passed[i] = check(answer)
    return {"kept": kept, "chars": chars, "empty": empty, "refusal": refusal, "json_checked": json_checked,
            "json_valid": json_valid, **{name: passed for name, (_, passed) in formats.items()}}


def _row(window: str | None, arm: str, columns: dict[str, np.ndarray], mask: np.ndarray) -> QualityRow:
    status, answered = columns["status"][mask], columns["answered"][mask]
    kept, json_checked = columns["kept"][mask], columns["json_checked"][mask]
    latency = columns["latency"][mask][answered]
    ttft = columns["ttft"][mask][answered]
    ttft = ttft[~np.isnan(ttft)]
    return QualityRow(
        window=window, arm=arm, requests=int(mask.sum()),
        server_error_rate=_share(status >= 500), client_error_rate=_share((status >= 400) & (status < 500)),
        stop_rate=_share(columns["stopped"][mask][answered]),
        answer_chars=_mean(columns["chars"][mask][kept]), empty_rate=_share(columns["empty"][mask][kept]),
        refusal_rate=_share(columns["refusal"][mask][kept]),
        json_valid_rate=_share(columns["json_valid"][mask][json_checked]), json_checked=int(json_checked.sum()),
        **{f"{name}_rate": _share(columns[name][mask][kept]) for name in FORMAT_CHECKS if name in columns},
        format_checked=int(kept.sum()) if any(name in columns for name in FORMAT_CHECKS) else 0,
        latency_p50=_percentile(latency, 50), latency_p95=_percentile(latency, 95), ttft_p50=_percentile(ttft, 50))


def _share(flags: np.ndarray) -> float | None:
    return round(float(flags.mean()), 4) if len(flags) else None


def _mean(values: np.ndarray) -> float | None:
    return round(float(values.mean()), 1) if len(values) else None


def _percentile(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if len(values) else None


class FeedbackRow(BaseModel):
    """Callers' verdicts on one arm's answers."""

    arm: str
    positive: int = 0
    negative: int = 0
    neutral: int = 0

    @computed_field
    @property
    def total(self) -> int:
        return self.positive + self.negative + self.neutral

    @computed_field
    @property
    def negative_rate(self) -> float | None:
        return round(self.negative / self.total, 4) if self.total else None


class FeedbackSummary(BaseModel):
    arms: list[FeedbackRow] = Field(default_factory=list)
    unmatched: int = 0
    """Feedback naming a completion id not in the log read (an older request, or a wrong id)."""
    other_models: int = 0
    """Feedback on other models' answers (not counted here)."""


def feedback_summary(feedback: Iterable[FeedbackRecord], table: RequestTable, logged_ids: set[str]) -> FeedbackSummary:
    """Feedback joined to the monitored requests on completion id; the rest counted as unmatched or other models'."""
    arm_of = dict(zip(table.ids, table.arms))
    rows: dict[str, FeedbackRow] = {}
    summary = FeedbackSummary()
    for record in feedback:
        arm = arm_of.get(record.completion_id)
        if arm is None:
            if record.completion_id in logged_ids:
                summary.other_models += 1
            else:
                summary.unmatched += 1
            continue
        row = rows.setdefault(arm, FeedbackRow(arm=arm))
        setattr(row, record.rating, getattr(row, record.rating) + 1)
    summary.arms = [rows[arm] for arm in sorted(rows)]
    return summary
