"""Scores for one item (exact match, regex extraction, BLEU, ROUGE, fuzzy overlap) and for a run (bootstrap CIs)."""

from __future__ import annotations

import difflib
import math
import re
import string

import numpy as np

from llmlab.errors import LLMLabError


# ---- multiple choice ------------------------------------------------------------------------------------------


def mc_predictions(logliks: list[float], choices: list[str]) -> tuple[int, int]:
    """(argmax of the summed log-likelihoods, argmax of log-likelihood per character of the choice).

    acc_norm divides by the choice's length in characters, as lm-evaluation-harness does, so a long right
    answer is not beaten by a short wrong one only because every extra token costs probability.
    """
    raw = int(np.argmax(logliks))
    norm = int(np.argmax([ll / max(len(c), 1) for ll, c in zip(logliks, choices)]))
    return raw, norm


# ---- generation -----------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Case-, whitespace- and edge-punctuation-insensitive form of an answer."""
    text = " ".join(text.strip().casefold().split())
    return text.strip(string.punctuation + " ")


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def regex_extract(text: str, pattern: str, which: str = "first") -> str | None:
    """The first group (or the whole match) of the first or last match of `pattern` in `text`, or None."""
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    m = matches[0] if which == "first" else matches[-1]
    return m.group(1) if m.groups() else m.group(0)


def fuzzy_ratio(a: str, b: str) -> float:
    """Similarity of two texts in [0, 1] over their words (difflib's ratio: 2 * matches / total words)."""
    wa, wb = a.split(), b.split()
    if not wa and not wb:
        return 1.0
    return difflib.SequenceMatcher(None, wa, wb, autojunk=False).ratio()


def fuzzy_contains(haystack: str, needle: str) -> float:
    """How much of `needle` appears in `haystack`, in [0, 1]: the best word-level ratio over windows of its length."""
    h, n = normalize_answer(haystack).split(), normalize_answer(needle).split()
    if not n:
        return 1.0
    if not h:
        return 0.0
    best = 0.0
    for start in range(max(1, len(h) - len(n) + 1)):
        window = h[start:start + len(n)]
        best = max(best, difflib.SequenceMatcher(None, window, n, autojunk=False).ratio())
        if best == 1.0:
            break
    return best


def bleu(predictions: list[str], references: list[str]) -> tuple[float, list[float]]:
    """Corpus BLEU (sacrebleu, 0-100) and sentence BLEU per item (for bootstrapping)."""
    import sacrebleu
    corpus = sacrebleu.corpus_bleu(predictions, [references]).score
    per_item = [sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(predictions, references)]
    return corpus, per_item


def rouge(predictions: list[str], references: list[str], kinds=("rouge1", "rouge2", "rougeL")) -> list[dict]:
    """ROUGE F-measures (rouge-score, stemmed) per item, 0-1."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    return [{k: v.fmeasure for k, v in scorer.score(r, p).items()} for p, r in zip(predictions, references)]


# ---- perplexity -----------------------------------------------------------------------------------------------


def perplexity(total_logprob: float, n_tokens: int) -> float:
    return math.exp(-total_logprob / n_tokens)


def bits_per_byte(total_logprob: float, n_bytes: int) -> float:
    """Tokenizer-independent: nats over the whole text, in bits, per UTF-8 byte."""
    return -total_logprob / (math.log(2) * n_bytes)


# ---- confidence intervals --------------------------------------------------------------------------------------


def bootstrap_ci(values, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
                 statistic=np.mean) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over items resampled with replacement."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise LLMLabError("cannot bootstrap an empty set of scores")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(n_resamples, values.size))
    if statistic is np.mean:
        stats = values[idx].mean(axis=1)
    else:
        stats = np.array([statistic(values[i]) for i in idx])
    alpha = (1 - confidence) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def summarize(values, seed: int = 0) -> dict:
    """mean, 95% bootstrap interval and count of per-item scores."""
    values = [float(v) for v in values]
    lo, hi = bootstrap_ci(values, seed=seed)
    return {"mean": float(np.mean(values)), "ci95": [lo, hi], "n": len(values)}


def bootstrap_ratio_ci(numerators, denominators, n_resamples: int = 1000, confidence: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(numerators) / sum(denominators) over resampled items
    (e.g. log-probability per token over documents of different lengths)."""
    num, den = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, num.size, size=(n_resamples, num.size))
    stats = num[idx].sum(axis=1) / den[idx].sum(axis=1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))
