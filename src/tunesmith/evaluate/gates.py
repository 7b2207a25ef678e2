"""Gates: pass/fail rules over the report, such as `exact_match >= base + 0.20`, so CI can refuse a model.

A gate's threshold is a number, or relative to a reference model: `base` (the base model), `champion` (the
model that holds the alias a promotion would move) or `parent` (the run this one continued from,
`train.init_from`), each evaluated on the same examples.
"""

from __future__ import annotations

import difflib
import operator
import re
from dataclasses import dataclass

from tunesmith.config import EvaluateConfig, RunConfig
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


# Every metric an evaluation can report, and the option that makes it report one it does not by default.
ALWAYS_REPORTED = ("exact_match", "exact_match_raw", "token_f1", "rouge_l", "stop_rate", "mean_new_tokens",
                   "validation_loss", "perplexity", "seconds")
REPORTED_WHEN = {"json_valid": "set evaluate.json_output=true (or evaluate.json_schema)",
                 "json_schema": "set evaluate.json_schema to a JSON schema file",
                 "accuracy": "list the classes in evaluate.labels", "macro_f1": "list the classes in evaluate.labels",
                 "regex_match": "set evaluate.regex",
                 "general_qa": "set evaluate.general_check=true", "general_ppl": "set evaluate.general_check=true",
                 "judge_win_rate": "set evaluate.judge.base_url (and evaluate.judge.model)"}


def reported_metrics(settings: EvaluateConfig) -> list[str]:
    """The metric names an evaluation with these settings reports for every model (besides `field:KEY` of JSON answers
    and `harness:TASK:METRIC`, whose names come from the data and the harness)."""
    from tunesmith.data.answers import load_custom_metrics

    reported = {"json_valid": settings.json_output or bool(settings.json_schema),
                "json_schema": bool(settings.json_schema), "accuracy": bool(settings.labels),
                "macro_f1": bool(settings.labels), "regex_match": bool(settings.regex),
                "general_qa": settings.general_check, "general_ppl": settings.general_check,
                "judge_win_rate": bool(settings.judge.base_url)}
    return [*ALWAYS_REPORTED, *(name for name, on in reported.items() if on),
            *load_custom_metrics(tuple(settings.custom_metrics))]


def check_gate_metrics(gates: list[Gate], settings: EvaluateConfig) -> None:
    """Every gate names a metric these settings report; checked before any model loads, so a typo costs no minutes."""
    known = reported_metrics(settings)
    for gate in gates:
        metric = gate.metric
        if metric in known:
            continue
        if metric.startswith("field:") and len(metric) > len("field:"):
            if "json_valid" in known:
                continue
            raise TunesmithError(f"gate {gate.text!r}: per-field metrics such as {metric!r} are reported only for JSON "
                                 f"answers; {REPORTED_WHEN['json_valid']}, or remove the gate")
        if metric.startswith("harness:"):  # a group task reports its subtasks, so any TASK may be right
            if settings.harness.tasks and metric.count(":") >= 2:
                continue
            raise TunesmithError(f"gate {gate.text!r}: harness metrics are named harness:TASK:METRIC (such as "
                                 "harness:arc_easy:acc) and reported only for the tasks in evaluate.harness.tasks "
                                 f"(now: {', '.join(settings.harness.tasks) or 'none'}); fix the gate or add the task")
        if metric in REPORTED_WHEN:
            raise TunesmithError(f"gate {gate.text!r}: {metric} is not reported with this config; "
                                 f"{REPORTED_WHEN[metric]}, or remove the gate")
        close = difflib.get_close_matches(metric, [*known, *REPORTED_WHEN], n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise TunesmithError(f"gate {gate.text!r}: no metric {metric!r}; {hint}this evaluation reports: "
                             f"{', '.join(known)}")


def check_config_gates(config: RunConfig, extra: list[str] | tuple[str, ...] = ()) -> list[Gate]:
    """The config's gates (evaluate.gates, registry.promote_if) and `extra`, parsed and their metrics checked against
    what its evaluation will report: for commands that train first, so a typo fails before the minutes of training."""
    gates = [parse_gate(text) for text in [*config.evaluate.gates, *config.registry.promote_if, *extra]]
    check_gate_metrics(gates, config.evaluate)
    return gates


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
