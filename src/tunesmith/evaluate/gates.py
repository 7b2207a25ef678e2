"""Gates: pass/fail rules over the report, such as `exact_match >= base + 0.20`, so CI can refuse a model."""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from tunesmith.errors import TunesmithError

COMPARISONS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_GATE = re.compile(rf"^\s*(?P<metric>[A-Za-z_][\w:.\-]*)\s*(?P<op>>=|<=|==|>|<)\s*"
                   rf"(?:(?P<base>base)\s*(?:(?P<arith>[-+*])\s*(?P<amount>{_NUMBER}))?|(?P<value>{_NUMBER}))\s*$")
EXAMPLE = '"exact_match >= base + 0.20", "general_ppl <= base * 1.05" or "json_valid >= 0.95"'


@dataclass(frozen=True)
class Gate:
    text: str
    metric: str
    op: str
    relative_to_base: bool
    arith: str | None
    amount: float

    def threshold(self, base_value: float | None) -> float:
        if not self.relative_to_base:
            return self.amount
        if base_value is None:
            raise TunesmithError(f"gate {self.text!r} compares with the base model, which was not evaluated "
                                 "(set evaluate.compare_base=true or use an absolute threshold)")
        if self.arith == "*":
            return base_value * self.amount
        return base_value + (self.amount if self.arith != "-" else -self.amount)


def parse_gate(text: str) -> Gate:
    """A gate from its text; a malformed gate is one clear error with examples."""
    match = _GATE.match(text)
    if not match:
        raise TunesmithError(f"gate {text!r} is not `METRIC OP base [+-* NUMBER]` or `METRIC OP NUMBER`; "
                             f"examples: {EXAMPLE}")
    relative = match["base"] is not None
    amount = float(match["amount"] or (1.0 if match["arith"] == "*" else 0.0)) if relative else float(match["value"])
    return Gate(text=text.strip(), metric=match["metric"], op=match["op"], relative_to_base=relative,
                arith=match["arith"], amount=amount)


def check_gates(gates: list[Gate], results: dict[str, dict], base_label: str | None) -> list[dict]:
    """Each gate against every model but the base: pass/fail, the threshold and the margin (value - threshold)."""
    outcomes = []
    for gate in gates:
        for label, scores in results.items():
            if label == base_label:
                continue
            if gate.metric not in scores:
                known = ", ".join(sorted(k for k, v in scores.items() if isinstance(v, (int, float))))
                raise TunesmithError(f"gate {gate.text!r}: no metric {gate.metric!r} in the report; known: {known}")
            base_value = results[base_label][gate.metric] if base_label in results else None
            value = scores[gate.metric]
            limit = gate.threshold(base_value)
            outcomes.append({"gate": gate.text, "model": label, "metric": gate.metric, "value": value,
                             "threshold": limit, "margin": value - limit,
                             "passed": bool(COMPARISONS[gate.op](value, limit))})
    return outcomes


def describe_outcome(outcome: dict) -> str:
    """One line: which gate, which model, the value, the threshold, and by how much it passed or failed."""
    verdict = "passed" if outcome["passed"] else "FAILED"
    return (f"gate {verdict}: {outcome['model']} {outcome['metric']} = {outcome['value']:.4g} vs threshold "
            f"{outcome['threshold']:.4g} ({outcome['gate']}), margin {outcome['margin']:+.4g}")
