"""A canary: the candidate's share of a route grows step by step while its answers stay as healthy as production's,
and drops to 0, for good, the moment they do not.

Each step gives the candidate `window` answers; they are judged against production's recent answers on error rate,
p95 latency and (when asked) the share of answers that are valid JSON. Errors and invalid JSON are judged as they
come, so a broken candidate is rolled back as soon as the window can no longer pass, not at its end.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from tunesmith.config import CanaryConfig

PRODUCTION_MEMORY = 4
"""Production's last `window x PRODUCTION_MEMORY` answers are the baseline."""
MIN_LATENCY_SAMPLES = 5
"""Fewer production answers than this and latency is not compared (there is nothing to compare with)."""


@dataclass(frozen=True)
class Outcome:
    """How one answer went: a server-side failure, its end-to-end latency, whether it parsed as JSON (None: unchecked)."""

    error: bool
    latency_s: float
    json_valid: bool | None = None


@dataclass(frozen=True)
class CanaryChange:
    """The candidate's share moved: `kind` step, complete or rollback; `reason` says why, `evidence` with figures."""

    kind: str
    share: float
    reason: str
    evidence: dict = field(default_factory=dict)


class CanaryController:
    """The candidate's current share (percent) and the window of answers that decides the next step."""

    def __init__(self, policy: CanaryConfig):
        self.policy = policy
        self.step = 0
        self.state = "running"
        self.production: deque[Outcome] = deque(maxlen=max(policy.window * PRODUCTION_MEMORY, 200))
        self.candidate: list[Outcome] = []

    def resume(self, kind: str, share: float) -> None:
        """Carry on where an earlier server left off: rolled back, complete, or at the step of `share`."""
        if kind == "rollback":
            self.state = "rolled_back"
        elif kind == "complete":
            self.state, self.step = "complete", len(self.policy.steps) - 1
        elif kind == "step" and share in self.policy.steps:
            self.state, self.step = "running", self.policy.steps.index(share)
        self.candidate = []

    @property
    def share(self) -> float:
        if self.state == "rolled_back":
            return 0.0
        return float(self.policy.steps[min(self.step, len(self.policy.steps) - 1)])

    def record(self, is_candidate: bool, outcome: Outcome) -> CanaryChange | None:
        """Count one answer; the change of share it causes, if any."""
        if not is_candidate:
            self.production.append(outcome)
            return None
        if self.state != "running":
            return None
        self.candidate.append(outcome)
        failure = self._failure(final=len(self.candidate) >= self.policy.window)
        if failure:
            self.state = "rolled_back"
            return CanaryChange("rollback", 0.0, failure, self._evidence())
        if len(self.candidate) < self.policy.window:
            return None
        evidence, self.candidate = self._evidence(), []
        if self.step + 1 >= len(self.policy.steps):
            self.state = "complete"
            return CanaryChange("complete", self.share, f"healthy through every step ({self.share:g}% of traffic); "
                                                        "promote it in the registry to make it production", evidence)
        self.step += 1
        return CanaryChange("step", self.share, f"healthy over {self.policy.window} answers: share now "
                                                f"{self.share:g}%", evidence)

    def _failure(self, final: bool) -> str | None:
        """Why the window fails (or can no longer pass), else None."""
        window, policy = self.policy.window, self.policy
        errors = sum(o.error for o in self.candidate)
        allowed_errors = (_rate(self.production, lambda o: o.error, 0.0) + policy.max_error_rate_increase) * window
        if errors > allowed_errors:
            return (f"error rate {errors}/{len(self.candidate)} exceeds production's "
                    f"{_rate(self.production, lambda o: o.error, 0.0):.1%} by more than "
                    f"{policy.max_error_rate_increase:.1%}")
        if policy.max_json_validity_drop is not None:
            checked = [o for o in self.production if o.json_valid is not None]
            floor = _rate(checked, lambda o: o.json_valid, 1.0) - policy.max_json_validity_drop
            invalid = sum(o.json_valid is False for o in self.candidate)
            if invalid > (1 - floor) * window + 1e-9:
                return (f"{invalid} of {len(self.candidate)} answers are not valid JSON; production's valid share is "
                        f"{_rate(checked, lambda o: o.json_valid, 1.0):.1%} and at most "
                        f"{policy.max_json_validity_drop:.1%} less is allowed")
        if final and len(self.production) >= MIN_LATENCY_SAMPLES:
            ours, theirs = _p95(self.candidate), _p95(self.production)
            if ours > theirs * policy.max_p95_latency_ratio:
                return (f"p95 latency {ours:.2f} s is over {policy.max_p95_latency_ratio:g}x production's "
                        f"{theirs:.2f} s")
        return None

    def _evidence(self) -> dict:
        def summary(outcomes) -> dict:
            checked = [o for o in outcomes if o.json_valid is not None]
            return {"answers": len(outcomes), "error_rate": _rate(outcomes, lambda o: o.error, 0.0),
                    "p95_latency_s": _p95(outcomes) if outcomes else None,
                    "json_valid": _rate(checked, lambda o: o.json_valid, None) if checked else None}

        return {"step": self.step, "candidate": summary(self.candidate), "production": summary(self.production)}


def _rate(outcomes, predicate, empty):
    outcomes = list(outcomes)
    return sum(bool(predicate(o)) for o in outcomes) / len(outcomes) if outcomes else empty


def _p95(outcomes) -> float:
    latencies = sorted(o.latency_s for o in outcomes)
    return latencies[min(len(latencies) - 1, math.ceil(0.95 * len(latencies)) - 1)] if latencies else 0.0
