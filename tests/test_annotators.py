"""Annotator agreement and label aggregation, against hand-computed values, scikit-learn and planted annotators."""

from fractions import Fraction

import numpy as np
import pytest

from llmlab.errors import LLMLabError
from llmlab.eval.annotators import (category_counts, cohen_kappa, dawid_skene, fleiss_kappa, flag_annotators,
                                    krippendorff_alpha, majority_vote, pairwise_cohen, report)

# Fleiss (1971) as on Wikipedia's "Fleiss' kappa" page: 10 items, 14 raters, 5 categories.
FLEISS = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
          [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]


def test_fleiss_kappa_worked_example():
    # by hand: column totals 20, 28, 39, 21, 32 of 140 -> P_e = (20^2+28^2+39^2+21^2+32^2)/140^2 = 4170/19600;
    # per item sum(n_ij^2) - 14 = 182, 46, 56, 80, 60, 84, 44, 32, 52, 52 (total 688) over 14*13 = 182 each
    # -> P_bar = 688/1820; kappa = (P_bar - P_e) / (1 - P_e) = 0.20993...
    p_bar, p_e = Fraction(688, 1820), Fraction(4170, 19600)
    expected = float((p_bar - p_e) / (1 - p_e))
    assert expected == pytest.approx(0.2099, abs=1e-4)
    assert fleiss_kappa(FLEISS) == pytest.approx(expected, rel=1e-12)


def test_fleiss_from_triples_and_unequal_counts_refused():
    with pytest.raises(LLMLabError, match="same number"):  # one label per item: nothing to agree on
        fleiss_kappa(category_counts([(i, "r", 0) for i in range(5)])[0])
    expanded = [(i, r, c) for i, row in enumerate(FLEISS) for r, c in enumerate(c for c, n in enumerate(row)
                                                                                  for _ in range(n))]
    counts, categories = category_counts(expanded)
    assert categories == [0, 1, 2, 3, 4] and counts.tolist() == FLEISS
    with pytest.raises(LLMLabError, match="Krippendorff"):
        fleiss_kappa([[2, 0], [1, 0]])


