"""Judge statistics against hand-computed values: parsing, Bradley-Terry, length-controlled win rate, kappa,
G-Eval weighting, and the self-report computed from raw judgments."""

import math

import numpy as np
import pytest
from scipy.optimize import minimize

from llmlab.errors import LLMLabError
from llmlab.eval.judge import load_prompt, load_rubric, parse_rating, parse_verdict
from llmlab.eval.judge.agreement import agreement, agreement_with_ties, cohen_kappa
from llmlab.eval.judge.judge import weighted_score
from llmlab.eval.judge.ratings import bradley_terry, elo, leaderboard
from llmlab.eval.judge.selfreport import format_self_report, self_report, self_preference_probe
from llmlab.eval.judge.winrate import fit_logistic, length_controlled, win_rate_report


def test_parse_markers():
    assert parse_rating("Good answer. Rating: [[7]]") == 7.0
    assert parse_rating("first [[2]] then Rating: [[ 9 ]]") == 9.0
    assert parse_rating("Rating: 7") is None  # no marker: a failure, not a guess
    assert parse_rating("Rating: [[11]]") is None  # out of range
    assert parse_verdict("... so [[B]]") == "B"
    assert parse_verdict("[[C]]") == "tie"
    assert parse_verdict("A is better") is None


def test_prompts_are_versioned_and_rubric_loads(tmp_path):
    for name in ("pointwise_general", "pointwise_coding", "pointwise_math", "pairwise", "geval_steps", "geval_score"):
        assert load_prompt(name).version == "1"
    bad = tmp_path / "bad.txt"
    bad.write_text("no version here\n")
    with pytest.raises(LLMLabError, match="version"):
        load_prompt("bad", tmp_path)
    (tmp_path / "r.yaml").write_text("name: helpfulness\ncriteria: Is it helpful?\nscores:\n  1: useless\n  10: perfect\n")
    r = load_rubric(tmp_path / "r.yaml")
    assert "Score 1: useless" in r.text() and "Score 10: perfect" in r.text()
    (tmp_path / "r2.yaml").write_text("name: x\n")
    with pytest.raises(LLMLabError, match="criteria"):
        load_rubric(tmp_path / "r2.yaml")


def test_bradley_terry_two_players():
    # A beats B 3 times out of 4: p_A / (p_A + p_B) = 3/4, so p_A / p_B = 3
    s = bradley_terry([("A", "B", 1.0)] * 3 + [("A", "B", 0.0)])
    assert s["A"] / s["B"] == pytest.approx(3.0, rel=1e-6)
    assert elo(s["A"]) - elo(s["B"]) == pytest.approx(400 * math.log10(3), rel=1e-6)


def test_bradley_terry_recovers_a_known_tournament():
    # strengths 4 : 2 : 1; games chosen so that observed wins equal expected wins exactly, so the MLE is the truth
    battles = []
    for a, b, n, wins in [("A", "B", 30, 20), ("A", "C", 25, 20), ("B", "C", 30, 20)]:
        battles += [(a, b, 1.0)] * wins + [(a, b, 0.0)] * (n - wins)
    s = bradley_terry(battles)
    assert s["A"] == pytest.approx(2.0, rel=1e-6)  # geometric mean normalized to 1: (4*2*1)^(1/3) = 2
    assert s["B"] == pytest.approx(1.0, rel=1e-6)
    assert s["C"] == pytest.approx(0.5, rel=1e-6)
    rows = leaderboard(battles, n_boot=50, prior=0.0)
    assert [r["model"] for r in rows] == ["A", "B", "C"]
    for r in rows:
        assert r["ci95"][0] <= r["rating"] <= r["ci95"][1]


def test_bradley_terry_ties_and_unbeaten():
    s = bradley_terry([("A", "B", 0.5)] * 4)
    assert s["A"] == pytest.approx(1.0)
    with pytest.raises(LLMLabError, match="prior"):
        bradley_terry([("A", "B", 1.0)] * 3)
    s = bradley_terry([("A", "B", 1.0)] * 3, prior=1.0)  # 3.5 wins vs 0.5: ratio 7
    assert s["A"] / s["B"] == pytest.approx(7.0, rel=1e-6)


