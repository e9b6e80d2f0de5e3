"""Bootstrap CIs: hand-computable cases, determinism, NaN handling and errors."""

import math

import numpy as np
import pytest

from medsam2.eval.stats import bootstrap_ci, paired_bootstrap


def test_constant_values_have_a_zero_width_interval():
    assert bootstrap_ci([0.8] * 5, n_boot=100) == pytest.approx((0.8, 0.8, 0.8))
    assert bootstrap_ci([0.3]) == pytest.approx((0.3, 0.3, 0.3))


def test_two_values_interval_by_hand():
    # Resamples of {0, 1} have means 0, .5, 1 with probabilities 1/4, 1/2, 1/4: the 2.5 % and 97.5 %
    # quantiles of many resampled means are 0 and 1.
    mean, low, high = bootstrap_ci([0.0, 1.0], n_boot=4000)
    assert (mean, low, high) == (0.5, 0.0, 1.0)


def test_width_matches_normal_theory():
    x = np.random.default_rng(1).normal(0.7, 0.1, size=400)
    mean, low, high = bootstrap_ci(x, n_boot=2000)
    half_width = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert low < mean < high
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.15)


def test_seeded_and_nan_dropped():
    x = [0.1, 0.5, float("nan"), 0.9, 0.4]
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    assert bootstrap_ci(x)[0] == pytest.approx(0.475)


def test_bootstrap_errors_and_no_resampling():
    with pytest.raises(ValueError, match="non-NaN"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="non-NaN"):
        bootstrap_ci([float("nan")])
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci([1.0], alpha=1.5)
    mean, low, high = bootstrap_ci([1.0, 2.0], n_boot=0)
    assert mean == 1.5 and math.isnan(low) and math.isnan(high)


def test_paired_constant_improvement():
    a = np.array([0.2, 0.5, 0.9, 0.4])
    res = paired_bootstrap(a, a + 0.1, n_boot=500)
    assert res["mean_diff"] == pytest.approx(0.1)
    assert res["ci_low"] == pytest.approx(0.1) and res["ci_high"] == pytest.approx(0.1)
    assert res["p_improve"] == 1.0 and res["n"] == 4
    assert paired_bootstrap(a, a - 0.1, n_boot=500)["p_improve"] == 0.0


def test_paired_pairs_cancel_item_variance():
    # Items vary a lot but b beats a by 0.01 on every item: unpaired CIs would overlap, paired is certain.
    a = np.random.default_rng(0).uniform(0, 0.9, size=50)
    res = paired_bootstrap(a, a + np.linspace(0.005, 0.015, 50), n_boot=1000)
    assert res["ci_low"] > 0 and res["p_improve"] == 1.0


def test_paired_nan_and_length_errors():
    res = paired_bootstrap([0.1, float("nan"), 0.3], [0.2, 0.9, float("nan")], n_boot=10)
    assert res["n"] == 1 and res["mean_diff"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-NaN"):
        paired_bootstrap([float("nan")], [1.0])
    assert math.isnan(paired_bootstrap([0.0], [1.0], n_boot=0)["p_improve"])
