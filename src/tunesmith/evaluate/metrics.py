"""Task metrics on generated answers: exact match (JSON-aware), JSON validity, stop rate."""

from __future__ import annotations

import json

from tunesmith.evaluate.generate import Generation


def parse_json_object(text: str):
    """The answer as a JSON object, or None when it is not exactly one valid JSON object."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def normalize_text(text: str) -> str:
    return " ".join(text.split()).lower()


def is_exact_match(prediction: str, reference: str, json_output: bool) -> bool:
    """JSON tasks compare parsed objects (key order and spacing do not matter); text compares normalized."""
    if json_output:
        expected = parse_json_object(reference)
        if expected is not None:
            return parse_json_object(prediction) == expected
    return normalize_text(prediction) == normalize_text(reference)


def score_generations(generations: list[Generation], references: list[str], json_output: bool) -> dict:
    """Mean per-example scores, as fractions in [0, 1]."""
    count = max(len(generations), 1)
    scores = {
        "exact_match": sum(is_exact_match(g.text, r, json_output) for g, r in zip(generations, references)) / count,
        "stop_rate": sum(g.stopped for g in generations) / count,
        "mean_new_tokens": sum(g.new_tokens for g in generations) / count,
    }
    if json_output:
        scores["json_valid"] = sum(parse_json_object(g.text) is not None for g in generations) / count
    return scores
