"""Agreement between two sets of labels (judge vs humans, or a judge vs itself): raw agreement and Cohen's kappa,
with and without ties, with bootstrap intervals."""

from __future__ import annotations

import numpy as np

from llmlab.errors import LLMLabError


def cohen_kappa(a: list, b: list) -> float:
    """(p_o - p_e) / (1 - p_e), p_e from each rater's own label frequencies; 1.0 when both always agree on one label."""
    if len(a) != len(b) or not a:
        raise LLMLabError("kappa needs two equally long, non-empty label lists")
    labels = sorted(set(a) | set(b), key=str)
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b)) / n
    p_e = sum((a.count(l) / n) * (b.count(l) / n) for l in labels)
    if p_e == 1.0:
        return 1.0
    return (p_o - p_e) / (1 - p_e)


def agreement(a: list, b: list, n_boot: int = 1000, seed: int = 0) -> dict:
    """Agreement rate and kappa with a 95% bootstrap interval each; None labels (parse failures) are dropped."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not pairs:
        return {"n": 0, "agreement": None, "kappa": None}
    xa, xb = [p[0] for p in pairs], [p[1] for p in pairs]
    agree = np.array([x == y for x, y in pairs], float)
    rng = np.random.default_rng(seed)
    ags, kappas = [], []
    for _ in range(n_boot):
        i = rng.integers(0, len(pairs), len(pairs))
        ags.append(agree[i].mean())
        kappas.append(cohen_kappa([xa[k] for k in i], [xb[k] for k in i]))
    return {"n": len(pairs), "dropped": len(a) - len(pairs), "agreement": float(agree.mean()),
            "agreement_ci95": np.quantile(ags, [0.025, 0.975]).tolist(), "kappa": cohen_kappa(xa, xb),
            "kappa_ci95": np.quantile(kappas, [0.025, 0.975]).tolist()}


def agreement_with_ties(judge: list, human: list, **kw) -> dict:
    """Over all items (3 labels: A, B, tie), and over the items where neither said tie (2 labels)."""
    without = [(j, h) for j, h in zip(judge, human) if j not in ("tie", None) and h not in ("tie", None)]
    return {"with_ties": agreement(judge, human, **kw),
            "without_ties": agreement([j for j, _ in without], [h for _, h in without], **kw)}
