"""Gates: pass/fail rules over the report, such as `exact_match >= base + 0.20`, so CI can refuse a model.

A gate's threshold is a number, or relative to a reference model: `base` (the base model), `champion` (the
model that holds the alias a promotion would move) or `parent` (the run this one continued from,
`train.init_from`), each evaluated on the same examples.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from tunesmith.errors import TunesmithError

COMPARISONS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_GATE = re.compile(rf"^\s*(?P<metric>[A-Za-z_][\w:.\-]*)\s*(?P<op>>=|<=|==|>|<)\s*"
                   rf"(?:(?P<reference>base|champion|parent)\s*(?:(?P<arith>[-+*])\s*(?P<amount>{_NUMBER}))?"
                   rf"|(?P<value>{_NUMBER}))\s*$")
EXAMPLE = ('"exact_match >= base + 0.20", "general_ppl <= base * 1.05", "exact_match >= champion + 0.02", '
           '"general_qa >= parent - 0.05" or "json_valid >= 0.95"')
REFERENCES = ("base", "champion", "parent")
WHY_MISSING = {"base": " (set evaluate.compare_base=true or use an absolute threshold)",
               "champion": " (only `tunesmith promote` has a champion)",
               "parent": " (the run has no parent: it was not trained with train.init_from, or evaluate.compare_parent "
                         "is false)"}


@dataclass(frozen=True)
class Gate:
    text: str
    metric: str
    op: str
    reference: str | None
    """`base`, `champion`, `parent`, or None for an absolute threshold."""
    arith: str | None
    amount: float

    @property
    def relative_to_base(self) -> bool:
        return self.reference == "base"

    def threshold(self, reference_value: float) -> float:
        if self.reference is None:
            return self.amount
        if self.arith == "*":
            return reference_value * self.amount
        return reference_value + (self.amount if self.arith != "-" else -self.amount)


def parse_gate(text: str) -> Gate:
    """A gate from its text; a malformed gate is one clear error with examples."""
    match = _GATE.match(text)
    if not match:
        raise TunesmithError(f"gate {text!r} is not `METRIC OP base|champion|parent [+-* NUMBER]` or `METRIC OP NUMBER`; "
                             f"examples: {EXAMPLE}")
    relative = match["reference"] is not None
    amount = float(match["amount"] or (1.0 if match["arith"] == "*" else 0.0)) if relative else float(match["value"])
    return Gate(text=text.strip(), metric=match["metric"], op=match["op"], reference=match["reference"],
                arith=match["arith"], amount=amount)


def check_gates(gates: list[Gate], results: dict[str, dict], references: dict[str, str],
                ungated: tuple[str, ...] = ()) -> list[dict]:
    """Each gate against every model but the references (`{"base": label, "parent": label, ...}` for those evaluated)
    and the `ungated` ones shown for context: pass/fail, the threshold and the margin (value - threshold)."""
    outcomes = []
    for gate in gates:
        if gate.reference and gate.reference not in references:
            raise TunesmithError(f"gate {gate.text!r} compares with the {gate.reference} model, which was not evaluated"
                                 + WHY_MISSING[gate.reference])
        for label, scores in results.items():
            if label in references.values() or label in ungated:
                continue
            if gate.metric not in scores:
                known = ", ".join(sorted(k for k, v in scores.items() if isinstance(v, (int, float))))
                raise TunesmithError(f"gate {gate.text!r}: no metric {gate.metric!r} in the report; known: {known}")
            value = scores[gate.metric]
            limit = gate.threshold(results[references[gate.reference]][gate.metric] if gate.reference else 0.0)
            outcomes.append({"gate": gate.text, "model": label, "metric": gate.metric, "value": value,
                             "threshold": limit, "margin": value - limit,
                             "passed": bool(COMPARISONS[gate.op](value, limit))})
    return outcomes


def describe_outcome(outcome: dict) -> str:
    """One line: which gate, which model, the value, the threshold, and by how much it passed or failed."""
    verdict = "passed" if outcome["passed"] else "FAILED"
    return (f"gate {verdict}: {outcome['model']} {outcome['metric']} = {outcome['value']:.4g} vs threshold "
            f"{outcome['threshold']:.4g} ({outcome['gate']}), margin {outcome['margin']:+.4g}")
