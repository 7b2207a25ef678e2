"""`tunesmith data inspect`: what a data file holds and what is wrong with it, without writing anything."""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import islice
from pathlib import Path

from tunesmith.data.formats import KIND_OF_FORMAT
from tunesmith.data.readers import file_type, iter_raw_lines, iter_records
from tunesmith.data.rows import RowSettings, check_chunk, init_worker
from tunesmith.errors import TunesmithError

EXAMPLES_PER_REASON = 3


def inspect_file(path: Path, fmt: str = "auto", special_tokens: tuple[str, ...] = ()) -> dict:
    """Rows, formats, problems by reason (with the first lines), exact duplicates and PII that would be redacted."""
    path = Path(path)
    if not path.exists():  # no config is involved here, so the reader's data.train hint would mislead
        raise TunesmithError(f"{path} does not exist; pass a data file (.jsonl, .json, .csv, .parquet) or a saved "
                             "Hugging Face dataset folder")
    init_worker(RowSettings(fmt=None if fmt == "auto" else fmt, special_tokens=special_tokens, redact_pii=True))
    items = iter_raw_lines(path) if file_type(path) == "jsonl" else iter_records(path)
    formats, problems, reasons, pii = defaultdict(list), defaultdict(list), Counter(), Counter()
    seen, duplicates, rows = set(), 0, 0
    for chunk in iter(lambda: list(islice(items, 500)), []):
        for checked in check_chunk(chunk):
            rows += 1
            if checked.reason:
                reasons[checked.reason] += 1
                if len(problems[checked.reason]) < EXAMPLES_PER_REASON:
                    problems[checked.reason].append(f"{path}:{checked.line}: {checked.message}")
                continue
            formats[checked.fmt].append(checked.line)
            pii.update(checked.pii)
            duplicates += checked.exact in seen
            seen.add(checked.exact)
    return {"path": str(path), "file_type": file_type(path), "rows": rows, "valid": rows - sum(reasons.values()),
            "formats": {fmt: len(lines) for fmt, lines in formats.items()},
            "kinds": sorted({KIND_OF_FORMAT[fmt] for fmt in formats}),
            "problems": dict(reasons), "first_problems": dict(problems), "exact_duplicates": duplicates,
            "pii_found": dict(pii)}
