"""`monitor`: one model's production traffic, from the request log's files, against the data it was trained on.

Reads the request log and feedback (never the live server), the training prompts of the registry versions that
answered (or `--training-data`), and returns a `MonitorReport`: input drift, output quality per window and arm,
feedback, and the checks a `--fail-on` judges.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from tunesmith.errors import TunesmithError
from tunesmith.monitor.drift import InputDrift, input_drift, whitespace_tokens
from tunesmith.monitor.quality import (FeedbackSummary, QualityRow, RequestTable, answer_format, feedback_summary,
                                       parses_as_json, quality_rows)

MONITOR_REPORT_VERSION = 1
"""1: the first monitoring report layout."""
JSON_ANSWERS_SHARE = 0.9
"""Training answers count as JSON (so logged answers are parsed) when at least this share of them parse."""
MAX_WINDOWS = 1000
TOKENIZE_CHUNK = 10_000


class Thresholds(BaseModel):
    """What counts as drift and as a quality problem; each is a `tunesmith monitor` option."""

    psi: float = 0.25
    """A prompt statistic drifts when its PSI exceeds this (and its KS test is significant at `alpha`)."""
    domain_auc: float = 0.55
    """The domain classifier flags drift when its cross-validated ROC AUC exceeds this (0.5: no difference) and a
    Mann-Whitney test of its scores is significant at `alpha`."""
    alpha: float = 0.05
    """Significance level of those tests, so that a small sample's noisy PSI or AUC does not flag drift alone."""
    max_server_error_rate: float = 0.05
    max_empty_rate: float = 0.05
    max_refusal_rate: float = 0.10
    min_json_valid_rate: float = 0.95
    """Judged only where answers were checked (JSON asked for, or JSON training answers)."""
    min_schema_valid_rate: float = 0.95
    """Judged only with `--json-schema`."""
    min_regex_match_rate: float = 0.95
    """Judged only with `--regex`."""
    max_latency_p95: float | None = None
    """Seconds; not judged unless set."""
    max_negative_feedback_rate: float = 0.25
    min_requests: int = 20
    """An arm with fewer requests (or feedback ratings) in the period is reported but not judged."""


class Check(BaseModel):
    check: str
    arm: str
    value: float
    threshold: float
    passed: bool


class Reference(BaseModel):
    """The training prompts production is compared with."""

    source: Literal["registry", "file"]
    description: str
    """e.g. `orders@3 training split (400 prompts)`."""
    prompts: int
    answers_json: bool
    """Whether the training answers are JSON (then logged answers are parsed to check them)."""


class MonitorReport(BaseModel):
    """`tunesmith monitor --json`: everything the terminal summary and the HTML report show."""

    version: int = MONITOR_REPORT_VERSION
    model: str
    log_dir: str
    since: str | None
    window: str
    generated_at: str
    first_request: str
    last_request: str
    requests: int
    reference: Reference
    json_schema: str | None = None
    """The `--json-schema` file answers were validated against."""
    regex: str | None = None
    """The `--regex` pattern answers had to match in full."""
    drift: InputDrift
    quality: list[QualityRow]
    """Per arm over the whole period (`window` null) first, then per window and arm."""
    feedback: FeedbackSummary
    checks: list[Check] = Field(default_factory=list)
    thresholds: Thresholds

    @property
    def drift_failed(self) -> bool:
        return self.drift.verdict == "significant"

    @property
    def failed_checks(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]


def monitor(name: str, since: str | None = "7d", window: str = "1d", log_dir: Path | None = None,
            training_data: Path | None = None, thresholds: Thresholds | None = None,
            max_classifier_prompts: int = 5000, tokenizer: Path | None = None, now: datetime | None = None,
            json_schema: Path | None = None, regex: str | None = None) -> MonitorReport:
    """Drift, quality and feedback of `name` (a public, served or registry name in the log) since `since`; tokens
    are counted with `tokenizer` (a model folder), else the registry version's base model, else whitespace words.
    Answers are also checked against `json_schema` (a JSON Schema file) and `regex` (a full match) when given."""
    from tunesmith.request_log import default_request_log_dir, parse_since, read_feedback

    thresholds = thresholds or Thresholds()
    log_dir = Path(log_dir or default_request_log_dir())
    start = parse_since(since, now) if since else None
    step = parse_window(window)
    answers_must = answer_format(json_schema, regex)
    table, logged_ids = read_requests(log_dir, name, start)
    examples, reference, tokenizer_source = training_reference(name, table, training_data)
    windows, starts = window_numbers(np.asarray(table.times), step)
    with_prompt = [i for i, prompt in enumerate(table.prompts) if prompt]
    tokenize, token_unit = tokenizer_for(str(tokenizer) if tokenizer else tokenizer_source)
    drift = input_drift([_training_prompt(example) for example in examples],
                        [table.prompts[i] for i in with_prompt], windows[with_prompt], starts, tokenize, token_unit,
                        thresholds.psi, thresholds.domain_auc, thresholds.alpha, max_classifier_prompts)
    quality = quality_rows(table, windows, starts, reference.answers_json, answers_must)
    feedback = feedback_summary(read_feedback(log_dir, start), table, logged_ids)
    return MonitorReport(
        model=name, log_dir=str(log_dir), since=start.isoformat() if start else None, window=window,
        generated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        first_request=_iso(min(table.times)), last_request=_iso(max(table.times)), requests=len(table),
        reference=reference, json_schema=str(json_schema) if json_schema is not None else None, regex=regex,
        drift=drift, quality=quality, feedback=feedback,
        checks=quality_checks(quality, feedback, thresholds), thresholds=thresholds)


