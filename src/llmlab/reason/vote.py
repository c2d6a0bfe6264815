"""Aggregating the answers of several samples: majority vote and log-probability-weighted vote."""

from __future__ import annotations

import math
from collections import Counter


def majority_vote(answers: list[str | None]) -> tuple[str | None, float]:
    """The most common answer (None = no answer is never chosen while there is another) and the fraction of all
    samples that gave it. Ties go to the answer seen first, so the result does not depend on dict order."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None, 0.0
    first = {a: i for i, a in reversed(list(enumerate(answers)))}
    best = max(counts, key=lambda a: (counts[a], -first[a]))
    return best, counts[best] / len(answers)


def weighted_vote(answers: list[str | None], logprobs: list[float]) -> tuple[str | None, float]:
    """Each sample votes with its probability under the model, length-normalised: exp(mean token log-probability)
    (Wang et al. 2022's "normalized weighted sum"). Returns the answer with the largest total and its share."""
    if len(answers) != len(logprobs):
        raise ValueError("one log-probability per answer")
    totals: dict[str, float] = {}
    for a, lp in zip(answers, logprobs):
        if a is not None:
            totals[a] = totals.get(a, 0.0) + math.exp(lp)
    if not totals:
        return None, 0.0
    first = {a: i for i, a in reversed(list(enumerate(answers)))}
    best = max(totals, key=lambda a: (totals[a], -first[a]))
    return best, totals[best] / sum(math.exp(lp) for lp in logprobs)


def mean_logprob(logprobs: list[float] | None) -> float:
    """The mean log-probability of a sample's tokens (0 tokens: 0, a certain empty answer)."""
    return sum(logprobs) / len(logprobs) if logprobs else 0.0
