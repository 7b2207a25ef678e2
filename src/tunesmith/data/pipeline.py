"""The streaming data pipeline: check every row (in parallel), find duplicates, split, and account for every row.

Pass 1 streams each source through worker processes and keeps only compact per-row keys in memory (hashes and a
MinHash signature); the checked rows go to a scratch file. Pass 2 reads that file back and writes the splits.
Nothing is dropped silently: rows read = rows kept + rows dropped by reason, and every dropped row is written to
`dropped.jsonl` with its source, line and reason.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

from tunesmith.data.dedup import NearDuplicateIndex, connected_rows
from tunesmith.data.formats import KIND_OF_FORMAT
from tunesmith.data.readers import file_type, iter_raw_lines, iter_records
from tunesmith.data.rows import CheckedRow, RowSettings, check_chunk, init_worker
from tunesmith.data.split import split_bucket, stratified_held_out
from tunesmith.errors import TunesmithError

CHUNK_ROWS = 500
PARALLEL_FROM_BYTES = 20 * 2**20
LINES_SHOWN = 10
DROP_MESSAGES = {"leakage": "held-out row (nearly) duplicates a training row",
                 "source_weight": "left out of train by its source's weight below 1"}


@dataclass
class Source:
    path: Path
    weight: float = 1.0
    held_out: bool = False  # the user's own validation file


@dataclass
class PoolRows:
    """Compact per-row facts of every row kept by pass 1 (row ids are positions in the scratch file)."""

    source: list[int] = field(default_factory=list)
    line: list[int] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    label: list[str] = field(default_factory=list)
    exact_first: dict[bytes, int] = field(default_factory=dict)
    exact_of: list[int] = field(default_factory=list)


@dataclass
class PipelineResult:
    kind: str
    formats: dict[str, str]
    read: int
    dropped: Counter
    flagged: Counter
    pii: Counter
    copies: np.ndarray  # per row: 0 dropped or held out, else how many times it goes into train (source weight)
    held_out: np.ndarray  # per row: kept and in the validation split
    drops: dict[int, tuple[str, int]]  # dedup/leakage drops: row -> (reason, row it duplicates or -1)
    clusters: list[dict]
    rows: PoolRows

    @property
    def kept(self) -> int:
        return int(((self.copies > 0) | self.held_out).sum())


def run_pipeline(sources: list[Source], settings: RowSettings, data, seed: int, scratch: Path,
                 dropped_file: Path, progress=None) -> PipelineResult:
    """Check, dedup and split every source; the scratch file holds one checked row per line."""
    rows, index = PoolRows(), NearDuplicateIndex(data.near_duplicate_threshold, settings.num_perm)
    dropped, pii, formats, problems = Counter(), Counter(), {}, defaultdict(list)
    read = 0
    with scratch.open("w", encoding="utf-8") as out, _open_dropped(dropped_file, "w") as bad:
        for number, source in enumerate(sources):
            seen_formats: dict[str, list[int]] = defaultdict(list)
            for checked in _checked_rows(source.path, settings, data.num_proc):
                read += 1
                if progress:
                    progress()
                if checked.reason:
                    dropped[checked.reason] += 1
                    problems[checked.reason].append((source.path, checked.line, checked.message))
                    _write_dropped(bad, source.path, checked.line, checked.reason, checked.message, checked.raw)
                    continue
                seen_formats[checked.fmt].append(checked.line)
                pii.update(checked.pii)
                _add_row(rows, index, number, checked)
                out.write(checked.record + "\n")
            formats[str(source.path)] = _one_format(source.path, seen_formats)
    if data.mode == "strict" and problems:
        raise TunesmithError(_strict_message(problems, dropped))
    kind = _one_kind(formats)
    if not read:
        raise TunesmithError(f"no examples in {', '.join(str(s.path) for s in sources)}: no rows read (an empty "
                             "file?); add examples")
    if not rows.line:
        # No run directory is written, so point at a command that lists the problems, not at a dropped.jsonl.
        path, line, message = problems[next(iter(problems))][0]  # every row read was dropped with a reason
        raise TunesmithError(f"no usable examples in {', '.join(str(s.path) for s in sources)} ({read} rows read, "
                             f"all dropped: {_reasons(dropped)}; first: {path}:{line}: {message}); "
                             f"`tunesmith data inspect {path}` lists every problem by reason")
    keep, reasons, flagged, held_out, duplicate_of = decide_rows(rows, index, sources, data, seed)
    dropped.update(reasons[r] for r in np.flatnonzero(~keep))
    drops = {int(r): (reasons[r], int(duplicate_of[r])) for r in np.flatnonzero(~keep)}
    copies = np.where(keep & ~held_out, _train_copies(rows, sources), 0)
    for row in np.flatnonzero(keep & ~held_out & (copies == 0)):  # sampled out by a source weight below 1
        drops[int(row)] = ("source_weight", -1)
        dropped["source_weight"] += 1
    clusters = _largest_clusters(rows, sources, duplicate_of)
    return PipelineResult(kind, formats, read, dropped, flagged, pii, copies, keep & held_out, drops, clusters, rows)


def write_splits(result: PipelineResult, sources: list[Source], scratch: Path, train_file: Path,
                 validation_file: Path, dropped_file: Path, on_row=None) -> None:
    """Pass 2: every checked row to its split (train rows repeated by source weight) or to dropped.jsonl."""
    rows = result.rows
    with scratch.open(encoding="utf-8") as records, train_file.open("w", encoding="utf-8") as train, \
            validation_file.open("w", encoding="utf-8") as validation, _open_dropped(dropped_file, "a") as bad:
        for row, record in enumerate(records):
            if row in result.drops:
                reason, twin = result.drops[row]
                message = (f"duplicate of {sources[rows.source[twin]].path}:{rows.line[twin]}" if twin >= 0
                           else DROP_MESSAGES[reason])
                _write_dropped(bad, sources[rows.source[row]].path, rows.line[row], reason, message, record.strip())
                continue
            split = "validation" if result.held_out[row] else "train"
            (validation if split == "validation" else train).write(record * (1 if split == "validation" else int(result.copies[row])))
            if on_row:
                on_row(row, split, record)


def _checked_rows(path: Path, settings: RowSettings, num_proc: int | None):
    """Checked rows of one file, in file order; large files are checked by a pool of worker processes."""
    items = iter_raw_lines(path) if file_type(path) == "jsonl" else iter_records(path)
    size = path.stat().st_size if path.is_file() else 0
    workers = num_proc or (os.cpu_count() or 1 if size > PARALLEL_FROM_BYTES else 1)
    chunks = iter(lambda: list(islice(items, CHUNK_ROWS)), [])
    if workers <= 1:
        init_worker(settings)
        for chunk in chunks:
            yield from check_chunk(chunk)
        return
    with _worker_pool(workers, settings) as pool:
        for checked in pool.imap(check_chunk, chunks):
            yield from checked


@contextmanager
def _worker_pool(workers: int, settings: RowSettings):
    import multiprocessing

    # spawn, not fork: the parent may hold tokenizer threads that a forked child would inherit half-locked.
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=init_worker, initargs=(settings,))
    try:
        yield pool
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _add_row(rows: PoolRows, index: NearDuplicateIndex, source: int, checked: CheckedRow) -> None:
    row = len(rows.line)
    rows.source.append(source)
    rows.line.append(checked.line)
    rows.content.append(checked.content)
    rows.label.append(checked.label or "")
    rows.exact_of.append(rows.exact_first.setdefault(checked.exact, row))
    index.add(checked.signature)


def decide_rows(rows: PoolRows, index: NearDuplicateIndex, sources: list[Source], data, seed: int):
    """Which rows are kept, why the others are not, which are held out, and what each dropped row duplicates."""
    count = len(rows.line)
    content = np.array([int(c[:16], 16) for c in rows.content], dtype=np.uint64)
    from_held_out_file = np.array([sources[s].held_out for s in rows.source], dtype=bool)
    buckets = np.array([split_bucket(c, seed) for c in rows.content])
    if any(s.held_out for s in sources):
        held_out = from_held_out_file
    elif data.stratify_by:
        held_out = stratified_held_out(buckets, np.array(rows.label), data.validation_fraction)
    else:
        held_out = buckets < data.validation_fraction
    exact = np.array(rows.exact_of)
    near = connected_rows(count, index.links(), np.stack([np.arange(count), exact], axis=1))
    cluster = {"near": near, "exact": exact, "off": np.arange(count)}[data.dedup]
    if from_held_out_file.any():  # the user's own split: dedup within each side; overlap is leakage below
        cluster = cluster * 2 + from_held_out_file
    order = np.lexsort((content, cluster))  # per cluster, the row with the smallest content hash is kept
    first_of_cluster = np.ones(count, dtype=bool)
    first_of_cluster[1:] = cluster[order[1:]] != cluster[order[:-1]]
    keeper = np.empty(count, dtype=np.int64)
    keeper[order] = order[np.maximum.accumulate(np.where(first_of_cluster, np.arange(count), 0))]
    keep = keeper == np.arange(count)
    reasons = np.where(exact[keeper] == exact, "exact_duplicate", "near_duplicate").astype(object)
    duplicate_of = np.where(keep, -1, keeper)
    train_clusters = np.unique(near[keep & ~held_out])
    leaked = keep & held_out & np.isin(near, train_clusters)
    flagged = Counter()
    if data.leakage == "remove":
        keep &= ~leaked
        reasons[leaked] = "leakage"
    else:
        flagged["leakage"] = int(leaked.sum())
    return keep, reasons, flagged, held_out, duplicate_of


def _train_copies(rows: PoolRows, sources: list[Source]) -> np.ndarray:
    """How many times each row goes into train: its source weight, the fraction decided by content hash."""
    weights = np.array([sources[s].weight for s in rows.source])
    whole = np.floor(weights)
    extra = np.array([split_bucket(c, seed=-1) for c in rows.content]) < weights - whole
    return (whole + extra).astype(np.int64)


def _largest_clusters(rows: PoolRows, sources: list[Source], duplicate_of: np.ndarray, top: int = 10) -> list[dict]:
    members: dict[int, list[int]] = defaultdict(list)
    for row in np.flatnonzero(duplicate_of >= 0):
        members[int(duplicate_of[row])].append(int(row))
    largest = sorted(members.items(), key=lambda item: -len(item[1]))[:top]
    where = lambda row: f"{sources[rows.source[row]].path.name}:{rows.line[row]}"  # noqa: E731
    return [{"size": len(dups) + 1, "kept": where(kept), "dropped": [where(r) for r in dups[:5]]}
            for kept, dups in largest]


def _open_dropped(path: Path, mode: str):
    """dropped.jsonl keeps rows as read; a lone surrogate in one is written as its escape, never a crash."""
    return path.open(mode, encoding="utf-8", errors="backslashreplace")


LINE_BREAKS_JSON_KEEPS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}
"""Characters json.dumps leaves raw that Python's str.splitlines (and so many JSONL readers) splits lines at."""


