"""Streaming raw records out of JSONL, JSON, CSV, Parquet files and saved Hugging Face dataset folders.

Each record comes with the line (or row) number a user can find it at; a record that cannot even be
parsed comes as a `RawRecord` with an error instead of a value, so callers can count and report it.
Every parsed value passes `value_problem` here, once for all formats: nothing nested too deeply to handle
or holding text that is not valid Unicode (a lone surrogate escape such as "\\ud800") goes further.
"""

from __future__ import annotations

import csv
import io
import json
import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tunesmith.data.json_array import array_elements, first_char
from tunesmith.errors import TunesmithError

MAX_ROW_BYTES = 16 * 1024 * 1024
"""Rows larger than this are dropped with a reason instead of being parsed (no training row is this big)."""
MAX_WRAPPED_JSON_BYTES = 512 * 1024 * 1024
"""A .json file shaped {"data": [...]} is parsed whole, so it has a size limit (a plain array streams)."""
MAX_NESTING = 100
"""Deeper JSON than this is no training example (tool schemas nest a few levels) and would overflow the stack later."""
RAW_CHARS = 2000
FILE_TYPES = ("jsonl", "json", "csv", "parquet", "hf_dataset")
JSON_COLUMNS = {"messages", "conversations", "tools"}
"""CSV columns that always hold JSON (a list of messages, of tools)."""
CONVERSATION_COLUMNS = {"prompt", "completion", "chosen", "rejected", "input", "preferred_output", "non_preferred_output"}
"""CSV columns that hold text, or a conversation written as a JSON list of {role, ...} (or {messages}) objects."""


@dataclass
class RawRecord:
    line: int
    value: object = None
    raw: str = ""
    error: tuple[str, str] | None = None  # (reason, message)


def file_type(path: Path) -> str:
    """The container type of a data file, from its suffix (or a folder saved by `datasets`)."""
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return "hf_dataset"
        raise TunesmithError(f"{path} is a folder but not a saved Hugging Face dataset (no dataset_info.json)")
    if not path.is_file():
        raise TunesmithError(f"data file not found: {path} (check data.train / data.validation / data.sources)")
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("jsonl", "ndjson"):
        return "jsonl"
    if suffix in ("json", "csv", "parquet"):
        return suffix
    raise TunesmithError(f"{path}: unknown file type .{suffix}; use .jsonl, .json, .csv, .parquet or a saved dataset folder")


def iter_raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines of a JSONL file as bytes, numbered from 1 (blank lines still count)."""
    try:
        with Path(path).open("rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                if raw.strip():
                    yield line_no, raw
    except OSError as exc:
        raise _unreadable(path, exc) from None


def parse_jsonl_line(line_no: int, raw: bytes) -> RawRecord:
    """One JSONL line parsed; bad bytes, bad JSON, huge or too deeply nested rows become a reasoned error."""
    if len(raw) > MAX_ROW_BYTES:
        return RawRecord(line_no, raw=safe_text(raw[:200].decode("utf-8", "replace")), error=(
            "row_too_large", f"row is {len(raw) / 2**20:.0f} MiB, over the {MAX_ROW_BYTES // 2**20} MiB limit; split it"))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RawRecord(line_no, raw=raw[:RAW_CHARS].decode("utf-8", "replace"), error=(
            "invalid_utf8", f"not valid UTF-8 text (byte {exc.start + 1}); re-save the file as UTF-8"))
    text = text.lstrip("\ufeff").strip()
    return parse_json_text(line_no, text)


def parse_json_text(line_no: int, text: str) -> RawRecord:
    """One example's JSON text parsed and checked by `value_problem`; any failure becomes a reasoned error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        message = f"not valid JSON ({exc.msg} at column {exc.colno}); each example must be one JSON object"
        return RawRecord(line_no, raw=text[:RAW_CHARS], error=("invalid_json", message))
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        return RawRecord(line_no, raw=text[:RAW_CHARS], error=("invalid_json", f"not valid JSON ({str(exc).split(';')[0]})"))
    except RecursionError:
        return RawRecord(line_no, raw=text[:200], error=("too_deep", _too_deep_message()))
    return make_record(line_no, value, text[:RAW_CHARS])


def make_record(line: int, value, raw: str | None = None) -> RawRecord:
    """A parsed record, or a reasoned error if `value_problem` finds one; `raw` defaults to the value as JSON."""
    problem = value_problem(value)
    if raw is None:
        raw = "" if problem and problem[0] == "too_deep" else _as_json(value)
    return RawRecord(line, raw=safe_text(raw), error=problem) if problem else RawRecord(line, value=value, raw=safe_text(raw))


