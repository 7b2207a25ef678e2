"""Deterministic train/validation split by content hash: adding rows never moves old rows."""

from __future__ import annotations

import hashlib
import json

from tunesmith.types import ChatExample


def content_hash(example: ChatExample) -> str:
    """Stable hash of an example's messages (ignores where it came from)."""
    payload = json.dumps([m.model_dump() for m in example.messages], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def split_by_content_hash(
    examples: list[ChatExample], validation_fraction: float, seed: int = 0
) -> tuple[list[ChatExample], list[ChatExample]]:
    """Each example goes to validation when its salted content hash falls below the fraction."""
    train, validation = [], []
    for example in examples:
        digest = hashlib.sha256(f"{seed}:{content_hash(example)}".encode()).digest()
        bucket = int.from_bytes(digest[:8], "big") / 2**64
        (validation if bucket < validation_fraction else train).append(example)
    return train, validation


def dataset_hash(examples: list[ChatExample]) -> str:
    """Version of a dataset: the same content gives the same hash, whatever the row order."""
    joined = "\n".join(sorted(content_hash(e) for e in examples))
    return hashlib.sha256(joined.encode()).hexdigest()
