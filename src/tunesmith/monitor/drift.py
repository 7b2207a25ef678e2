"""Input drift: production prompts against the training prompts, and each window of production against the first.

Length and token statistics are compared with the population stability index (PSI, bins at the training deciles)
and the two-sample Kolmogorov-Smirnov test; vocabulary and topic with a domain classifier, as Evidently does for
text: TF-IDF + logistic regression trained to tell production prompts from training ones. Its cross-validated ROC
AUC is 0.5 when it cannot (no drift); the prompts it scores most "unlike training" show what changed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from pydantic import BaseModel, Field

PSI_BANDS = ((0.1, "stable"), (0.25, "moderate"), (float("inf"), "significant"))
"""PSI below 0.1: stable; 0.1 to 0.25: moderate; above 0.25: significant (the usual credit-scoring bands)."""
PSI_BINS = 10
PSI_FLOOR = 1e-4  # an empty bin would make the log ratio infinite
FEATURES = ("prompt_chars", "prompt_tokens", "chars_per_token", "distinct_token_share")
MIN_PROMPTS = 20
"""Fewer prompts than this on a side (the whole period or one window) give no drift figures: too noisy."""
TOP_PROMPTS, TOP_WORDS = 5, 10

Tokenize = Callable[[list[str]], list[list]]
"""Texts -> their tokens (ids or strings), one list per text."""


class FeatureDrift(BaseModel):
    """One prompt statistic, training against production."""

    feature: str
    psi: float
    band: str
    """stable, moderate or significant, by the PSI bands."""
    ks_statistic: float
    ks_pvalue: float
    drifted: bool
    """PSI above the threshold and the KS test significant (so a small sample's noisy PSI does not flag alone)."""
    train_mean: float
    production_mean: float
    bin_edges: list[float]
    """Inner edges of the PSI bins (the training deciles); bin i holds values up to edge i."""
    train_shares: list[float]
    production_shares: list[float]


class ScoredPrompt(BaseModel):
    text: str
    score: float
    """The classifier's out-of-fold probability that the prompt is production, not training."""


class WordWeight(BaseModel):
    word: str
    weight: float


class DomainDrift(BaseModel):
    """The domain classifier: can TF-IDF + logistic regression tell production prompts from training ones?"""

    auc: float
    drifted: bool
    """AUC above the threshold, and a Mann-Whitney test of the two sides' scores significant."""
    train_prompts: int
    production_prompts: int
    sampled: str | None = None
    """Said when the prompts were subsampled to keep the classifier fast."""
    top_prompts: list[ScoredPrompt] = Field(default_factory=list)
    production_words: list[WordWeight] = Field(default_factory=list)
    """Words that most mark a prompt as production (largest positive coefficients)."""
    training_words: list[WordWeight] = Field(default_factory=list)
    """Words that most mark a prompt as training (production lacks them)."""


class WindowDrift(BaseModel):
    """One window of production: against training, and against the first window."""

    start: str
    prompts: int
    psi: dict[str, float] = Field(default_factory=dict)
    psi_vs_first: dict[str, float] = Field(default_factory=dict)
    domain_auc: float | None = None
    """AUC of this window's out-of-fold classifier scores against the training prompts' scores."""
    domain_auc_vs_first: float | None = None
    """The same against the first window's scores: how much less training-like this window is than the first."""
    verdict: str = "unknown"


class InputDrift(BaseModel):
    verdict: str
    """significant, moderate, stable, or unknown (no prompt texts to compare)."""
    summary: str
    """The verdict in plain words, with the figures behind it."""
    token_unit: str
    features: list[FeatureDrift] = Field(default_factory=list)
    domain: DomainDrift | None = None
    windows: list[WindowDrift] = Field(default_factory=list)
    drift_starts: str | None = None
    """The first window whose drift is significant."""
    notes: list[str] = Field(default_factory=list)


def last_user_text(messages: Sequence[dict] | None) -> str | None:
    """The text of the last user message (OpenAI content parts joined); None when there is none."""
    for message in reversed(messages or []):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
            return content if isinstance(content, str) else None
    return None


def whitespace_tokens(texts: list[str]) -> list[list[str]]:
    return [text.split() for text in texts]


def prompt_features(texts: list[str], tokenize: Tokenize) -> dict[str, np.ndarray]:
    """Length in characters and tokens, mean characters per token and the share of distinct tokens, per prompt."""
    tokens = tokenize(texts)
    chars = np.fromiter((len(text) for text in texts), dtype=float, count=len(texts))
    counts = np.fromiter((len(t) for t in tokens), dtype=float, count=len(texts))
    distinct = np.fromiter((len(set(t)) for t in tokens), dtype=float, count=len(texts))
    safe_counts = np.maximum(counts, 1)
    return {"prompt_chars": chars, "prompt_tokens": counts, "chars_per_token": chars / safe_counts,
            "distinct_token_share": distinct / safe_counts}


def psi_band(psi: float) -> str:
    return next(band for limit, band in PSI_BANDS if psi < limit)


def psi_bins(reference: np.ndarray) -> np.ndarray:
    """Inner bin edges at the reference's deciles (fewer when values repeat)."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, PSI_BINS + 1)))
    if len(edges) == 1:  # one value: bins below it, at it, above it
        return np.r_[np.nextafter(edges[0], -np.inf), edges[0]]
    return edges[1:-1] if len(edges) > 2 else edges[:1]


def bin_shares(values: np.ndarray, inner_edges: np.ndarray) -> np.ndarray:
    counts = np.bincount(np.searchsorted(inner_edges, values, side="left"), minlength=len(inner_edges) + 1)
    return counts / max(len(values), 1)


def population_stability_index(reference: np.ndarray, current: np.ndarray) -> float:
    edges = psi_bins(reference)
    return _psi(bin_shares(reference, edges), bin_shares(current, edges))


def _psi(expected: np.ndarray, actual: np.ndarray) -> float:
    expected, actual = np.maximum(expected, PSI_FLOOR), np.maximum(actual, PSI_FLOOR)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def feature_drift(feature: str, train: np.ndarray, production: np.ndarray, psi_threshold: float,
                  alpha: float) -> FeatureDrift:
    from scipy.stats import ks_2samp

    edges = psi_bins(train)
    train_shares, production_shares = bin_shares(train, edges), bin_shares(production, edges)
    psi = _psi(train_shares, production_shares)
    ks = ks_2samp(train, production)
    return FeatureDrift(feature=feature, psi=round(psi, 4), band=psi_band(psi),
                        ks_statistic=round(float(ks.statistic), 4), ks_pvalue=float(ks.pvalue),
                        drifted=bool(psi > psi_threshold and ks.pvalue < alpha),
                        train_mean=round(float(train.mean()), 3), production_mean=round(float(production.mean()), 3),
                        bin_edges=[round(float(edge), 4) for edge in edges],
                        train_shares=[round(float(s), 4) for s in train_shares],
                        production_shares=[round(float(s), 4) for s in production_shares])


def domain_classifier(train_texts: list[str], production_texts: list[str], auc_threshold: float,
                      alpha: float, max_per_side: int, seed: int = 0) -> tuple[DomainDrift, dict] | None:
    """The classifier's verdict, and its out-of-fold scores (`train`, `production`, and `production_index`: which
    production prompts were scored); None when a side has too few prompts or no words."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline

    if min(len(train_texts), len(production_texts)) < MIN_PROMPTS:
        return None
    rng = np.random.default_rng(seed)
    train_index = _sample(len(train_texts), max_per_side, rng)
    production_index = _sample(len(production_texts), max_per_side, rng)
    texts = [train_texts[i] for i in train_index] + [production_texts[i] for i in production_index]
    labels = np.r_[np.zeros(len(train_index)), np.ones(len(production_index))]
    classifier = make_pipeline(TfidfVectorizer(sublinear_tf=True, max_features=50_000),
                               LogisticRegression(max_iter=1000, class_weight="balanced"))
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    try:
        scores = cross_val_predict(classifier, texts, labels, cv=folds, method="predict_proba")[:, 1]
        classifier.fit(texts, labels)
    except ValueError as exc:  # every prompt without a word (only punctuation or empty): nothing to learn from
        if "empty vocabulary" in str(exc):
            return None
        raise
    auc = float(roc_auc_score(labels, scores))
    train_scores, production_scores = scores[:len(train_index)], scores[len(train_index):]
    sampled = " and ".join(f"{len(index):,} of {len(side):,} {label} prompts" for index, side, label in (
        (train_index, train_texts, "training"), (production_index, production_texts, "production"))
        if len(index) < len(side))
    words = classifier[0].get_feature_names_out()
    weights = classifier[1].coef_[0]
    order = np.argsort(weights)
    verdict = DomainDrift(
        auc=round(auc, 4), drifted=_auc_drifted(auc, train_scores, production_scores, auc_threshold, alpha),
        train_prompts=len(train_index),
        production_prompts=len(production_index),
        sampled=f"the domain classifier used a random {sampled} (--classifier-prompts)" if sampled else None,
        top_prompts=_most_unlike_training(production_texts, production_index, production_scores),
        production_words=[WordWeight(word=words[i], weight=round(float(weights[i]), 3))
                          for i in order[::-1][:TOP_WORDS] if weights[i] > 0],
        training_words=[WordWeight(word=words[i], weight=round(float(weights[i]), 3))
                        for i in order[:TOP_WORDS] if weights[i] < 0])
    return verdict, {"train": train_scores, "production": production_scores, "production_index": production_index}