def test_logistic_fit_matches_scipy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=300)
    y = (rng.random(300) < 1 / (1 + np.exp(-(0.3 + 1.2 * x)))).astype(float)
    y[:20] = 0.5  # ties as half wins
    b0, b1 = fit_logistic(x, y, l2=0.0)

    def nll(w):
        z = w[0] + w[1] * x
        return -np.sum(y * z - np.logaddexp(0, z))
    ref = minimize(nll, [0.0, 0.0], method="BFGS").x
    assert (b0, b1) == pytest.approx(tuple(ref), abs=1e-4)


def test_length_controlled_win_rate_removes_a_planted_length_effect():
    rng = np.random.default_rng(0)
    n = 4000
    len_base = rng.integers(200, 400, n).astype(float)
    len_model = len_base + rng.normal(120, 100, n)  # the model writes longer answers
    d = len_model - len_base
    # the judge likes length only: equal quality (intercept 0), +1.5 logits per std of length difference
    p = 1 / (1 + np.exp(-(0.0 + 1.5 * d / d.std())))
    y = (rng.random(n) < p).astype(float)
    lc = length_controlled(y, len_model, len_base)
    assert y.mean() > 0.75  # the raw win rate is inflated by length
    assert lc["lc_win_rate"] == pytest.approx(0.5, abs=0.04)
    assert lc["length_coef"] == pytest.approx(1.5, abs=0.2)
    records = [{"verdict": "A" if w else "B", "answer_a": "x" * int(a), "answer_b": "x" * int(b)}
               for w, a, b in zip(y[:400], len_model[:400], len_base[:400])] + [{"verdict": None}]
    rep = win_rate_report(records)
    assert rep["parse_failures"] == 1 and rep["judged"] == 400
    assert rep["win_rate"] == pytest.approx(y[:400].mean())


def test_cohen_kappa_hand_computed():
    # p_o = 3/4; p_e = .5*.25 + .5*.75 = .5; kappa = (.75 - .5) / .5 = .5
    assert cohen_kappa(["A", "A", "B", "B"], ["A", "B", "B", "B"]) == pytest.approx(0.5)
    from sklearn.metrics import cohen_kappa_score
    a = ["A", "B", "tie", "A", "B", "B", "tie", "A"]
    b = ["A", "B", "A", "A", "tie", "B", "tie", "B"]
    assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b))
    r = agreement_with_ties(a, b)
    assert r["with_ties"]["agreement"] == pytest.approx(5 / 8)
    # without ties: items 0, 1, 3, 5, 7 -> agree on 0, 1, 3, 5
    assert r["without_ties"]["n"] == 5 and r["without_ties"]["agreement"] == pytest.approx(4 / 5)
    assert agreement(["A", None], ["A", "B"])["dropped"] == 1


def test_geval_weighted_score():
    score, probs = weighted_score(["3"], [{"3": math.log(0.5), "4": math.log(0.25), "x": math.log(0.25)}], 1, 5)
    assert score == pytest.approx((3 * 0.5 + 4 * 0.25) / 0.75)
    assert probs == pytest.approx({"3": 2 / 3, "4": 1 / 3})
    assert weighted_score(["The", "answer"], [{"The": 0.0}, {"answer": 0.0}], 1, 5) == (None, {})
    # the first score token counts, even after other tokens
    score, _ = weighted_score(["Score", ":", " 2"], [{}, {}, {" 2": 0.0}], 1, 5)
    assert score == 2.0


def _pair(i, v1, v2, **kw):
    verdict = None if v1 is None or v2 is None else (v1 if v1 == v2 else "tie")
    return {"id": i, "mode": "pairwise", "verdicts": [v1, v2], "verdict": verdict,
            "consistent": None if verdict is None else v1 == v2, "parse_error": verdict is None, **kw}


