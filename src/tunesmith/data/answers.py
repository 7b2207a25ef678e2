"""How an answer is judged against its reference, shared by evaluation's metrics and training's rewards: exact match
(parsed JSON objects, or normalized text), and your own scoring functions and JSON schemas, loaded by reference."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Callable

from tunesmith.errors import TunesmithError

HOW = "write `path/to/metrics.py:function` or `package.module:function`, where function(prediction, reference) returns a number"


@lru_cache(maxsize=8)
def load_custom_metrics(references: tuple[str, ...]) -> dict[str, Callable[[str, str], float]]:
    """Metric name (the function's name) -> a scorer that checks the function returns a finite number."""
    metrics = {}
    for reference in references:
        function = _import_function(reference)
        metrics[function.__name__] = _checked(function, reference)
    return metrics


def _import_function(reference: str):
    location, sep, name = reference.rpartition(":")
    if not sep or not location or not name.isidentifier():
        raise TunesmithError(f"evaluate.custom_metrics: {reference!r} is not a function reference; {HOW}")
    if location.endswith(".py"):
        path = Path(location)
        if not path.is_file():
            raise TunesmithError(f"evaluate.custom_metrics: {location} not found; {HOW}")
        spec = importlib.util.spec_from_file_location(f"tunesmith_custom_metric_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise TunesmithError(f"{path}: importing the custom metric failed ({type(exc).__name__}: {exc})") from None
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as exc:
            raise TunesmithError(f"evaluate.custom_metrics: cannot import {location!r} ({exc}); {HOW}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise TunesmithError(f"evaluate.custom_metrics: {location} has no function {name!r}; {HOW}")
    return function


def _checked(function, reference: str) -> Callable[[str, str], float]:
    def score(prediction: str, expected: str) -> float:
        try:
            value = function(prediction, expected)
        except Exception as exc:
            raise TunesmithError(f"custom metric {reference} raised {type(exc).__name__}: {exc} "
                                 f"(on prediction {prediction[:60]!r}); make it return a number for any text") from None
        if isinstance(value, bool) or (isinstance(value, (int, float)) and math.isfinite(value)):
            return float(value)
        raise TunesmithError(f"custom metric {reference} returned {value!r}; it must return a finite number")

    return score


def load_json_schema(path: str):
    """A validator for the JSON schema in `path`; a bad file or bad schema is one clear error."""
    from jsonschema import exceptions, validators

    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TunesmithError(f"evaluate.json_schema: {path} not found; point it at a JSON schema file") from None
    except json.JSONDecodeError as exc:
        raise TunesmithError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); fix the schema file") from None
    cls = validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except exceptions.SchemaError as exc:
        raise TunesmithError(f"{path}: not a valid JSON schema ({exc.message})") from None
    return cls(schema)


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
