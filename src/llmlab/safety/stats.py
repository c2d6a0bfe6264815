"""Statistics for safety numbers: Wilson intervals, AUROC (Mann-Whitney) with intervals, expected calibration error."""

from __future__ import annotations

import math

import numpy as np

from llmlab.errors import LLMLabError

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion: unlike p ± z·SE it stays inside [0, 1] and is
    honest at 0 or n successes, which is where attack success rates often sit."""
    if n <= 0:
        raise LLMLabError("a Wilson interval needs at least one trial")
    if not 0 <= successes <= n:
        raise LLMLabError(f"successes must be between 0 and n={n}, got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def auroc(positive_scores, negative_scores) -> float:
    """P(score of a random positive > score of a random negative), ties counted half (the Mann-Whitney U
    statistic over n_pos·n_neg), computed from mid-ranks in O(n log n)."""
    pos, neg = np.asarray(positive_scores, float), np.asarray(negative_scores, float)
    if len(pos) == 0 or len(neg) == 0:
        raise LLMLabError("AUROC needs at least one positive and one negative score")
    both = np.concatenate([pos, neg])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(len(both))
    sorted_scores = both[order]
    i = 0
    while i < len(both):  # tied scores share the mean of their ranks (1-based)
        j = i
        while j + 1 < len(both) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def hanley_mcneil_interval(auc: float, n_pos: int, n_neg: int, z: float = Z95) -> tuple[float, float]:
    """Hanley & McNeil (1982) normal-approximation interval for an AUROC."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    half = z * math.sqrt(max(var, 0.0))
    return max(0.0, auc - half), min(1.0, auc + half)


def bootstrap_auroc_interval(positive_scores, negative_scores, n_boot: int = 1000, seed: int = 0,
                             level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval, resampling positives and negatives separately."""
    pos, neg = np.asarray(positive_scores, float), np.asarray(negative_scores, float)
    rng = np.random.default_rng(seed)
    stats = [auroc(rng.choice(pos, len(pos)), rng.choice(neg, len(neg))) for _ in range(n_boot)]
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def calibration_bins(confidences, correct, n_bins: int = 10) -> list[dict]:
    """Equal-width confidence bins over [0, 1]: count, mean confidence and accuracy of each non-empty bin.
    A confidence of exactly 1.0 goes to the last bin."""
    conf, ok = np.asarray(confidences, float), np.asarray(correct, float)
    if len(conf) == 0 or len(conf) != len(ok):
        raise LLMLabError("calibration needs as many correctness labels as confidences (and at least one)")
    if n_bins < 1:
        raise LLMLabError(f"n_bins must be at least 1, got {n_bins}")
    if conf.min() < 0 or conf.max() > 1:
        raise LLMLabError("confidences must lie in [0, 1]")
    index = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    bins = []
    for b in range(n_bins):
        members = index == b
        if members.any():
            bins.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": int(members.sum()),
                         "confidence": float(conf[members].mean()), "accuracy": float(ok[members].mean())})
    return bins


def expected_calibration_error(confidences, correct, n_bins: int = 10) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over equal-width bins (Guo et al. 2017)."""
    bins = calibration_bins(confidences, correct, n_bins)
    total = sum(b["count"] for b in bins)
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins))


def bootstrap_mean_interval(values, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean (for mean z, mean loss, mean confidence: small n, no normality)."""
    x = np.asarray(values, float)
    if len(x) == 0:
        raise LLMLabError("a mean's interval needs at least one value")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)
