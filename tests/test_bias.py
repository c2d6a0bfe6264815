"""Bias probes: the BBQ-style set's structure and scores by hand, bootstrap gaps, and tiny runs on SmolLM2."""

import numpy as np
import pytest

from llmlab.cli.main import main
from llmlab.client import LocalClient
from llmlab.safety.bias import bbq_items, bbq_probe, bbq_scores, counterfactual_probe, group_gaps


def test_bbq_items_follow_the_design():
    items = bbq_items()
    assert len(items) == 12 * 12 and len({it["id"] for it in items}) == len(items)
    for it in items:
        assert it["options"][2] == "Cannot be determined" and it["biased"] in (0, 1)
        if it["condition"] == "ambiguous":
            assert it["answer"] == 2
        else:
            assert it["answer"] in (0, 1)
    # a disambiguated negative question whose culprit is the stereotyped person: the right answer is the biased one
    it = next(i for i in items if i["id"] == "0-grandfather-disambiguated-grandfather-negative")
    assert it["options"][it["answer"]] == "The grandfather" and it["answer"] == it["biased"]
    assert "The grandfather kept asking for help" in it["context"]
    it = next(i for i in items if i["id"] == "0-grandson-disambiguated-grandson-nonnegative")
    assert it["options"][it["answer"]] == "The grandfather" and it["answer"] != it["biased"]
    assert {i["category"] for i in bbq_items(24)} == {i["category"] for i in items}  # a cut keeps every category
    assert "an obese man" in next(i["context"] for i in items if i["category"] == "appearance")


def test_bbq_scores_by_hand():
    items = bbq_items()
    follow = [it["biased"] if it["condition"] == "disambiguated" else 2 for it in items]
    s = bbq_scores(items, follow)
    assert s["accuracy_ambiguous"] == 1.0 and s["bias_ambiguous"] == 0.0  # always "unknown" when ambiguous
    assert s["bias_disambiguated"] == 1.0 and s["accuracy_disambiguated"] == 0.5  # right only when it is the stereotype
    against = [1 - it["biased"] for it in items]
    s = bbq_scores(items, against)
    assert s["bias_disambiguated"] == -1.0 and s["bias_ambiguous"] == -1.0  # ambiguous accuracy 0: (1 - 0) * -1


def test_group_gaps_on_a_known_shift():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 1))
    values = np.hstack([base, base + 0.5, base + 0.0])  # group b is 0.5 higher on every item
    r = group_gaps(values, ["a", "b", "c"], n_boot=300)
    assert r["gap"] == pytest.approx(0.5) and r["highest"] == "b"
    assert r["gap_ci"][0] == pytest.approx(0.5) and r["significant"] == ["a", "b", "c"]  # paired: no noise at all
    assert r["groups"]["b"]["deviation"] == pytest.approx(0.5 - 0.5 / 3)


def test_counterfactual_and_bbq_on_smollm2(smollm2):
    client = LocalClient(smollm2)
    rows = counterfactual_probe(client, ["gender"], ["sentiment", "decision"], n_templates=2, fillers=1, n_boot=200)
    assert [(r["axis"], r["measure"]) for r in rows] == [("gender", "sentiment"), ("gender", "decision")]
    for r in rows:
        assert set(r["groups"]) == {"woman", "man"} and r["n_items"] == 2
        assert r["gap"] >= 0 and r["gap_ci"][0] <= r["gap_ci"][1]
    assert all(0 < g["mean"] < 1 for g in rows[1]["groups"].values())  # P(Yes)
    result = bbq_probe(client, n=12, n_boot=200)
    o = result["overall"]
    assert o["n"] == 12 and 0 <= o["accuracy_ambiguous"] <= 1 and -1 <= o["bias_disambiguated"] <= 1
    assert len(result["items"]) == 12 and all(it["pred"] in (0, 1, 2) for it in result["items"])


@pytest.mark.parametrize("argv, message", [
    (["bias", "--axes", "gender,race"], "unknown bias axis 'race'"),
    (["bias", "--measures", "toxicity"], "unknown bias measure 'toxicity'"),
    (["bias", "--templates", "0"], "--templates must be at least 1"),
])
def test_cli_bad_bias_input_is_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
