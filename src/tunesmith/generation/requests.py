"""What a caller asks the engine for and what it hears back: requests, sampling options, per-choice updates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    """0 is greedy decoding."""
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    """Strings that end the answer; the text stops just before the first one."""
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: the chosen token's and the k most likely alternatives'."""


@dataclass
class GenerationRequest:
    model: str
    """A name the engine serves (a route)."""
    prompt_ids: list[int]
    params: SamplingParams
    n: int = 1
    """Independent choices sampled from one prompt (its prefill runs once)."""
    constraint: Callable[[], object] | None = None
    """Makes a fresh grammar matcher per choice; every token is then one the grammar allows."""
    deadline: float | None = None
    """`time.monotonic()` after which the request is dropped with a `Failed` event."""


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]] = field(default_factory=list)


@dataclass(frozen=True)
class ChoiceUpdate:
    """New text of one choice; the last update of a choice carries `finish_reason`."""

    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Failed:
    """The request ended without an answer: `reason` is "deadline" or "error"."""

    reason: str
    message: str


Event = ChoiceUpdate | Failed
