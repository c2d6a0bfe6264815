"""The arena leaderboard on simulated votes: Bradley-Terry with bootstrap recovers known strengths, the length control
removes a planted length bias, and judge verdicts are rated and compared with the people."""

import math

import numpy as np
import pytest

from llmlab.errors import LLMLabError
from llmlab.eval.arena import arena_report, battles_from_votes, style_leaderboard


def simulate(strength: dict, n=3000, seed=0, length_bias=0.0, lengths=None, tie_rate=0.0):
    """Votes from P(a beats b) = sigmoid(beta_a - beta_b + length_bias * normalized length difference); a tie_rate
    share of random ties (tie or both bad) pulls ratings toward each other, so coverage is checked without them."""
    rng = np.random.default_rng(seed)
    names = list(strength)
    lengths = lengths or {m: 100 for m in names}
    votes = []
    for k in range(n):
        a, b = rng.choice(names, 2, replace=False)
        la, lb = rng.poisson(lengths[a]), rng.poisson(lengths[b])
        z = strength[a] - strength[b] + length_bias * (la - lb) / max(la + lb, 1)
        if rng.random() < tie_rate:
            vote = rng.choice(["tie", "both_bad"])
        else:
            vote = "a" if rng.random() < 1 / (1 + math.exp(-z)) else "b"
        votes.append({"battle_id": f"b{k}", "model_a": a, "model_b": b, "vote": vote,
                      "answer_a": "x" * la, "answer_b": "x" * lb})
    return votes


def elo(beta):  # the leaderboard's scale: 1000 at the geometric mean of the strengths
    return 1000 + 400 * beta / math.log(10)


TRUE = {"big": 1.0, "mid": 0.3, "small": -0.2, "tiny": -1.1}  # log-strengths, mean 0


def test_bradley_terry_bootstrap_covers_the_true_strengths():
    report = arena_report(simulate(TRUE, seed=1), n_boot=200, seed=0)
    rows = {r["model"]: r for r in report["human"]}
    assert [r["model"] for r in report["human"]] == ["big", "mid", "small", "tiny"]
    for m, beta in TRUE.items():
        lo, hi = rows[m]["ci95"]
        assert lo <= elo(beta) <= hi, (m, elo(beta), lo, hi)
        assert hi - lo < 80  # 3000 votes pin each rating to tens of points
    # without a length effect, the length-controlled ratings agree and the coefficient's interval covers 0
    style = report["style_controlled"]
    lo, hi = style["length_coef_ci95"]
    assert lo < 0 < hi
    for r in style["rows"]:
        assert r["ci95"][0] <= elo(TRUE[r["model"]]) <= r["ci95"][1]


def test_length_control_removes_a_planted_length_bias():
    equal = {"verbose": 0.0, "terse": 0.0}
    votes = simulate(equal, n=2000, seed=2, length_bias=3.0, lengths={"verbose": 300, "terse": 100}, tie_rate=0)
    raw = {r["model"]: r for r in arena_report(votes, n_boot=50)["human"]}
    assert raw["verbose"]["ci95"][0] > 1050  # raw ratings credit the model for its length
    style = style_leaderboard(votes, n_boot=100)
    rows = {r["model"]: r for r in style["rows"]}
    assert rows["verbose"]["ci95"][0] < 1000 < rows["verbose"]["ci95"][1]  # equal once length is accounted for
    assert style["length_coef_ci95"][0] < 3.0 < style["length_coef_ci95"][1]


def test_judge_ratings_and_agreement_with_people():
    votes = simulate(TRUE, n=400, seed=3, tie_rate=0)
    rng = np.random.default_rng(4)
    flip = {"a": "B", "b": "A"}
    same = {"a": "A", "b": "B"}
    # a judge that agrees with the person 80% of the time (no model names: they come from the votes)
    judgments = [{"id": v["battle_id"], "verdict": (same if rng.random() < 0.8 else flip)[v["vote"]]}
                 for v in votes]
    report = arena_report(votes, judgments, n_boot=50)
    ag = report["judge_agreement"]["with_ties"]
    assert ag["n"] == 400 and ag["agreement"] == pytest.approx(0.8, abs=0.05)
    assert 0.5 < ag["kappa"] < 0.7  # two balanced labels at 80% agreement: kappa = (0.8 - 0.5) / 0.5 = 0.6
    assert report["judge"][0]["model"] == "big"


def test_bad_votes_are_refused():
    with pytest.raises(LLMLabError, match="not one of"):
        battles_from_votes([{"battle_id": "x", "model_a": "a", "model_b": "b", "vote": "A"}])
    with pytest.raises(LLMLabError, match="no arena votes"):
        arena_report([])


def test_cli_leaderboard_agreement_battles_and_export(tmp_path, capsys):
    import json

    from llmlab.cli.main import main
    from llmlab.serve.feedback import FeedbackStore

    db = tmp_path / "arena.sqlite"
    store = FeedbackStore(db)
    votes = simulate(TRUE, n=300, seed=5)
    for k, v in enumerate(votes):  # three voters; "v2" votes at random
        store.add_battle(v["battle_id"], [{"role": "user", "content": f"q{k % 20}"}], v["model_a"], v["model_b"],
                         v["answer_a"], v["answer_b"])
        voter = f"v{k % 3}"
        vote = v["vote"] if voter != "v2" else ["a", "b"][k % 2]
        store.vote(v["battle_id"], vote, voter)
    store.close()
    assert main(["arena", "leaderboard", "--db", str(db), "--boot", "20", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["votes"] == 300 and report["human"][0]["model"] == "big"
    assert main(["arena", "agreement", "--db", str(db)]) == 0
    quality = json.loads(capsys.readouterr().out)
    assert set(quality["reliability"]) == {"v0", "v1", "v2"}
    items = tmp_path / "items.jsonl"
    assert main(["arena", "battles", "--db", str(db), "--out", str(items)]) == 0
    first = json.loads(items.read_text().splitlines()[0])
    assert set(first) == {"id", "question", "answer_a", "answer_b", "model_a", "model_b"}
    # a judge that always agrees with the person: kappa 1 (ties left as ties)
    verdict = {"a": "A", "b": "B", "tie": "tie", "both_bad": "tie"}
    from llmlab.serve.feedback import read_votes
    judged = tmp_path / "judgments.jsonl"
    judged.write_text("".join(json.dumps({"id": v["battle_id"], "verdict": verdict[v["vote"]]}) + "\n"
                              for v in read_votes(db)))
    assert main(["arena", "leaderboard", "--db", str(db), "--boot", "20", "--judgments", str(judged)]) == 0
    out = capsys.readouterr().out
    assert "judge vs people on 300 battles: agreement 1.00, Cohen's kappa 1.00" in out
    pairs = tmp_path / "pairs.jsonl"
    assert main(["arena", "export", "--db", str(db), "--pairs", str(pairs)]) == 0
    differ = sum(v["answer_a"] != v["answer_b"] for v in votes)  # no ties here; two equal answers teach nothing
    assert 250 < differ < 300 and len(pairs.read_text().splitlines()) == differ
    assert main(["arena", "serve", "--model", "smollm2", "--port", "0"]) == 2
    assert "at least two models" in capsys.readouterr().err