def parse_window(text: str) -> timedelta:
    """`--window` (`1d`, `6h`, `30m`) as a time span."""
    from tunesmith.request_log import AGE, AGE_UNITS

    match = AGE.fullmatch(text.strip())
    if not match or int(match[1]) == 0:
        raise TunesmithError(f"--window {text!r}: give a span such as 1d, 6h or 30m")
    return timedelta(**{AGE_UNITS[match[2]]: int(match[1])})


def read_requests(log_dir: Path, name: str, since: datetime | None) -> tuple[RequestTable, set[str]]:
    """`name`'s requests (asked-for, served or registry name) since `since`, and every logged id (for feedback)."""
    from collections import Counter

    from tunesmith.request_log import read_request_log

    table, logged_ids, names = RequestTable(), set(), Counter()
    for record in read_request_log(log_dir, since=since):
        logged_ids.add(record.id)
        names[record.model] += 1
        if name in (record.model, record.served, record.registry_model):
            table.add(record)
    when = f" since {since.isoformat(timespec='minutes')}" if since else ""
    if not names:
        raise TunesmithError(f"no requests in {log_dir}{when}; widen --since, or point --log-dir at the server's "
                             "request log")
    if not len(table):
        seen = ", ".join(f"{model} ({count})" for model, count in names.most_common(10))
        raise TunesmithError(f"no requests for {name!r} in {log_dir}{when} (it has: {seen}); monitor one of those "
                             "names, or widen --since")
    return table, logged_ids


def training_reference(name: str, table: RequestTable, training_data: Path | None):
    """(the training examples, their description, a local tokenizer folder or None): `training_data` when given,
    else the training split of each registry version that answered."""
    from tunesmith.data.formats import read_examples

    if training_data is not None:
        if not Path(training_data).is_file():
            raise TunesmithError(f"--training-data {training_data}: no such file; give the data the model was "
                                 "trained on (.jsonl, .json, .csv or .parquet)")
        examples = read_examples(Path(training_data))
        return examples, _reference("file", f"{training_data} ({len(examples):,} prompts)", examples), None
    if not table.versions:
        raise TunesmithError(f"{name!r} has no data card: its logged requests name no registry version to find the "
                             "training data of; pass --training-data FILE (the data it was trained on)")
    from tunesmith.registry.store import Registry

    store, examples, described, tokenizer_source = Registry(), [], [], None
    for model, version in sorted(table.versions):
        run, split, found = _version_examples(store, model, version)
        examples += found
        described.append(f"{model}@{version} {split} split ({len(found):,} prompts"
                         + (", held out from the same data: its training split is neither kept, nor in the run "
                            "directory it came from, nor rebuildable from its source files)"
                            if split == "validation" else ")"))
        if tokenizer_source is None and Path(run.base_source).is_dir():
            tokenizer_source = run.base_source
    return examples, _reference("registry", "; ".join(described), examples), tokenizer_source


def _version_examples(store, model: str, version: str) -> tuple:
    """(the version's run snapshot, the split used, its examples): the training split (kept, in the original run
    directory, or rebuilt by the data stage), else the validation split."""
    import shutil
    import tempfile

    from tunesmith.registry.retrain import training_split
    from tunesmith.registry.run import Run
    from tunesmith.registry.run_dir import MANIFEST

    run = Run.open(store.local_copy(model, version))
    with tempfile.TemporaryDirectory(prefix="tunesmith-monitor-") as scratch:
        try:
            found = training_split(run.directory, Path(scratch) / "data")
        except TunesmithError:
            found = None  # neither kept nor rebuildable: the held-out split, from the same data, stands in
        if found is not None:
            folder = found.parents[1]  # <run dir>/data/train.jsonl, wherever it was found
            if folder == Path(scratch):  # rebuilt: lay scratch out as a run directory, as the data readers expect
                shutil.copyfile(run.directory / MANIFEST, folder / MANIFEST)
            return run, "train", _read_split(folder, "train", run.data_kind)
    data = run.manifest.data
    if not (run.directory / data.validation_file).is_file():
        raise TunesmithError(f"{model}@{version} has no data card (neither {data.train_file} nor "
                             f"{data.validation_file} in {run.directory}, nor a training split to find or rebuild); "
                             "pass --training-data FILE")
    return run, "validation", _read_split(run.directory, "validation", run.data_kind)


