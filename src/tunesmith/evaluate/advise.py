"""Was fine-tuning worth it? The base model prompted (zero-shot and with k few-shot examples) against short LoRA runs
on 25%, 50% and 100% of the training split, all scored on the same held-out examples, and a verdict in plain words.

Scores are the task metric in [0, 1]: `accuracy` when evaluate.labels is set, else `exact_match`. The decision rule:

- prompting scores the better of zero-shot and k-shot; k-shot counts as better only when it wins by MIN_GAIN, since
  its examples cost prompt tokens on every request.
- the learning curve is a least-squares line of score against log2(training examples); its slope is the gain per
  doubling of the data, and it is extrapolated to twice the data.
1. gather more data: the slope is at least STEEP_RISE per doubling, the 100% run is below SATURATED, and the curve
   extrapolated to twice the data beats prompting by MIN_GAIN (more data is the cheapest next gain).
2. fine-tune: the 100% run beats prompting by at least MIN_GAIN; or prompting needs its k examples, they add
   LONG_PROMPT tokens or more to every request, and the 100% run scores at least as well (it saves those tokens).
3. prompt: otherwise; a smaller gain does not pay for training, versioning and serving an adapter (and on a few dozen
   held-out examples it is within noise). When neither scores LOW_SCORE, the advice says so: the task, the data or
   the metric needs a look first, or the short runs need more steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from tunesmith.config import EvaluateConfig
from tunesmith.evaluate.generate import generate_batched
from tunesmith.evaluate.metrics import score_examples
from tunesmith.types import ChatExample

SHARES = (0.25, 0.5, 1.0)
"""Shares of the training split the learning curve trains on (nested: each smaller share is inside the next)."""
MIN_GAIN = 0.10
"""Points (as a fraction) fine-tuning must win by over prompting, and k-shot over zero-shot, to be worth its cost."""
STEEP_RISE = 0.10
"""Gain per doubling of the training data from which the curve counts as still rising steeply."""
SATURATED = 0.95
"""A 100% run scoring this or more has too little room left for more data to be the advice."""

LONG_PROMPT = 150
"""Extra prompt tokens per request from which a fine-tune that only matches k-shot prompting still pays for itself."""
LOW_SCORE = 0.5
"""Below this, prompting that fine-tuning cannot beat is no success either, and the advice says so."""

PROMPT, FINE_TUNE, MORE_DATA = "prompt", "fine-tune", "gather more data"


@dataclass(frozen=True)
class CurvePoint:
    """One short LoRA run of the learning curve: how much data it saw and how it scored."""

    share: float
    examples: int
    steps: int
    score: float


@dataclass(frozen=True)
class Advice:
    verdict: str
    """`prompt`, `fine-tune` or `gather more data`."""
    reason: str
    """The verdict in plain words, with the numbers behind it."""
    metric: str
    zero_shot: float
    few_shot: float
    shots: int
    curve: tuple[CurvePoint, ...]
    gain_per_doubling: float
    projected_at_double: float
    """The fitted curve's score at twice the training data (capped at 1)."""
    extra_prompt_tokens: float
    """Prompt tokens the k examples add to every request."""
    cost_per_million_requests: float

    @property
    def fine_tuned(self) -> float:
        return self.curve[-1].score

    @property
    def prompting(self) -> float:
        return self.few_shot if self.few_shot_wins else self.zero_shot

    @property
    def few_shot_wins(self) -> bool:
        return self.shots > 0 and at_least(self.few_shot - self.zero_shot, MIN_GAIN)

    def as_dict(self) -> dict:
        return {**asdict(self), "fine_tuned": self.fine_tuned, "prompting": self.prompting,
                "thresholds": {"min_gain": MIN_GAIN, "steep_rise": STEEP_RISE, "saturated": SATURATED,
                               "low_score": LOW_SCORE, "long_prompt": LONG_PROMPT}}


def task_metric(settings: EvaluateConfig) -> str:
    """The one metric the advice weighs: label accuracy for classification, else (JSON-aware) exact match."""
    return "accuracy" if settings.labels else "exact_match"


