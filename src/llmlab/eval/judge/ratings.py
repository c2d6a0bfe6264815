"""Bradley-Terry ratings of several models from pairwise verdicts (MM algorithm), with bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np

from llmlab.errors import LLMLabError


def battles_from_records(records: list[dict]) -> list[tuple[str, str, float]]:
    """(model_a, model_b, score of a: 1 win, 0.5 tie, 0 loss) from pairwise judgments; parse failures left out."""
    out = []
    for r in records:
        if r.get("verdict") is None:
            continue
        if "model_a" not in r or "model_b" not in r:
            raise LLMLabError(f"judgment {r.get('id')} has no model_a/model_b: ratings need to know who answered")
        out.append((r["model_a"], r["model_b"], {"A": 1.0, "B": 0.0, "tie": 0.5}[r["verdict"]]))
    return out


def bradley_terry(battles: list[tuple[str, str, float]], prior: float = 0.0, iters: int = 10000,
                  tol: float = 1e-10) -> dict[str, float]:
    """Strengths p_i (geometric mean 1) maximizing prod P(i beats j) = p_i / (p_i + p_j); a tie is half a win each.

    Hunter's MM update p_i <- W_i / sum_j n_ij / (p_i + p_j). `prior` adds that many tie games between every
    pair that met, which keeps an unbeaten or winless model finite.
    """
    if not battles:
        raise LLMLabError("no pairwise results to rate")
    names = sorted({a for a, _, _ in battles} | {b for _, b, _ in battles})
    index = {n: i for i, n in enumerate(names)}
    k = len(names)
    wins = np.zeros((k, k))  # wins[i, j]: (fractional) wins of i over j
    for a, b, s in battles:
        i, j = index[a], index[b]
        wins[i, j] += s
        wins[j, i] += 1 - s
    games = wins + wins.T
    if prior:
        met = games > 0
        wins += prior / 2 * met
        games = wins + wins.T
    total_wins = wins.sum(axis=1)
    if np.any(total_wins == 0) or np.any(total_wins == games.sum(axis=1)):
        raise LLMLabError("a model won or lost every game: its rating is infinite; use a prior > 0")
    p = np.ones(k)
    for _ in range(iters):
        denom = (games / (p[:, None] + p[None, :])).sum(axis=1)
        new = total_wins / denom
        new /= math.exp(np.log(new).mean())
        if np.max(np.abs(new - p)) < tol:
            p = new
            break
        p = new
    return dict(zip(names, p.tolist()))


def elo(strength: float, scale: float = 400.0, base: float = 1000.0) -> float:
    """A strength on the Elo scale: 400 points = 10x the odds."""
    return base + scale * math.log10(strength)


def leaderboard(battles, n_boot: int = 200, seed: int = 0, prior: float = 0.1) -> list[dict]:
    """Models by Elo-scaled Bradley-Terry rating, with a 95% bootstrap interval over the battles."""
    point = bradley_terry(battles, prior)
    rng = np.random.default_rng(seed)
    samples = {n: [] for n in point}
    for _ in range(n_boot):
        pick = rng.integers(0, len(battles), len(battles))
        try:
            s = bradley_terry([battles[i] for i in pick], prior)
        except LLMLabError:
            continue
        for n in point:
            if n in s:
                samples[n].append(elo(s[n]))
    counts: dict[str, list] = {n: [0, 0, 0] for n in point}  # wins, ties, losses
    for a, b, s in battles:
        for m, r in ((a, s), (b, 1 - s)):
            counts[m][0 if r == 1 else 1 if r == 0.5 else 2] += 1
    rows = []
    for n, p in point.items():
        lo, hi = (np.quantile(samples[n], [0.025, 0.975]).tolist() if samples[n] else [float("nan")] * 2)
        rows.append({"model": n, "rating": elo(p), "ci95": [lo, hi], "wins": counts[n][0], "ties": counts[n][1],
                     "losses": counts[n][2]})
    return sorted(rows, key=lambda r: -r["rating"])


def format_leaderboard(rows: list[dict]) -> str:
    lines = ["| rank | model | rating | 95% CI | W/T/L |", "|---:|---|---:|---|---|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r['model']} | {r['rating']:.0f} | [{r['ci95'][0]:.0f}, {r['ci95'][1]:.0f}] | "
                     f"{r['wins']}/{r['ties']}/{r['losses']} |")
    return "\n".join(lines)
