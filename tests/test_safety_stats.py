"""The safety statistics against hand-computed values (and AUROC against scikit-learn)."""

import math

import numpy as np
import pytest

from llmlab.errors import LLMLabError
from llmlab.safety.stats import (auroc, bootstrap_auroc_interval, bootstrap_mean_interval, calibration_bins,
                                 expected_calibration_error, hanley_mcneil_interval, wilson_interval)


def test_wilson_interval_hand_values():
    # 8 of 10, z = 1.96: centre (0.8 + 0.192)/1.384 = 0.71676, half 1.96*sqrt(0.016 + 0.009604)/1.384 = 0.22663
    lo, hi = wilson_interval(8, 10, z=1.96)
    assert lo == pytest.approx(0.49016, abs=1e-4) and hi == pytest.approx(0.94335, abs=1e-4)
    # 0 of 10: the interval starts at 0 and is not empty (a normal interval would be [0, 0])
    lo, hi = wilson_interval(0, 10, z=1.96)
    assert lo == 0.0 and hi == pytest.approx(3.8416 / 13.8416, abs=1e-9)  # z²/(n+z²)
    with pytest.raises(LLMLabError):
        wilson_interval(3, 0)
    with pytest.raises(LLMLabError):
        wilson_interval(11, 10)


def test_auroc_hand_values_ties_half():
    # pairs (pos, neg): (3,1)(3,2)(3,2) win, (2,1) win, (2,2)(2,2) tie, (1,1) tie, (1,2)(1,2) lose:
    # (4 + 0.5*3) / 9 = 5.5/9
    assert auroc([3, 2, 1], [1, 2, 2]) == pytest.approx(5.5 / 9)
    assert auroc([1, 2], [3, 4]) == 0.0 and auroc([3, 4], [1, 2]) == 1.0
    assert auroc([5, 5], [5]) == 0.5
    with pytest.raises(LLMLabError):
        auroc([], [1.0])


def test_auroc_matches_sklearn():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    pos = np.round(rng.normal(0.5, 1, 57), 1)  # rounded: many ties
    neg = np.round(rng.normal(0, 1, 43), 1)
    expected = roc_auc_score([1] * len(pos) + [0] * len(neg), np.concatenate([pos, neg]))
    assert auroc(pos, neg) == pytest.approx(expected, abs=1e-12)


def test_auroc_intervals():
    # Hanley-McNeil at A = 0.8, 10 and 10: Q1 = 0.8/1.2, Q2 = 1.28/1.8; var = (0.16 + 9(Q1-0.64) + 9(Q2-0.64))/100
    q1, q2 = 0.8 / 1.2, 1.28 / 1.8
    se = math.sqrt((0.16 + 9 * (q1 - 0.64) + 9 * (q2 - 0.64)) / 100)
    lo, hi = hanley_mcneil_interval(0.8, 10, 10, z=1.96)
    assert lo == pytest.approx(0.8 - 1.96 * se) and hi == pytest.approx(min(1.0, 0.8 + 1.96 * se))
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(1, 1, 40), rng.normal(0, 1, 40)
    lo, hi = bootstrap_auroc_interval(pos, neg, n_boot=300)
    assert lo < auroc(pos, neg) < hi


def test_ece_hand_values():
    conf = [0.95, 0.95, 0.65, 0.65, 0.65, 0.65, 0.15]
    correct = [1, 0, 1, 1, 1, 0, 0]
    # bins: [0.9,1): conf .95 acc .5, 2 items; [0.6,0.7): conf .65 acc .75, 4 items; [0.1,0.2): conf .15 acc 0, 1
    expected = (2 * 0.45 + 4 * 0.10 + 1 * 0.15) / 7
    assert expected_calibration_error(conf, correct) == pytest.approx(expected)
    bins = calibration_bins(conf, correct)
    assert [b["count"] for b in bins] == [1, 4, 2]
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == 0.0  # confidence 1.0 lands in the last bin
    with pytest.raises(LLMLabError):
        expected_calibration_error([0.5, 1.5], [1, 0])
    with pytest.raises(LLMLabError):
        expected_calibration_error([0.5], [1, 0])


def test_bootstrap_mean_interval_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small, large = rng.normal(3.0, 1.0, 10), rng.normal(3.0, 1.0, 400)
    lo, hi = bootstrap_mean_interval(small)
    assert lo < small.mean() < hi
    big_lo, big_hi = bootstrap_mean_interval(large)
    assert big_hi - big_lo < (hi - lo) / 3  # the width falls as 1/sqrt(n): 40x the data, ~6x narrower
    assert bootstrap_mean_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)  # no spread, no width
    with pytest.raises(LLMLabError):
        bootstrap_mean_interval([])