def learning_curve_fit(curve: tuple[CurvePoint, ...]) -> tuple[float, float]:
    """Least-squares line of score against log2(examples): (gain per doubling, score at twice the largest share)."""
    import numpy as np

    x = np.log2([max(point.examples, 1) for point in curve])
    y = np.array([point.score for point in curve])
    if len(set(x.tolist())) < 2:  # every share rounded to the same size: no curve to fit
        return 0.0, float(y[-1])
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(min(1.0, max(0.0, intercept + slope * (x[-1] + 1))))


def decide(metric: str, zero_shot: float, few_shot: float, shots: int, curve: tuple[CurvePoint, ...],
           extra_prompt_tokens: float = 0.0, cost_per_million: float = 0.0) -> Advice:
    """Apply the module's decision rule to measured scores."""
    slope, projected = learning_curve_fit(curve)
    advice = Advice("", "", metric, zero_shot, few_shot, shots, curve, slope, projected, extra_prompt_tokens,
                    cost_per_million)
    prompting, tuned = advice.prompting, advice.fine_tuned
    how = f"prompting with {shots} examples" if advice.few_shot_wins else "prompting zero-shot"
    numbers = f"{how} scores {pct(prompting)}, fine-tuning reached {pct(tuned)} {metric}"
    saves_long_prompt = advice.few_shot_wins and extra_prompt_tokens >= LONG_PROMPT and at_least(tuned, prompting)
    if at_least(slope, STEEP_RISE) and tuned < SATURATED and at_least(projected - prompting, MIN_GAIN):
        verdict = MORE_DATA
        reason = (f"gather more data: the curve is still rising steeply ({points(slope)} points per doubling of the "
                  f"data; about {pct(projected)} expected with twice as much); {numbers}")
    elif at_least(tuned - prompting, MIN_GAIN) or saves_long_prompt:
        verdict = FINE_TUNE
        saving = (f", and saves {extra_prompt_tokens:.0f} prompt tokens per request ({cost_per_million:,.2f} per 1M "
                  f"requests) over {shots}-shot prompting" if shots and extra_prompt_tokens else "")
        reason = f"fine-tune: {points(tuned - prompting)} points over prompting ({numbers}){saving}"
    else:
        verdict = PROMPT
        reason = (f"don't fine-tune, prompt: {numbers} (a gain under {points(MIN_GAIN)} points does not pay for "
                  f"training and serving an adapter)")
        if max(prompting, tuned) < LOW_SCORE:
            reason += (f"; but neither reaches {pct(LOW_SCORE)}: check the data and the metric, or give the short "
                       "runs more steps (--steps)")
    return replace(advice, verdict=verdict, reason=reason)


def at_least(value: float, threshold: float) -> bool:
    """`value >= threshold` for scores that are means of a few dozen 0/1 results (1.0 - 0.9 is 0.0999...)."""
    return round(value, 9) >= threshold


def pct(score: float) -> str:
    return f"{score:.0%}"


def points(delta: float) -> str:
    """A score difference in percentage points, signed."""
    return f"{delta * 100:+.0f}"


def share_sizes(rows: int, shares: tuple[float, ...] = SHARES) -> list[int]:
    """Training examples in each share of a split of `rows` (at least one each)."""
    return [max(1, math.ceil(rows * share)) for share in shares]


def task_scores(model, tokenizer, conversations: list[list[dict]], examples: list[ChatExample], stop_ids: list[int],
                settings: EvaluateConfig, on_answer: Callable[[int], None] | None = None) -> list[float]:
    """Greedy answers to each conversation, scored per example against the examples' references by the task metric."""
    answers = generate_batched(model, tokenizer, conversations, stop_ids, settings.max_new_tokens,
                               settings.batch_size, on_batch=on_answer, tools=[e.tools for e in examples])
    scores = score_examples(answers, [e.reference() for e in examples], settings)
    return scores[task_metric(settings)]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