def value_problem(value) -> tuple[str, str] | None:
    """(reason, message) if a parsed value nests deeper than MAX_NESTING or holds a lone surrogate, else None."""
    stack = [(value, 1, "")]
    while stack:
        item, depth, where = stack.pop()
        if isinstance(item, str):
            bad = lone_surrogate(item)
            if bad:
                return "invalid_unicode", (f"{where or 'the row'} holds a lone surrogate {bad}, which is not a character "
                                           "(a broken \\uD8xx escape?); fix or remove it")
        elif isinstance(item, (dict, list)):
            if depth > MAX_NESTING:
                return "too_deep", _too_deep_message()
            children = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in children:
                if isinstance(key, str):
                    bad = lone_surrogate(key)
                    if bad:
                        return "invalid_unicode", f"a key in {where or 'the row'} holds a lone surrogate {bad}; fix or remove it"
                    step = f"{where}.{key}" if where else key
                else:
                    step = f"{where}[{key}]"
                stack.append((child, depth + 1, step[:200]))
    return None


def safe_text(text: str) -> str:
    """`text` with any lone surrogate written as a `\\udxxx` escape, so it can always be written as UTF-8."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def lone_surrogate(text: str) -> str | None:
    """The first lone surrogate in `text` as a `\\udxxx` escape (e.g. from a file name that is not UTF-8), else None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        return f"\\u{ord(text[exc.start]):04x}"


def _too_deep_message() -> str:
    return f"JSON nested more than {MAX_NESTING} levels deep; no training example needs that, flatten it"


def _as_json(value, limit: int | None = RAW_CHARS) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)[:limit]
    except (RecursionError, ValueError):
        return ""


def _unreadable(path: Path, exc: OSError) -> TunesmithError:
    return TunesmithError(f"{path}: cannot read the file ({exc.strerror or exc}); check it exists and is readable")


def iter_records(path: Path) -> Iterator[RawRecord]:
    """Every record of a data file, parsed, whatever its container type."""
    kind = file_type(path)
    try:
        if kind == "jsonl":
            for line_no, raw in iter_raw_lines(path):
                yield parse_jsonl_line(line_no, raw)
        elif kind == "json":
            yield from _iter_json(Path(path))
        elif kind == "csv":
            yield from _iter_csv(Path(path))
        elif kind == "parquet":
            yield from _iter_parquet(Path(path))
        else:
            yield from _iter_hf_dataset(Path(path))
    except OSError as exc:
        raise _unreadable(path, exc) from None


def _iter_json(path: Path) -> Iterator[RawRecord]:
    """A .json file: a JSON array streamed example by example, or {"data": [...]} parsed whole."""
    with path.open("rb") as handle:
        if path.stat().st_size == 0:
            return
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            start, char = first_char(data)
            if char == ord("["):
                for number, raw in array_elements(path, data, start):
                    yield parse_jsonl_line(number, raw)
            elif char == ord("{"):
                yield from _iter_wrapped_json(path, data)
            elif start >= 0:
                raise TunesmithError(f"{path}: a .json data file must hold a JSON array of examples; "
                                     "for one object per line use .jsonl")