def _auc_drifted(auc: float, reference: np.ndarray, current: np.ndarray, auc_threshold: float,
                 alpha: float) -> bool:
    """AUC above the threshold, and the scores' Mann-Whitney test agrees (a small sample's AUC is noisy)."""
    from scipy.stats import mannwhitneyu

    return bool(auc > auc_threshold and mannwhitneyu(current, reference, alternative="greater").pvalue < alpha)


def _sample(size: int, most: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(size, most, replace=False)) if size > most else np.arange(size)


def _most_unlike_training(texts: list[str], index: np.ndarray, scores: np.ndarray) -> list[ScoredPrompt]:
    shown, seen = [], set()
    for position in np.argsort(-scores, kind="stable"):
        text = texts[index[position]]
        if text not in seen:
            seen.add(text)
            shown.append(ScoredPrompt(text=text, score=round(float(scores[position]), 4)))
        if len(shown) == TOP_PROMPTS:
            break
    return shown


def window_drift(starts: list[str], windows: np.ndarray, train: dict[str, np.ndarray],
                 production: dict[str, np.ndarray], scores: dict | None, psi_threshold: float, alpha: float,
                 auc_threshold: float) -> list[WindowDrift]:
    """Each window (`windows[i]` is prompt i's window number) against training and against the first window."""
    from scipy.stats import ks_2samp
    from sklearn.metrics import roc_auc_score

    score_windows = windows[scores["production_index"]] if scores else None
    first = None
    rows = []
    for number, start in enumerate(starts):
        mask = windows == number
        row = WindowDrift(start=start, prompts=int(mask.sum()))
        if row.prompts < MIN_PROMPTS:
            rows.append(row)
            continue
        first = number if first is None else first
        first_mask = windows == first
        level = 0  # 0 stable, 1 moderate, 2 significant; a PSI or AUC counts only where its test agrees
        for feature, values in production.items():
            row.psi[feature] = round(population_stability_index(train[feature], values[mask]), 4)
            row.psi_vs_first[feature] = round(population_stability_index(values[first_mask], values[mask]), 4)
            if row.psi[feature] >= PSI_BANDS[0][0] and ks_2samp(train[feature], values[mask]).pvalue < alpha:
                level = max(level, 2 if row.psi[feature] > psi_threshold else 1)
        if scores is not None:
            own, firsts = scores["production"][score_windows == number], scores["production"][score_windows == first]
            if len(own) >= MIN_PROMPTS // 2:
                row.domain_auc = _auc(roc_auc_score, scores["train"], own)
                row.domain_auc_vs_first = _auc(roc_auc_score, firsts, own) if number != first else 0.5
                if _auc_drifted(row.domain_auc, scores["train"], own, auc_threshold, alpha):
                    level = 2
        row.verdict = ("stable", "moderate", "significant")[level]
        rows.append(row)
    return rows


