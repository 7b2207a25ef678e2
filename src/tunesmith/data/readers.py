"""Streaming raw records out of JSONL, JSON, CSV, Parquet files and saved Hugging Face dataset folders.

Each record comes with the line (or row) number a user can find it at; a record that cannot even be
parsed comes as a `RawRecord` with an error instead of a value, so callers can count and report it.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import TunesmithError

MAX_ROW_BYTES = 16 * 1024 * 1024
"""Rows larger than this are dropped with a reason instead of being parsed (no training row is this big)."""
FILE_TYPES = ("jsonl", "json", "csv", "parquet", "hf_dataset")


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
    with Path(path).open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if raw.strip():
                yield line_no, raw


def parse_jsonl_line(line_no: int, raw: bytes) -> RawRecord:
    """One JSONL line parsed; bad bytes, bad JSON, huge or too deeply nested rows become a reasoned error."""
    if len(raw) > MAX_ROW_BYTES:
        return RawRecord(line_no, raw=raw[:200].decode("utf-8", "replace"), error=(
            "row_too_large", f"row is {len(raw) / 2**20:.0f} MiB, over the {MAX_ROW_BYTES // 2**20} MiB limit; split it"))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RawRecord(line_no, raw=raw[:2000].decode("utf-8", "replace"), error=(
            "invalid_utf8", f"not valid UTF-8 text (byte {exc.start + 1}); re-save the file as UTF-8"))
    text = text.lstrip("\ufeff").strip()
    return parse_json_text(line_no, text)


def parse_json_text(line_no: int, text: str) -> RawRecord:
    try:
        return RawRecord(line_no, value=json.loads(text), raw=text)
    except json.JSONDecodeError as exc:
        message = f"not valid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object"
        return RawRecord(line_no, raw=text[:2000], error=("invalid_json", message))
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        return RawRecord(line_no, raw=text[:2000], error=("invalid_json", f"not valid JSON ({exc})"))
    except RecursionError:
        return RawRecord(line_no, raw=text[:200], error=("too_deep", "JSON nested too deeply to be a training example"))


def iter_records(path: Path) -> Iterator[RawRecord]:
    """Every record of a data file, parsed, whatever its container type."""
    kind = file_type(path)
    if kind == "jsonl":
        for line_no, raw in iter_raw_lines(path):
            yield parse_jsonl_line(line_no, raw)
    elif kind == "json":
        yield from _iter_json_array(path)
    elif kind == "csv":
        yield from _iter_csv(path)
    elif kind == "parquet":
        yield from _iter_parquet(path)
    else:
        yield from _iter_hf_dataset(path)


def _iter_json_array(path: Path) -> Iterator[RawRecord]:
    raw = path.read_bytes()
    if not raw.strip():
        return
    record = parse_jsonl_line(1, raw)
    if record.error:
        raise TunesmithError(f"{path}: {record.error[1].replace('each line must be one JSON object', 'the file must be a JSON array of objects')}")
    if isinstance(record.value, dict) and isinstance(record.value.get("data"), list):
        record.value = record.value["data"]
    if not isinstance(record.value, list):
        raise TunesmithError(f"{path}: a .json data file must hold a JSON array of examples; for one object per line use .jsonl")
    for index, value in enumerate(record.value, start=1):
        yield RawRecord(index, value=value, raw=json.dumps(value, ensure_ascii=False)[:2000])


def _iter_csv(path: Path) -> Iterator[RawRecord]:
    try:
        handle = io.TextIOWrapper(path.open("rb"), encoding="utf-8-sig", newline="")
        with handle:
            reader = csv.DictReader(handle)
            for row in reader:
                record = {key: _csv_cell(value) for key, value in row.items() if key is not None and value not in ("", None)}
                if None in row:
                    yield RawRecord(reader.line_num, raw=str(row)[:2000], error=(
                        "wrong_type", "row has more cells than the header has columns"))
                else:
                    yield RawRecord(reader.line_num, value=record, raw=json.dumps(row, ensure_ascii=False)[:2000])
    except UnicodeDecodeError as exc:
        raise TunesmithError(f"{path}: not valid UTF-8 text (byte {exc.start + 1}); re-save the file as UTF-8") from None
    except csv.Error as exc:
        raise TunesmithError(f"{path}: not a valid CSV file ({exc})") from None


def _csv_cell(value: str):
    """CSV cells are text; a cell holding a JSON list or object (e.g. `messages`) is decoded."""
    stripped = value.strip()
    if stripped[:1] in "[{":
        try:
            return json.loads(stripped)
        except (json.JSONDecodeError, RecursionError):
            return value
    if stripped.lower() in ("true", "false"):
        return stripped.lower() == "true"
    return value


def _iter_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        row = 0
        for batch in parquet.iter_batches(batch_size=2048):
            for value in batch.to_pylist():
                row += 1
                value = {key: cell for key, cell in value.items() if cell is not None}  # absent in a mixed schema
                yield RawRecord(row, value=value, raw=json.dumps(value, ensure_ascii=False, default=str)[:2000])
    except (pa.ArrowException, OSError) as exc:
        raise TunesmithError(f"{path}: not a readable Parquet file ({exc})") from None


def _iter_hf_dataset(path: Path) -> Iterator[RawRecord]:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for a damaged folder
        raise TunesmithError(f"{path}: not a readable saved Hugging Face dataset ({exc})") from None
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise TunesmithError(f"{path}: the dataset has splits {', '.join(dataset)} but no 'train'; point at one split's folder")
        dataset = dataset["train"]
    for row, value in enumerate(dataset.iter(batch_size=1), start=1):
        value = {key: column[0] for key, column in value.items() if column[0] is not None}
        yield RawRecord(row, value=value, raw=json.dumps(value, ensure_ascii=False, default=str)[:2000])