def _read_split(run_dir: Path, split: str, kind: str) -> list:
    from tunesmith.data.prepare import read_preference_split, read_split

    return read_split(run_dir, split) if kind == "sft" else read_preference_split(run_dir, split)


def _reference(source: str, description: str, examples: list) -> Reference:
    answers = [_training_answer(example) for example in examples]
    parsed = sum(parses_as_json(answer) for answer in answers)
    return Reference(source=source, description=description, prompts=len(examples),
                     answers_json=bool(answers) and parsed >= JSON_ANSWERS_SHARE * len(answers))


def _training_prompt(example) -> str:
    """The last user message of a training example (chat, preference or unpaired), as a production prompt is."""
    return next((message.content for message in reversed(example.messages) if message.role == "user"), "")


def _training_answer(example) -> str:
    """The answer the example trains: the reference reply, the chosen one, or the unpaired completion."""
    for attribute in ("chosen", "completion"):
        if hasattr(example, attribute):
            return getattr(example, attribute)
    return example.reference()


def tokenizer_for(source: str | None):
    """(tokenize, unit name): a model folder's tokenizer, else whitespace words."""
    if source is None:
        return whitespace_tokens, "whitespace words"
    folder = Path(source)
    if not folder.is_dir():
        raise TunesmithError(f"--tokenizer {source}: not a model folder; give a local folder with a tokenizer "
                             "(such as a base model's), or leave it out to count whitespace words")
    if (folder / "tokenizer.json").is_file():  # the tokenizers library alone loads in a blink; transformers does not
        from tokenizers import Tokenizer

        fast = Tokenizer.from_file(str(folder / "tokenizer.json"))

        def encode(texts: list[str]) -> list[list[int]]:
            return [encoding.ids for encoding in fast.encode_batch(texts, add_special_tokens=False)]
    else:
        from tunesmith.models import load_tokenizer

        tokenizer = load_tokenizer(folder)

        def encode(texts: list[str]) -> list[list[int]]:
            return tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]

    def tokenize(texts: list[str]) -> list[list[int]]:
        ids = []
        for start in range(0, len(texts), TOKENIZE_CHUNK):  # in chunks: one batch of 100k prompts holds ~0.5 GiB
            ids += encode(texts[start:start + TOKENIZE_CHUNK])
        return ids

    return tokenize, f"tokens ({folder.name} tokenizer)"


def window_numbers(times: np.ndarray, step: timedelta) -> tuple[np.ndarray, list[str]]:
    """Each request's window number, and each window's start; windows are aligned to UTC (1d: midnight)."""
    seconds = step.total_seconds()
    buckets = np.floor(times / seconds).astype(np.int64)
    first = buckets.min()
    if buckets.max() - first >= MAX_WINDOWS:
        raise TunesmithError(f"--window splits the period into {buckets.max() - first + 1:,} windows (at most "
                             f"{MAX_WINDOWS}); use a longer --window or a later --since")
    starts = [_iso((first + n) * seconds) for n in range(int(buckets.max() - first) + 1)]
    return buckets - first, starts


def _iso(epoch_seconds: float) -> str:
    return datetime.fromtimestamp(epoch_seconds, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def quality_checks(quality: list[QualityRow], feedback: FeedbackSummary, limits: Thresholds) -> list[Check]:
    """Each arm's whole-period figures against the thresholds (arms with too few requests are not judged)."""
    checks = []
    for row in quality:
        if row.window is not None or row.requests < limits.min_requests:
            continue
        checks += [Check(check=check, arm=row.arm, value=value, threshold=limit, passed=passes(value, limit))
                   for check, value, limit, passes in (
                       ("server_error_rate", row.server_error_rate, limits.max_server_error_rate, _at_most),
                       ("empty_rate", row.empty_rate, limits.max_empty_rate, _at_most),
                       ("refusal_rate", row.refusal_rate, limits.max_refusal_rate, _at_most),
                       ("json_valid_rate", _judged(row.json_valid_rate, row.json_checked, limits),
                        limits.min_json_valid_rate, _at_least),
                       ("schema_valid_rate", _judged(row.schema_valid_rate, row.format_checked, limits),
                        limits.min_schema_valid_rate, _at_least),
                       ("regex_match_rate", _judged(row.regex_match_rate, row.format_checked, limits),
                        limits.min_regex_match_rate, _at_least),
                       ("latency_p95", row.latency_p95, limits.max_latency_p95, _at_most))
                   if value is not None and limit is not None]
    for row in feedback.arms:
        if row.total >= limits.min_requests:
            checks.append(Check(check="negative_feedback_rate", arm=row.arm, value=row.negative_rate,
                                threshold=limits.max_negative_feedback_rate,
                                passed=row.negative_rate <= limits.max_negative_feedback_rate))
    return checks


def _judged(value: float | None, checked: int, limits: Thresholds) -> float | None:
    """A share of checked answers, or None when too few were checked to judge it."""
    return value if checked >= limits.min_requests else None


def _at_most(value: float, limit: float) -> bool:
    return value <= limit


def _at_least(value: float, limit: float) -> bool:
    return value >= limit
