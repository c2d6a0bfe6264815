"""The arena's leaderboard: Bradley-Terry ratings of side-by-side votes with bootstrap intervals, the same ratings
with answer length controlled for (as Chatbot Arena's style control), ratings from LLM-judge verdicts, and how often
the judge agrees with the people."""

from __future__ import annotations

import json
import math

import numpy as np

from llmlab.errors import LLMLabError
from llmlab.eval.judge.agreement import agreement_with_ties
from llmlab.eval.judge.ratings import battles_from_records, leaderboard

VOTES = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}  # both bad counts as a tie, as Chatbot Arena
VERDICT = {"a": "A", "b": "B", "tie": "tie", "both_bad": "tie"}  # a vote as a judge verdict, for agreement


def battles_from_votes(votes: list[dict]) -> list[tuple[str, str, float]]:
    """(model_a, model_b, score of a) from arena votes ({"model_a", "model_b", "vote"}, as the votes table holds)."""
    out = []
    for v in votes:
        if v.get("vote") not in VOTES:
            raise LLMLabError(f"vote {v.get('vote')!r} of battle {v.get('battle_id')} is not one of {sorted(VOTES)}")
        out.append((v["model_a"], v["model_b"], VOTES[v["vote"]]))
    return out


def length_feature(answer_a: str, answer_b: str) -> float:
    """The normalized length difference (len_a - len_b) / (len_a + len_b), in [-1, 1]; 0 for two empty answers."""
    total = len(answer_a) + len(answer_b)
    return (len(answer_a) - len(answer_b)) / total if total else 0.0


def fit_style(battles, lengths, ridge: float = 1e-4, iters: int = 50) -> tuple[dict, float]:
    """Logistic regression P(a wins) = sigmoid(beta_a - beta_b + gamma * length difference) by Newton's method;
    a tie counts as half a win and half a loss. Returns ({model: beta, mean 0}, gamma). The small ridge picks the
    mean-zero solution (betas are only defined up to a constant) and keeps an unbeaten model finite."""
    names = sorted({a for a, _, _ in battles} | {b for _, b, _ in battles})
    index = {n: i for i, n in enumerate(names)}
    x = np.zeros((len(battles), len(names) + 1))
    for row, (a, b, _) in enumerate(battles):
        x[row, index[a]], x[row, index[b]] = 1.0, -1.0
    x[:, -1] = lengths
    y = np.array([s for _, _, s in battles])
    w = np.zeros(x.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-x @ w))
        grad = x.T @ (p - y) + ridge * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + ridge * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    beta = w[:-1] - w[:-1].mean()
    return dict(zip(names, beta.tolist())), float(w[-1])


def to_elo(beta: float) -> float:
    """A log-strength on ratings.py's Elo scale (1000 at the geometric mean, 400 points = 10x the odds)."""
    return 1000 + 400 * beta / math.log(10)


def style_leaderboard(votes: list[dict], n_boot: int = 200, seed: int = 0) -> dict:
    """Ratings with the answer-length difference as a covariate, with 95% bootstrap intervals over the battles, and
    the length coefficient (> 0: longer answers win more than the models' strength explains)."""
    battles = battles_from_votes(votes)
    lengths = np.array([length_feature(v.get("answer_a") or "", v.get("answer_b") or "") for v in votes])
    beta, gamma = fit_style(battles, lengths)
    rng = np.random.default_rng(seed)
    samples: dict[str, list] = {n: [] for n in beta}
    gammas = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(battles), len(battles))
        b, g = fit_style([battles[i] for i in pick], lengths[pick])
        gammas.append(g)
        for n, v in b.items():
            samples[n].append(to_elo(v))
    rows = [{"model": n, "rating": to_elo(v), "ci95": np.quantile(samples[n], [0.025, 0.975]).tolist()}
            for n, v in beta.items()]
    return {"rows": sorted(rows, key=lambda r: -r["rating"]), "length_coef": gamma,
            "length_coef_ci95": np.quantile(gammas, [0.025, 0.975]).tolist()}


def judge_agreement(votes: list[dict], judgments: list[dict], **kw) -> dict:
    """Cohen's kappa between people and an LLM judge on the same battles, matched by battle id (a judgment's "id").
    The judge must have seen the answers in the same A/B order as the person."""
    by_id = {j["id"]: j for j in judgments if "id" in j}
    human, judge = [], []
    for v in votes:
        j = by_id.get(v["battle_id"])
        if j is None:
            continue
        if (j.get("model_a"), j.get("model_b")) not in ((v["model_a"], v["model_b"]), (None, None)):
            raise LLMLabError(f"battle {v['battle_id']}: the judgment has the answers in another order")
        human.append(VERDICT[v["vote"]])
        judge.append(j.get("verdict"))
    if not human:
        raise LLMLabError("no judgment matches a voted battle (a judgment's id must be the battle id)")
    return agreement_with_ties(judge, human, **kw)


def arena_report(votes: list[dict], judgments: list[dict] | None = None, n_boot: int = 200, seed: int = 0) -> dict:
    """The human leaderboard, its length-controlled version and, given judge verdicts on the same battles, the
    judge's leaderboard and its agreement with the people."""
    if not votes:
        raise LLMLabError("no arena votes yet")
    out = {"votes": len(votes), "human": leaderboard(battles_from_votes(votes), n_boot=n_boot, seed=seed),
           "style_controlled": style_leaderboard(votes, n_boot=n_boot, seed=seed)}
    if judgments:
        models = {v["battle_id"]: v for v in votes}
        named = [{**j, "model_a": models[j["id"]]["model_a"], "model_b": models[j["id"]]["model_b"]}
                 if "model_a" not in j and j.get("id") in models else j for j in judgments]
        out["judge"] = leaderboard(battles_from_records(named), n_boot=n_boot, seed=seed)
        out["judge_agreement"] = judge_agreement(votes, named)
    return out


def vote_labels(votes: list[dict]) -> list[tuple]:
    """Arena votes as (item, annotator, label) triples for eval.annotators: an item is one prompt put to one pair of
    models (either order), the label names the winner ("tie" or "both_bad" otherwise), the annotator is the voter.
    A voter who met the same item twice counts with their latest vote (votes come oldest first)."""
    latest = {}
    for v in votes:
        prompt = json.dumps(v["messages"], sort_keys=True, ensure_ascii=False)
        item = (prompt, *sorted((v["model_a"], v["model_b"])))
        label = v["model_" + v["vote"]] if v["vote"] in ("a", "b") else v["vote"]
        latest[(item, v.get("voter") or "anonymous")] = label
    return [(item, voter, label) for (item, voter), label in latest.items()]