# Krippendorff (2011), "Computing Krippendorff's alpha-reliability", section C: 4 coders, 12 units, missing values.
KRIPPENDORFF = {"A": [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
                "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
                "C": [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
                "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None]}


def test_krippendorff_alpha_standard_example():
    triples = [(u, coder, v) for coder, values in KRIPPENDORFF.items() for u, v in enumerate(values)]
    # by hand, the paper's coincidence matrix (unit 12 has one value and drops out; a unit with m values adds 1/(m-1)
    # per ordered pair): n_c = 9, 13, 10, 5, 3 for values 1..5, n = 40; off the diagonal 2*(4/3 + 1/3 + 1/3 + 4/3 +
    # 1/3 + 1/3) = 8; sum_{c!=k} n_c n_k = 40^2 - (81 + 169 + 100 + 25 + 9) = 1216
    # -> alpha = 1 - (n - 1) * 8 / 1216 = 113/152 = 0.7434 (the paper: 0.743)
    assert krippendorff_alpha(triples) == pytest.approx(113 / 152, rel=1e-12)


def test_krippendorff_alpha_is_one_on_agreement_and_about_zero_on_noise():
    rng = np.random.default_rng(0)
    same = [(i, a, i % 3) for i in range(30) for a in "xyz"]
    assert krippendorff_alpha(same) == 1.0
    noise = [(i, a, int(rng.integers(3))) for i in range(2000) for a in "xyz"]
    assert abs(krippendorff_alpha(noise)) < 0.03  # chance agreement: alpha's expectation is 0


def test_cohen_kappa_matches_scikit_learn():
    from sklearn.metrics import cohen_kappa_score
    rng = np.random.default_rng(1)
    a = rng.integers(0, 3, 200).tolist()
    b = [x if rng.random() < 0.6 else int(rng.integers(0, 3)) for x in a]
    assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)
    triples = [(i, "a", x) for i, x in enumerate(a)] + [(i, "b", y) for i, y in enumerate(b)]
    assert pairwise_cohen(triples)[("a", "b")]["kappa"] == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)


def simulate(accuracies: dict, n_items=300, k=3, seed=0):
    """Items with a true label; annotator a says it with probability accuracies[a], else a uniformly wrong label."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, k, n_items)
    triples = []
    for a, acc in accuracies.items():
        for i, t in enumerate(truth):
            said = t if rng.random() < acc else (t + rng.integers(1, k)) % k
            triples.append((i, a, int(said)))
    return truth, triples


def test_dawid_skene_finds_the_planted_bad_annotator_and_beats_majority():
    accuracies = {"good1": 0.9, "good2": 0.85, "spam1": 1 / 3, "spam2": 1 / 3, "spam3": 1 / 3}
    truth, triples = simulate(accuracies, seed=3)
    ds = dawid_skene(triples)
    majority = majority_vote(triples)
    acc_ds = np.mean([ds["labels"][i] == t for i, t in enumerate(truth)])
    acc_mv = np.mean([majority[i] == t for i, t in enumerate(truth)])
    assert acc_ds > acc_mv + 0.05  # three spammers outvote two good annotators often; EM learns to ignore them
    assert acc_ds > 0.85
    for a, acc in accuracies.items():  # reliability estimates the real accuracy (300 items: sd ~0.03)
        assert ds["reliability"][a] == pytest.approx(acc, abs=0.1), a


def test_flagging_a_planted_bad_annotator_with_a_p_value():
    accuracies = {f"ok{j}": 0.8 for j in range(5)} | {"bad": 0.4}
    _, triples = simulate(accuracies, n_items=200, seed=7)
    flags = flag_annotators(triples)
    assert flags[0]["annotator"] == "bad" and flags[0]["flagged"] and flags[0]["p_value"] < 1e-6
    assert not any(r["flagged"] for r in flags[1:])
    ds = dawid_skene(triples)
    assert min(ds["reliability"], key=ds["reliability"].get) == "bad"


def test_majority_vote_ties_and_report():
    triples = [("q1", "a", "A"), ("q1", "b", "A"), ("q1", "c", "B"), ("q2", "a", "B"), ("q2", "b", "A")]
    assert majority_vote(triples) == {"q1": "A", "q2": "A"}  # q2 ties; A is more frequent overall
    r = report(triples)
    assert r["items"] == 2 and r["labels"] == 5 and r["fleiss_kappa"] is None
    with pytest.raises(LLMLabError, match="two different labels"):
        majority_vote(triples + [("q1", "a", "B")])


def test_dawid_skene_one_em_step_by_hand():
    """Two items, two annotators: q1 both say 0; q2 a says 0, b says 1. Start: q1 is 0, q2 half and half."""
    triples = [("q1", "a", 0), ("q1", "b", 0), ("q2", "a", 0), ("q2", "b", 1)]
    ds = dawid_skene(triples, iters=1, smoothing=0.01)
    prior = [0.75, 0.25]  # mean of the starting posteriors [1, 0] and [0.5, 0.5]
    # confusion[truth][said] = smoothing + sum of the posterior of truth over the items where the annotator said it
    conf_a = [[1.51 / 1.52, 0.01 / 1.52], [0.51 / 0.52, 0.01 / 0.52]]
    conf_b = [[1.01 / 1.52, 0.51 / 1.52], [0.01 / 0.52, 0.51 / 0.52]]
    assert np.allclose(ds["confusion"]["a"], conf_a) and np.allclose(ds["confusion"]["b"], conf_b)
    # q2's posterior: prior times the chance each annotator said what they said, normalised
    p0, p1 = prior[0] * conf_a[0][0] * conf_b[0][1], prior[1] * conf_a[1][0] * conf_b[1][1]
    assert ds["posteriors"]["q2"][0] == pytest.approx(p0 / (p0 + p1), rel=1e-9)
    assert ds["labels"]["q2"] == (0 if p0 > p1 else 1)
