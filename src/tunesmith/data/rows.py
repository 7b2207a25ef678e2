"""One raw record in, one checked row out: convert, clean, redact, validate and hash. Runs in worker processes."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from tunesmith.data.clean import clean_text, dedup_text, example_texts, map_texts
from tunesmith.data.dedup import SignatureMaker, exact_key
from tunesmith.data.formats import RowError, convert_record
from tunesmith.data.pii import redact
from tunesmith.data.readers import RawRecord, parse_jsonl_line
from tunesmith.data.split import content_hash


@dataclass(frozen=True)
class RowSettings:
    """What a worker needs to check a row; plain values so it pickles."""

    fmt: str | None = None
    system_prompt: str | None = None
    clean: bool = True
    redact_pii: bool = False
    special_tokens: tuple[str, ...] = ()
    stratify_by: str | None = None
    num_perm: int = 64


@dataclass
class CheckedRow:
    line: int
    record: str = ""  # the typed example as one JSON line (no source_line)
    fmt: str = ""
    label: str | None = None
    exact: bytes = b""
    content: str = ""
    signature: np.ndarray | None = None
    pii: Counter = field(default_factory=Counter)
    reason: str | None = None
    message: str = ""
    raw: str = ""


_settings: RowSettings | None = None
_maker: SignatureMaker | None = None


def init_worker(settings: RowSettings) -> None:
    """Pool initializer: remember the settings and build the MinHash prototype once per process."""
    global _settings, _maker
    _settings, _maker = settings, SignatureMaker(settings.num_perm)


def check_chunk(items: list) -> list[CheckedRow]:
    """Check a chunk of rows: each item is a RawRecord or a (line, bytes) pair from a JSONL file."""
    return [check_row(item if isinstance(item, RawRecord) else parse_jsonl_line(*item)) for item in items]


def check_row(record: RawRecord) -> CheckedRow:
    settings = _settings
    if record.error:
        return CheckedRow(record.line, reason=record.error[0], message=record.error[1], raw=record.raw)
    pii: Counter = Counter()
    try:
        example, fmt = convert_record(record.value, settings.fmt, settings.system_prompt, settings.stratify_by)
        if settings.clean:
            map_texts(example, clean_text)
        if settings.redact_pii:
            map_texts(example, lambda text: redact(text, pii))
        _check_texts(example, settings.special_tokens)
    except RowError as exc:
        return CheckedRow(record.line, reason=exc.reason, message=str(exc), raw=record.raw)
    label = None
    if settings.stratify_by:
        label = str(record.value.get(settings.stratify_by))
    text = dedup_text(example)
    record_json = json.dumps(example.model_dump(exclude={"source_line"}, exclude_none=True), ensure_ascii=False)
    return CheckedRow(record.line, record=record_json, fmt=fmt, label=label, exact=exact_key(text),
                      content=content_hash(example), signature=_maker.signature(text), pii=pii)


def _check_texts(example, special_tokens: tuple[str, ...]) -> None:
    texts = example_texts(example)
    # A turn that calls tools may have no text of its own; every other text field must.
    required = [m.content for m in example.messages if not m.tool_calls] + texts[len(example.messages):]
    if any(not text.strip() for text in required):
        raise RowError("empty_content", "a text field is empty after clean-up (it held only spaces or control characters)")
    for text in texts:
        found = next((token for token in special_tokens if token in text), None)
        if found:
            raise RowError("special_tokens", f"content holds the tokenizer's special token {found!r}, which would "
                                             "corrupt the chat template; remove or escape it")
    if getattr(example, "chosen", None) is not None and example.chosen == example.rejected:
        raise RowError("chosen_equals_rejected", "chosen and rejected are the same reply after clean-up")
