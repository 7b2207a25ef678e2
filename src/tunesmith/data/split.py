"""Deterministic train/validation split by content hash: adding rows never moves old rows."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from tunesmith.types import ChatExample


def content_hash(example) -> str:
    """Stable hash of an example's content (ignores where it came from); chat examples hash their messages."""
    if isinstance(example, ChatExample):
        payload = [m.as_dict() for m in example.messages]
        if example.tools:
            payload = {"messages": payload, "tools": example.tools}
    else:
        payload = example.model_dump(exclude={"source_line"}, exclude_none=True)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def split_bucket(content: str, seed: int = 0) -> float:
    """Where a row falls in [0, 1) for the split: rows below the validation fraction are held out."""
    digest = hashlib.sha256(f"{seed}:{content}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_content_hash(
    examples: list[ChatExample], validation_fraction: float, seed: int = 0
) -> tuple[list[ChatExample], list[ChatExample]]:
    """Each example goes to validation when its salted content hash falls below the fraction."""
    train, validation = [], []
    for example in examples:
        (validation if split_bucket(content_hash(example), seed) < validation_fraction else train).append(example)
    return train, validation


def stratified_held_out(buckets: np.ndarray, labels: np.ndarray, validation_fraction: float) -> np.ndarray:
    """Held-out mask with the fraction met within each label: each label's lowest buckets are held out.

    Every label with two or more rows gets at least one held-out row. Unlike the plain split, an appended row
    can move a row near its label's boundary, the price of exact per-label fractions.
    """
    held_out = np.zeros(len(buckets), dtype=bool)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        count = round(len(rows) * validation_fraction)
        count = min(max(count, 1 if len(rows) > 1 else 0), len(rows) - 1)
        held_out[rows[np.argsort(buckets[rows], kind="stable")[:count]]] = True
    return held_out


def dataset_hash(examples: list[ChatExample]) -> str:
    """Version of a dataset: the same content gives the same hash, whatever the row order."""
    joined = "\n".join(sorted(content_hash(e) for e in examples))
    return hashlib.sha256(joined.encode()).hexdigest()