def _iter_wrapped_json(path: Path, data: mmap.mmap) -> Iterator[RawRecord]:
    if len(data) > MAX_WRAPPED_JSON_BYTES:
        raise TunesmithError(f"{path}: a {{\"data\": [...]}} file over {MAX_WRAPPED_JSON_BYTES // 2**20} MiB; "
                             "save the examples as a plain JSON array or as .jsonl")
    try:
        wrapper = json.loads(data[:].decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise TunesmithError(f"{path}: not valid UTF-8 text (byte {exc.start + 1}); re-save the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise TunesmithError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); fix the file") from None
    except (ValueError, RecursionError) as exc:
        raise TunesmithError(f"{path}: not usable JSON ({_one_line(exc) or 'nested too deeply'}); fix the file") from None
    if not isinstance(wrapper, dict) or not isinstance(wrapper.get("data"), list):
        raise TunesmithError(f"{path}: a .json data file must hold a JSON array of examples (or {{\"data\": [...]}}); "
                             "for one object per line use .jsonl")
    for index, value in enumerate(wrapper["data"], start=1):
        raw = _as_json(value, limit=None)
        if len(raw) > MAX_ROW_BYTES:
            yield RawRecord(index, raw=safe_text(raw[:200]), error=(
                "row_too_large", f"row is over the {MAX_ROW_BYTES // 2**20} MiB limit; split it"))
        else:
            yield make_record(index, value, raw[:RAW_CHARS])


def _iter_csv(path: Path) -> Iterator[RawRecord]:
    csv.field_size_limit(max(csv.field_size_limit(), MAX_ROW_BYTES))  # the default (128 KiB) refuses long answers
    handle = io.TextIOWrapper(path.open("rb"), encoding="utf-8-sig", newline="")
    with handle:
        reader = csv.DictReader(handle)
        try:
            for row in reader:
                yield _csv_record(reader.line_num, row)
        except UnicodeDecodeError:
            raise TunesmithError(f"{path}: not valid UTF-8 text (near line {reader.line_num + 1}); "
                                 "re-save the file as UTF-8") from None
        except csv.Error as exc:
            raise TunesmithError(f"{path}:{reader.line_num}: not a valid CSV file ({exc}); fix the quoting "
                                 "or re-export it") from None


def _csv_record(line: int, row: dict) -> RawRecord:
    raw = json.dumps(row, ensure_ascii=False)[:RAW_CHARS]
    if None in row:
        return RawRecord(line, raw=raw, error=("wrong_type", "row has more cells than the header has columns"))
    record = {}
    for column, cell in row.items():
        if column is None or cell in ("", None):
            continue
        value = _csv_cell(column, cell)
        if isinstance(value, RawRecord):  # a JSON column that does not parse
            value.line, value.raw = line, raw
            return value
        record[column] = value
    return make_record(line, record, raw)


def _csv_cell(column: str, cell: str):
    """CSV cells are text. JSON columns (messages, tools) are decoded; a text column only when it holds a
    conversation (a JSON list of {role, ...} objects); `label` holds true/false/1/0."""
    stripped = cell.strip()
    if column == "label" and stripped.lower() in ("true", "false", "1", "0"):
        return stripped.lower() in ("true", "1")
    if stripped[:1] not in ("[", "{"):
        return cell
    if column in JSON_COLUMNS:
        parsed = parse_json_text(0, stripped)
        if parsed.error:
            reason, message = parsed.error
            return RawRecord(0, error=(reason, f"column {column!r}: {message.split('; ')[0]}; fix the cell's JSON"))
        return parsed.value
    if column in CONVERSATION_COLUMNS:
        try:
            value = json.loads(stripped)
        except (ValueError, RecursionError):
            return cell
        if _is_conversation(value):
            return value
    return cell


def _is_conversation(value) -> bool:
    if isinstance(value, dict):
        return "messages" in value
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) and "role" in item for item in value)


def _iter_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:  # a damaged file raises many types (ArrowInvalid, OSError, UnicodeDecodeError, ...): all mean "damaged"
        batches = pq.ParquetFile(path).iter_batches(batch_size=2048)
    except Exception as exc:  # noqa: BLE001
        raise _damaged(path, "Parquet file", exc) from None
    row = 0
    while True:
        try:
            batch = next(batches, None)
        except Exception as exc:  # noqa: BLE001
            raise _damaged(path, "Parquet file", exc, f" at row {row + 1}") from None
        if batch is None:
            return
        for value in _batch_rows(batch):
            row += 1
            if isinstance(value, RawRecord):
                value.line = row
                yield value
            else:
                yield _arrow_record(row, value)


def _batch_rows(batch) -> list:
    """The rows of an Arrow batch as dicts; a row Arrow cannot convert (e.g. bad UTF-8) becomes an error record."""
    try:
        return batch.to_pylist()
    except Exception:  # noqa: BLE001 - convert row by row to find the bad ones
        rows = []
        for index in range(batch.num_rows):
            try:
                rows.extend(batch.slice(index, 1).to_pylist())
            except Exception as exc:  # noqa: BLE001
                reason = "invalid_utf8" if isinstance(exc, UnicodeDecodeError) else "unreadable_row"
                rows.append(RawRecord(0, error=(reason, f"row cannot be read ({_one_line(exc)}); "
                                                        "the file may be damaged, re-export it")))
        return rows


def _arrow_record(row: int, value: dict) -> RawRecord:
    """Arrow has no 'absent': a field missing from some rows is null there, so nulls in objects count as absent."""
    try:
        value = _without_nulls(value)
    except RecursionError:
        return RawRecord(row, error=("too_deep", _too_deep_message()))
    return make_record(row, value)


def _without_nulls(value):
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def _iter_hf_dataset(path: Path) -> Iterator[RawRecord]:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a damaged folder
        raise _damaged(path, "saved Hugging Face dataset", exc) from None
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise TunesmithError(f"{path}: the dataset has splits {', '.join(dataset)} but no 'train'; point at one split's folder")
        dataset = dataset["train"]
    rows = iter(dataset.iter(batch_size=1))
    for row in range(1, len(dataset) + 1):
        try:
            value = next(rows)
        except Exception as exc:  # noqa: BLE001
            raise _damaged(path, "saved Hugging Face dataset", exc, f" at row {row}") from None
        yield _arrow_record(row, {key: column[0] for key, column in value.items()})


def _damaged(path: Path, what: str, exc: Exception, where: str = "") -> TunesmithError:
    return TunesmithError(f"{path}: not a readable {what}{where} ({_one_line(exc)}); it may be damaged, re-export it")


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300]