def test_self_report_from_raw_judgments():
    # verdicts are already mapped to the original order; raw second-order verdicts are their swaps
    recs = [_pair(0, "A", "A"), _pair(1, "A", "B"), _pair(2, "B", "B"), _pair(3, None, "A")]
    rep = self_report(recs, repeat=[_pair(0, "A", "A"), _pair(1, "B", "B"), _pair(2, "B", "B"), _pair(3, "A", "A")])
    assert rep["parse_failures"] == 1 and rep["parse_failure_rate"] == 0.25
    assert rep["position_consistency"] == pytest.approx(2 / 3)
    assert rep["position_inconsistent"] == 1
    # shown-first wins: item 0: A(first) won, second order raw B; item 1: A, then raw A; item 2: B, raw A;
    # item 3: second order raw B -> first-position wins 1 + 2 + 1 + 0 = 4 of 7
    assert rep["first_position_win_rate"] == pytest.approx(4 / 7)
    # repeat: items 0..2 parsed in both; verdicts A/A, tie/B, B/B -> 2 of 3 agree
    assert rep["repeat"]["n"] == 3 and rep["repeat"]["agreement"] == pytest.approx(2 / 3)
    text = format_self_report(rep)
    assert "parse failures 1 (25.0%)" in text and "position consistency 66.7%" in text


def test_self_preference_probe():
    recs = [_pair(0, "A", "A", model_a="me", model_b="other", label="B"),
            _pair(1, "B", "B", model_a="other", model_b="me", label="B"),
            _pair(2, "A", "B", model_a="me", model_b="other", label="A")]
    s = self_preference_probe(recs, "me")
    assert s["judge_self_win_rate"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert s["human_self_win_rate"] == pytest.approx((0 + 1 + 1) / 3)
    assert s["self_preference"] == pytest.approx(0.5 / 3)


def test_leaderboard_plot(tmp_path):
    from llmlab.eval.judge.ratings import format_leaderboard
    from llmlab.eval.report import plot_ratings
    battles = [("A", "B", 1.0)] * 6 + [("A", "B", 0.0)] * 2 + [("B", "C", 1.0)] * 5 + [("B", "C", 0.5)] * 2
    rows = leaderboard(battles, n_boot=50)
    assert rows[0]["model"] == "A" and rows[-1]["model"] == "C"
    assert rows[0]["wins"] == 6 and rows[1]["ties"] == 2
    assert "| 1 | A |" in format_leaderboard(rows)
    plot_ratings(rows, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_self_report_counts_parsed_and_forced_verdicts():
    # per judge output: item 0 parsed twice; item 1 parsed + forced; item 2 forced + failed (no verdict)
    recs = [_pair(0, "A", "A", verdict_sources=["parsed", "parsed"], verdict_source="parsed"),
            _pair(1, "A", "B", verdict_sources=["parsed", "logprob"], verdict_source="logprob"),
            _pair(2, "B", None, verdict_sources=["logprob", None], verdict_source=None)]
    rep = self_report(recs)
    assert rep["verdict_sources"] == {"judgments": 6, "parsed": 3, "forced": 2, "failed": 1}
    assert rep["forced_items"] == 1 and rep["parse_failures"] == 1
    text = format_self_report(rep)
    assert "3 parsed from the marker, 2 forced from log-probabilities (marker missing), 1 failed" in text
    points = [{"id": 0, "mode": "pointwise", "score": 7.0, "verdict_source": "parsed", "parse_error": False},
              {"id": 1, "mode": "pointwise", "score": 5.0, "verdict_source": "logprob", "parse_error": False},
              {"id": 2, "mode": "pointwise", "score": None, "verdict_source": None, "parse_error": True}]
    rep = self_report(points)
    assert rep["verdict_sources"] == {"judgments": 3, "parsed": 1, "forced": 1, "failed": 1}
    assert "verdict_sources" not in self_report([{"id": 0, "mode": "geval", "score": 3.0, "parse_error": False}])
    w = win_rate_report([{**r, "answer_a": "aa", "answer_b": "b"} for r in recs])
    assert w["forced"] == 1 and w["judged"] == 2
