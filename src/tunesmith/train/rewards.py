"""Verifiable rewards for GRPO: shipped scorers and users' own, each called as reward(completion, reference) -> float.

A reward is a plain function of the sampled answer and the dataset's answer for that prompt, so the same code can
score training samples and be unit-tested on hand-made strings. Evaluation's JSON and exact-match rules are reused,
so "the reward went up" means what "exact match went up" means in `tunesmith evaluate`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable

from tunesmith.config import GrpoConfig
from tunesmith.errors import TunesmithError
from tunesmith.data.answers import is_exact_match, load_custom_metrics, load_json_schema, parse_json_object

SHIPPED = ("json_valid", "json_schema", "exact_match", "field_match", "regex", "length")


@dataclass(frozen=True)
class Reward:
    """A named scorer: `score(completion, reference)` returns a finite float (shipped ones stay in [0, 1])."""

    name: str
    score: Callable[[str, str], float]


def json_valid(completion: str, reference: str) -> float:
    """1 when the answer is exactly one JSON object."""
    return float(parse_json_object(completion.strip()) is not None)


def exact_match(completion: str, reference: str) -> float:
    """1 when the answer equals the reference: as parsed JSON objects when the reference is one, else as text."""
    return float(is_exact_match(completion.strip(), reference, json_output=True))


def field_match(completion: str, reference: str) -> float:
    """Share of the reference JSON object's keys the answer gives the same value (a denser signal than exact match)."""
    expected = parse_json_object(reference)
    if not expected:  # not an object, or an empty one: no fields to share
        return exact_match(completion, reference)
    predicted = parse_json_object(completion.strip()) or {}
    return sum(key in predicted and predicted[key] == value for key, value in expected.items()) / len(expected)


def schema_reward(validator) -> Callable[[str, str], float]:
    """1 when the answer is JSON that `validator` (a jsonschema validator) accepts."""

    def json_schema(completion: str, reference: str) -> float:
        try:
            value = json.loads(completion)
        except (json.JSONDecodeError, ValueError):
            return 0.0
        return float(validator.is_valid(value))

    return json_schema


def regex_reward(pattern: re.Pattern) -> Callable[[str, str], float]:
    """1 when the whole answer (outer whitespace ignored) matches `pattern`, as evaluation's `regex_match`."""

    def regex(completion: str, reference: str) -> float:
        return float(pattern.fullmatch(completion.strip()) is not None)

    return regex


def length_reward(target_length: int | None) -> Callable[[str, str], float]:
    """1 at the target length in characters (unset: the reference's), falling linearly to 0 at zero and twice it."""

    def length(completion: str, reference: str) -> float:
        target = len(reference) if target_length is None else target_length
        if target == 0:
            return float(not completion)
        return max(0.0, 1.0 - abs(len(completion) - target) / target)

    return length


def load_rewards(settings: GrpoConfig) -> list[Reward]:
    """The rewards `train.grpo.rewards` names, in order; unknown names and missing settings are one clear error."""
    if not settings.rewards:
        raise TunesmithError(f"train.grpo.rewards is empty; name at least one of {', '.join(SHIPPED)} "
                             "or your own path/to/file.py:function")
    weights = settings.reward_weights
    if weights is not None and len(weights) != len(settings.rewards):
        raise TunesmithError(f"train.grpo.reward_weights has {len(weights)} weights for {len(settings.rewards)} "
                             "rewards; give one weight per reward, in the same order")
    return [_load_reward(name, settings) for name in settings.rewards]


def _load_reward(name: str, settings: GrpoConfig) -> Reward:
    if ":" in name:
        return _user_reward(name)
    if name == "json_valid":
        return Reward(name, json_valid)
    if name == "exact_match":
        return Reward(name, exact_match)
    if name == "field_match":
        return Reward(name, field_match)
    if name == "length":
        return Reward(name, length_reward(settings.target_length))
    if name == "json_schema":
        if settings.json_schema is None:
            raise TunesmithError("train.grpo.rewards names json_schema but train.grpo.json_schema is unset; "
                                 "point it at a JSON schema file")
        return Reward(name, schema_reward(load_json_schema(str(settings.json_schema))))
    if name == "regex":
        return Reward(name, regex_reward(_compiled(settings.regex)))
    raise TunesmithError(f"train.grpo.rewards: unknown reward {name!r}; shipped rewards are {', '.join(SHIPPED)}, "
                         "or name your own as path/to/file.py:function or package.module:function")


def _compiled(pattern: str | None) -> re.Pattern:
    if not pattern:
        raise TunesmithError("train.grpo.rewards names regex but train.grpo.regex is unset; set it to the regular "
                             "expression a whole answer must match")
    try:
        return re.compile(pattern, flags=re.DOTALL)
    except re.error as exc:
        raise TunesmithError(f"train.grpo.regex: {pattern!r} is not a valid regular expression ({exc})") from None


def _user_reward(reference: str) -> Reward:
    """A user's `file.py:function` / `module:function`, loaded and checked as evaluation loads custom metrics."""
    try:
        (name, score), = load_custom_metrics((reference,)).items()
    except TunesmithError as exc:
        raise _as_reward_error(exc) from None

    def checked(completion: str, expected: str) -> float:
        try:
            return score(completion, expected)
        except TunesmithError as exc:
            raise _as_reward_error(exc) from None

    return Reward(name, checked)


def _as_reward_error(exc: TunesmithError) -> TunesmithError:
    # The shared loader speaks of evaluation's setting; the user wrote the reference under train.grpo.rewards.
    message = str(exc).replace("evaluate.custom_metrics", "train.grpo.rewards").replace("custom metric", "reward")
    return TunesmithError(message)