def _write_dropped(handle, path: Path, line: int, reason: str, message: str, raw: str) -> None:
    text = json.dumps({"source": str(path), "line": line, "reason": reason, "message": message, "row": raw},
                      ensure_ascii=False)
    for char, escape in LINE_BREAKS_JSON_KEEPS.items():
        text = text.replace(char, escape)  # only inside strings, where the escape means the same character
    handle.write(text + "\n")


def _one_format(path: Path, seen: dict[str, list[int]]) -> str:
    if len(seen) <= 1:
        return next(iter(seen), "none")
    ranked = sorted(seen.items(), key=lambda item: -len(item[1]))
    detail = "; ".join(f"{fmt} on line(s) {_lines(lines)}" for fmt, lines in ranked)
    raise TunesmithError(f"{path}: mixed formats ({detail}); keep one format per file, or set data.format")


def _one_kind(formats: dict[str, str]) -> str:
    kinds = {KIND_OF_FORMAT[fmt] for fmt in formats.values() if fmt != "none"}
    if len(kinds) > 1:
        detail = ", ".join(f"{path}: {fmt}" for path, fmt in formats.items())
        raise TunesmithError(f"sources mix SFT and preference data ({detail}); use one kind per run")
    return kinds.pop() if kinds else "sft"


def _strict_message(problems: dict, dropped: Counter) -> str:
    first_reason = next(iter(problems))
    found = problems[first_reason]
    path, _, message = found[0]
    where = ", ".join(f"{p}:{line}" for p, line, _ in found[:LINES_SHOWN]) + (" ..." if len(found) > LINES_SHOWN else "")
    others = {reason: n for reason, n in dropped.items() if reason != first_reason}
    tail = f" Other problems: {_reasons(others)}." if others else ""
    return (f"{len(found)} row(s) with {first_reason.replace('_', ' ')} ({message}) at {where}.{tail} "
            f"Fix them, or set data.mode=lenient to drop bad rows (listed with reasons in data/dropped.jsonl).")


def _reasons(counts) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda item: -item[1]))


def _lines(lines: list[int]) -> str:
    return ", ".join(map(str, lines[:LINES_SHOWN])) + (f" and {len(lines) - LINES_SHOWN} more" if len(lines) > LINES_SHOWN else "")
