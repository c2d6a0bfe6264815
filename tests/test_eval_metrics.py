"""Scoring functions against values computed by hand."""

import math

import pytest

from llmlab.errors import LLMLabError
from llmlab.eval import metrics


def test_acc_and_acc_norm_differ_on_length():
    # raw: -6 > -8 picks the short choice; per character: -6/2 = -3 < -8/8 = -1 picks the long one
    assert metrics.mc_predictions([-6.0, -8.0], ["ab", "abcdefgh"]) == (0, 1)
    assert metrics.mc_predictions([-9.0, -8.0], ["ab", "abcdefgh"]) == (1, 1)


def test_exact_match_regex_and_fuzzy():
    assert metrics.exact_match("  Paris. ", "paris") == 1.0
    assert metrics.exact_match("Paris, France", "Paris") == 0.0
    assert metrics.regex_extract("first 12 then 34", r"(-?\d+)", "last") == "34"
    assert metrics.regex_extract("first 12 then 34", r"(-?\d+)") == "12"
    assert metrics.regex_extract("no digits", r"(\d+)") is None
    assert metrics.fuzzy_ratio("a b c", "a b d") == pytest.approx(2 * 2 / 6)
    assert metrics.fuzzy_contains("the code is amber-123 ok", "amber-123") == 1.0
    assert metrics.fuzzy_contains("x y z", "a b") == 0.0


def test_perplexity_and_bits_per_byte():
    assert metrics.perplexity(-2 * math.log(4), 2) == pytest.approx(4.0)
    assert metrics.bits_per_byte(-8 * math.log(2), 4) == pytest.approx(2.0)


def test_bootstrap_two_values_hand_computed():
    # resampled means of [0, 1] are 0, 0.5, 1 with probability 1/4, 1/2, 1/4: the 2.5% and 97.5% quantiles are 0 and 1
    assert metrics.bootstrap_ci([0, 1], n_resamples=2000) == (0.0, 1.0)
    assert metrics.bootstrap_ci([3, 3, 3]) == (3.0, 3.0)
    with pytest.raises(LLMLabError):
        metrics.bootstrap_ci([])


def test_bootstrap_width_matches_normal_approximation():
    values = [1] * 200 + [0] * 200  # p = 0.5, n = 400: 95% interval is about +-1.96 * 0.5 / 20 = +-0.049
    lo, hi = metrics.bootstrap_ci(values, n_resamples=4000)
    assert lo < 0.5 < hi
    assert hi - lo == pytest.approx(2 * 1.96 * 0.5 / 20, rel=0.15)
    s = metrics.summarize(values)
    assert s["mean"] == 0.5 and s["n"] == 400


def test_bootstrap_ratio():
    lo, hi = metrics.bootstrap_ratio_ci([-2, -2, -2], [1, 1, 1])
    assert lo == hi == -2.0
    # ratio of sums, not mean of ratios: documents weigh by their length
    lo, hi = metrics.bootstrap_ratio_ci([-10, -1], [10, 1], n_resamples=500)
    assert lo == hi == -1.0


def test_bleu_and_rouge():
    corpus, per = metrics.bleu(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert corpus == pytest.approx(100.0) and per[0] == pytest.approx(100.0)
    corpus, _ = metrics.bleu(["completely different words here"], ["the cat sat on the mat"])
    assert corpus < 10
    r = metrics.rouge(["the cat"], ["the cat sat"])[0]
    # rouge1: precision 2/2, recall 2/3 -> F = 2 * 1 * 2/3 / (1 + 2/3) = 0.8
    assert r["rouge1"] == pytest.approx(0.8)
    assert metrics.rouge(["a b c"], ["a b c"])[0]["rougeL"] == pytest.approx(1.0)