def _auc(roc_auc_score, reference: np.ndarray, current: np.ndarray) -> float:
    labels = np.r_[np.zeros(len(reference)), np.ones(len(current))]
    return round(float(roc_auc_score(labels, np.r_[reference, current])), 4)


def input_drift(train_texts: list[str], production_texts: list[str], windows: np.ndarray, starts: list[str],
                tokenize: Tokenize, token_unit: str, psi_threshold: float, auc_threshold: float, alpha: float,
                max_classifier_prompts: int) -> InputDrift:
    """Production prompts (`windows[i]`: prompt i's window) against the training prompts, overall and per window."""
    if not production_texts:
        return InputDrift(verdict="unknown", token_unit=token_unit,
                          summary="input drift: unknown (the log kept no prompt texts; serve.log_content is none)")
    if min(len(train_texts), len(production_texts)) < MIN_PROMPTS:
        return InputDrift(verdict="unknown", token_unit=token_unit, summary=(
            f"input drift: unknown (needs {MIN_PROMPTS} prompts on each side; training has {len(train_texts)}, "
            f"production {len(production_texts)})"))
    train, production = prompt_features(train_texts, tokenize), prompt_features(production_texts, tokenize)
    features = [feature_drift(name, train[name], production[name], psi_threshold, alpha) for name in FEATURES]
    classified = domain_classifier(train_texts, production_texts, auc_threshold, alpha, max_classifier_prompts)
    domain, scores = classified if classified else (None, None)
    notes = [domain.sampled] if domain and domain.sampled else []
    if classified is None:
        notes.append("no domain classifier: the prompts hold no words to compare")
    per_window = window_drift(starts, windows, train, production, scores, psi_threshold, alpha, auc_threshold)
    verdict = ("significant" if any(f.drifted for f in features) or (domain and domain.drifted)
               else "moderate" if any(f.band != "stable" and f.ks_pvalue < alpha for f in features) else "stable")
    return InputDrift(verdict=verdict, summary=_summary(verdict, features, domain), token_unit=token_unit,
                      features=features, domain=domain, windows=per_window, notes=notes,
                      drift_starts=next((w.start for w in per_window if w.verdict == "significant"), None))


def _summary(verdict: str, features: list[FeatureDrift], domain: DomainDrift | None) -> str:
    """`input drift: significant (PSI 0.41 prompt tokens; domain classifier AUC 0.83)`."""
    worst = max(features, key=lambda f: f.psi)
    figures = [f"PSI {worst.psi:.2f} {worst.feature.replace('_', ' ')}"]
    if domain is not None:
        figures.append(f"domain classifier AUC {domain.auc:.2f}")
    return f"input drift: {verdict} ({'; '.join(figures)})"
