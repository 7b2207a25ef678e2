"""Task metrics, scored per example so that models can be compared pair by pair on the same examples.

Every per-example score is a float in [0, 1] (1 is right) except `new_tokens`; a model's score is the
mean over examples. Classification macro-F1 is the one corpus-level metric (see `corpus_scores`).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache

from tunesmith.config import EvaluateConfig
from tunesmith.data.answers import is_exact_match, load_custom_metrics, parse_json_object
from tunesmith.evaluate.generate import Generation


def answer_tokens(text: str) -> list[str]:
    """SQuAD-style normalization: lowercase, no punctuation, no articles, split on whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall after SQuAD normalization."""
    pred, ref = answer_tokens(prediction), answer_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of words), from Google's `rouge-score`."""
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def match_label(prediction: str, labels: list[str]) -> str | None:
    """The label a free-text answer names (case and surrounding punctuation ignored), else None."""
    cleaned = prediction.strip().strip(string.punctuation + " ").lower()
    return next((label for label in labels if label.lower() == cleaned), None)


def _field_scores(predicted, expected: dict) -> dict[str, float]:
    return {f"field:{key}": float(isinstance(predicted, dict) and key in predicted and predicted[key] == value)
            for key, value in expected.items()}


def example_scores(generation: Generation, reference: str, settings: EvaluateConfig) -> dict[str, float]:
    """Every configured per-example metric for one answer."""
    text = generation.text
    scores = {
        "exact_match": float(is_exact_match(text, reference, settings.json_output)),
        "exact_match_raw": float(text == reference),
        "token_f1": token_f1(text, reference),
        "rouge_l": rouge_l(text, reference),
        "stop_rate": float(generation.stopped),
        "new_tokens": float(generation.new_tokens),
    }
    if settings.json_output or settings.json_schema:
        predicted = parse_json_object(text)
        scores["json_valid"] = float(predicted is not None)
        expected = parse_json_object(reference)
        if expected is not None:
            scores.update(_field_scores(predicted, expected))
        if settings.json_schema:
            scores["json_schema"] = float(predicted is not None and _schema_validator(str(settings.json_schema)).is_valid(predicted))
    if settings.labels:
        expected_label = match_label(reference, settings.labels)
        scores["accuracy"] = float(expected_label is not None and match_label(text, settings.labels) == expected_label)
    if settings.regex:
        scores["regex_match"] = float(re.fullmatch(settings.regex, text.strip(), flags=re.DOTALL) is not None)
    for name, function in load_custom_metrics(tuple(settings.custom_metrics)).items():
        scores[name] = function(text, reference)
    return scores


@lru_cache(maxsize=4)
def _schema_validator(path: str):
    from tunesmith.data.answers import load_json_schema

    return load_json_schema(path)


def score_examples(generations: list[Generation], references: list[str], settings: EvaluateConfig) -> dict[str, list[float]]:
    """Per-metric lists of per-example scores (metrics missing for some examples count as 0 there)."""
    rows = [example_scores(g, r, settings) for g, r in zip(generations, references)]
    names = list(dict.fromkeys(name for row in rows for name in row))
    return {name: [row.get(name, 0.0) for row in rows] for name in names}


def score_samples(samples: list[list[Generation]], references: list[str], settings: EvaluateConfig) -> dict[str, list[float]]:
    """Like `score_examples` when each example has several sampled answers: an example's score is their mean."""
    per_sample = [score_examples([choices[j] for choices in samples], references, settings)
                  for j in range(max((len(choices) for choices in samples), default=1))]
    if len(per_sample) == 1:
        return per_sample[0]
    names = dict.fromkeys(name for scores in per_sample for name in scores)
    return {name: [sum(scores[name][i] if name in scores else 0.0 for scores in per_sample) / len(per_sample)
                   for i in range(len(references))] for name in names}


def corpus_scores(generations: list[Generation], references: list[str], settings: EvaluateConfig) -> dict[str, float]:
    """Metrics that are not a mean over examples: classification macro-F1 over the configured label set."""
    if not settings.labels:
        return {}
    from sklearn.metrics import f1_score

    gold = [match_label(r, settings.labels) or "<unknown>" for r in references]
    predicted = [match_label(g.text, settings.labels) or "<invalid>" for g in generations]
    return {"macro_f1": float(f1_score(gold, predicted, labels=settings.labels, average="macro", zero_division=0))}


def score_generations(generations: list[Generation], references: list[str], json_output: bool) -> dict:
    """Mean per-example scores for a quick look, as fractions in [0, 1] (plus mean answer tokens)."""
    per_example = score_examples(generations, references, EvaluateConfig(json_output=json_output))
    means = {name: sum(values) / max(len(values), 1) for name, values in per_example.items()
             if not name.startswith("field:")}
    means["mean_new_tokens"] = means.pop("new_tokens")
    return means
