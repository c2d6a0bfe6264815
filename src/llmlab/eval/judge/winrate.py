"""Win rate against a baseline, and the length-controlled win rate: a logistic model of the judge's preference
with a length-difference term, read off at zero length difference (AlpacaEval 2's idea, with 2 parameters)."""

from __future__ import annotations

import math

import numpy as np

from llmlab.eval.metrics import bootstrap_ci


def outcomes(records: list[dict], model_is: str = "A") -> list[float]:
    """1 win, 0.5 tie, 0 loss for the model (answer_a when model_is="A"); parse failures are left out."""
    table = {"A": 1.0, "B": 0.0, "tie": 0.5} if model_is == "A" else {"A": 0.0, "B": 1.0, "tie": 0.5}
    return [table[r["verdict"]] for r in records if r.get("verdict") is not None]


def fit_logistic(x, y, l2: float = 1e-6, iters: int = 100) -> tuple[float, float]:
    """(b0, b1) maximizing sum y log s(b0 + b1 x) + (1 - y) log(1 - s(...)) by Newton's method; y may be 0.5."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    X = np.stack([np.ones_like(x), x], axis=1)
    w = np.zeros(2)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-X @ w))
        grad = X.T @ (y - p) - l2 * w
        hess = -(X.T * (p * (1 - p))) @ X - l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w = w - step
        if np.max(np.abs(step)) < 1e-10:
            break
    return float(w[0]), float(w[1])


def length_controlled(y, len_model, len_baseline) -> dict:
    """Win rate at zero length difference: sigmoid(b0) of P(win) = sigmoid(b0 + b1 * (dlen / std(dlen)))."""
    d = np.asarray(len_model, float) - np.asarray(len_baseline, float)
    scale = d.std() or 1.0
    b0, b1 = fit_logistic(d / scale, y)
    return {"lc_win_rate": 1 / (1 + math.exp(-b0)), "intercept": b0, "length_coef": b1, "length_scale": scale}


def win_rate_report(records: list[dict], length=len, n_boot: int = 1000, seed: int = 0) -> dict:
    """Raw and length-controlled win rate of answer_a (the model) over answer_b (the baseline), from judgments."""
    kept = [r for r in records if r.get("verdict") is not None]
    if not kept:  # reported as such: a win rate over nothing is not 0 or 0.5
        return {"n": len(records), "judged": 0, "parse_failures": len(records), "forced": 0, "win_rate": None,
                "win_rate_ci95": None, "lc_win_rate": None, "lc_win_rate_ci95": None, "wins": 0, "ties": 0,
                "losses": 0}
    y = outcomes(kept)
    lo, hi = bootstrap_ci(y, n_resamples=n_boot, seed=seed)
    la = [length(r["answer_a"]) for r in kept]
    lb = [length(r["answer_b"]) for r in kept]
    lc = length_controlled(y, la, lb)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(200):
        i = rng.integers(0, len(y), len(y))
        try:
            boots.append(length_controlled([y[k] for k in i], [la[k] for k in i], [lb[k] for k in i])["lc_win_rate"])
        except np.linalg.LinAlgError:
            continue
    return {"n": len(records), "judged": len(kept), "parse_failures": len(records) - len(kept),
            "forced": sum(r.get("verdict_source") == "logprob" for r in kept), "win_rate": float(np.mean(y)), "win_rate_ci95": [lo, hi],
            "wins": y.count(1.0), "ties": y.count(0.5), "losses": y.count(0.0),
            "mean_length_model": float(np.mean(la)), "mean_length_baseline": float(np.mean(lb)),
            **lc, "lc_win_rate_ci95": np.quantile(boots, [0.025, 0.975]).tolist() if boots else None}
