"""User-supplied scoring: metric functions referenced from the config, and JSON schemas read from files."""

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
