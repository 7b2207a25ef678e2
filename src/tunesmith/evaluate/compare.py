"""Paired comparison of two models on the same examples: bootstrap intervals, a significance test, wins/losses.

Intervals come from scipy's bootstrap (percentile method) over examples; the p-value from scipy's paired
permutation test (randomly swapping which model gave each example's answer), both two-sided.
"""

from __future__ import annotations

import warnings

NOT_COMPARED = {"new_tokens"}  # answer length is shown per model; longer is neither better nor worse


def mean_interval(values: list[float], confidence: float, resamples: int, seed: int = 0) -> tuple[float, float]:
    """Bootstrap confidence interval of a mean."""
    import numpy as np
    from scipy.stats import bootstrap

    data = np.asarray(values, dtype=float)
    if len(data) < 2 or np.all(data == data[0]):
        return float(data.mean()) if len(data) else 0.0, float(data.mean()) if len(data) else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = bootstrap((data,), np.mean, confidence_level=confidence, n_resamples=resamples,
                           method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def paired_comparison(base: list[float], candidate: list[float], confidence: float, resamples: int,
                      seed: int = 0) -> dict:
    """Mean difference (candidate - base) with its paired-bootstrap interval, p-value and wins/losses/ties."""
    import numpy as np
    from scipy.stats import permutation_test

    a, b = np.asarray(base, dtype=float), np.asarray(candidate, dtype=float)
    difference = b - a
    low, high = mean_interval(difference.tolist(), confidence, resamples, seed)
    if len(difference) < 2 or np.all(difference == 0):
        p_value = 1.0
    else:
        result = permutation_test((b, a), lambda x, y, axis: np.mean(x - y, axis=axis), vectorized=True,
                                  permutation_type="samples", n_resamples=resamples, alternative="two-sided",
                                  rng=np.random.default_rng(seed))
        p_value = float(result.pvalue)
    return {
        "base": float(a.mean()), "candidate": float(b.mean()), "delta": float(difference.mean()),
        "delta_low": low, "delta_high": high, "p_value": p_value,
        "significant": bool(p_value < 1 - confidence),
        "wins": int((difference > 0).sum()), "losses": int((difference < 0).sum()), "ties": int((difference == 0).sum()),
    }


def compare_models(base_scores: dict[str, list[float]], candidate_scores: dict[str, list[float]],
                   confidence: float, resamples: int) -> dict[str, dict]:
    """`paired_comparison` for every per-example metric both models have."""
    return {name: paired_comparison(base_scores[name], candidate_scores[name], confidence, resamples)
            for name in base_scores if name in candidate_scores and name not in NOT_COMPARED}


def largest_differences(base_scores: dict[str, list[float]], candidate_scores: dict[str, list[float]],
                        count: int) -> dict[str, list[int]]:
    """Indices of the examples where the candidate gained most and lost most (exact match first, then F1)."""
    def gain(index: int) -> tuple[float, float]:
        return tuple(candidate_scores[m][index] - base_scores[m][index] for m in ("exact_match", "token_f1")
                     if m in base_scores and m in candidate_scores) or (0.0,)

    indices = range(len(next(iter(base_scores.values()), [])))
    ordered = sorted(indices, key=gain, reverse=True)
    return {"gained": [i for i in ordered[:count] if any(g > 0 for g in gain(i))],
            "lost": [i for i in reversed(ordered[-count:]) if any(g < 0 for g in gain(i))] if count else []}


def lost_ground(metrics: dict[str, dict]) -> list[dict]:
    """The metrics of a paired comparison (`compare_models`, before -> after) that got significantly worse.

    Every per-example score is higher-is-better (see `metrics`), so a significant negative delta is lost ground."""
    return [{"metric": name, "parent": c["base"], "child": c["candidate"], "delta": c["delta"], "p_value": c["p_value"]}
            for name, c in metrics.items() if c["significant"] and c["delta"] < 0]
