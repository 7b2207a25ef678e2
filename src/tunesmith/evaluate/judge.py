"""LLM-as-judge over any OpenAI-compatible endpoint: pairwise, each pair asked twice with the answers swapped.

A pair counts as a win or loss only when both orders agree; disagreement (position bias) is a tie, and
the share of pairs where the two orders agree is reported as `position_agreement`.
"""

from __future__ import annotations

import os
import re

from tunesmith.config import JudgeConfig
from tunesmith.errors import TunesmithError

SYSTEM = "You are an impartial judge. You compare two answers to the same request and name the better one."
VERDICT = re.compile(r"^\W*(TIE|A|B)\b")


def judge_prompt(rubric: str, request: str, reference: str | None, first: str, second: str) -> str:
    parts = [f"Rubric: {rubric}", f"[Request]\n{request}"]
    if reference is not None:
        parts.append(f"[Reference answer]\n{reference}")
    parts += [f"[Answer A]\n{first}", f"[Answer B]\n{second}",
              "Which answer is better under the rubric? Reply with exactly one word: A, B or TIE."]
    return "\n\n".join(parts)


def parse_verdict(text: str) -> str | None:
    """`A`, `B` or `TIE` from the start of the judge's reply; None when it said something else."""
    match = VERDICT.match((text or "").strip().upper())
    return match.group(1) if match else None


def combine(verdict_candidate_second: str | None, verdict_candidate_first: str | None) -> str:
    """One outcome for the candidate from the two orders: win, loss, tie (including disagreement) or invalid."""
    first = {"A": "loss", "B": "win", "TIE": "tie"}.get(verdict_candidate_second)
    second = {"A": "win", "B": "loss", "TIE": "tie"}.get(verdict_candidate_first)
    if first is None or second is None:
        return "invalid"
    return first if first == second else "tie"


def summarize(outcomes: list[str], agreed: list[bool], metric_deltas: list[float]) -> dict:
    """Win rate (ties count half), counts, position agreement and agreement with the task metric."""
    valid = [o for o in outcomes if o != "invalid"]
    decided = [(o, d) for o, d in zip(outcomes, metric_deltas) if o in ("win", "loss") and d != 0]
    counts = {k: outcomes.count(k) for k in ("win", "loss", "tie", "invalid")}
    return {
        "wins": counts["win"], "losses": counts["loss"], "ties": counts["tie"], "invalid": counts["invalid"],
        "judged": len(outcomes),
        "win_rate": (counts["win"] + 0.5 * counts["tie"]) / len(valid) if valid else None,
        "position_agreement": sum(agreed) / len(valid) if valid else None,
        "metric_agreement": (sum((o == "win") == (d > 0) for o, d in decided) / len(decided)) if decided else None,
    }


def judge_candidate(settings: JudgeConfig, requests: list[str], references: list[str | None],
                    base_answers: list[str], candidate_answers: list[str], metric_deltas: list[float],
                    on_item=None) -> dict:
    """Judge the candidate against the base on up to `settings.max_examples` examples; a summary plus per-example rows."""
    from openai import APIConnectionError, APIError, OpenAI

    client = OpenAI(base_url=settings.base_url, api_key=os.environ.get(settings.api_key_env) or "unused",
                    timeout=settings.timeout_s, max_retries=1)

    def ask(content: str) -> str:
        try:
            reply = client.chat.completions.create(
                model=settings.model, temperature=0, max_tokens=4,
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}])
        except APIConnectionError as exc:
            raise TunesmithError(f"evaluate.judge.base_url {settings.base_url}: cannot reach the judge ({exc}); "
                                 "start the endpoint or fix the URL") from None
        except APIError as exc:
            raise TunesmithError(f"judge endpoint {settings.base_url} refused the request: {exc.message}; "
                                 "check evaluate.judge.model and the API key") from None
        return reply.choices[0].message.content or ""

    count = min(settings.max_examples, len(requests))
    rows, outcomes, agreed = [], [], []
    for i in range(count):
        candidate_second = ask(judge_prompt(settings.rubric, requests[i], references[i], base_answers[i], candidate_answers[i]))
        candidate_first = ask(judge_prompt(settings.rubric, requests[i], references[i], candidate_answers[i], base_answers[i]))
        v1, v2 = parse_verdict(candidate_second), parse_verdict(candidate_first)
        outcome = combine(v1, v2)
        outcomes.append(outcome)
        agreed.append(outcome in ("win", "loss") or (v1 == v2 == "TIE"))
        rows.append({"index": i, "verdict_candidate_as_b": v1, "verdict_candidate_as_a": v2, "outcome": outcome,
                     "raw": [candidate_second, candidate_first]})
        if on_item:
            on_item(1)
    return {"model": settings.model, "base_url": settings.base_url, "rubric": settings.rubric,
            **summarize(outcomes, agreed, metric_deltas[:count]), "examples": rows}
