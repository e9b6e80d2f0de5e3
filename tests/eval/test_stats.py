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


# --- cluster bootstrap (groups=) ---------------------------------------------------------------------------


def test_one_item_per_group_equals_the_item_bootstrap():
    # Groups are numbered by first appearance, so singleton groups make exactly the item bootstrap's draws.
    x = np.random.default_rng(4).uniform(0, 1, size=37)
    labels = [f"p{i:02d}" for i in range(37)][::-1]  # label order must not matter, only appearance order
    assert bootstrap_ci(x, n_boot=500, seed=7, groups=labels) == bootstrap_ci(x, n_boot=500, seed=7)
    a, b = x, x + np.random.default_rng(5).normal(0.02, 0.05, size=37)
    assert paired_bootstrap(a, b, n_boot=500, seed=7, groups=labels) == paired_bootstrap(a, b, n_boot=500, seed=7)


def test_two_clusters_interval_by_hand():
    # Group A = [0, 0, 0] (3 items), group B = [1] (1 item). Resampling 2 groups out of {A, B}:
    # AA → 0 (p 1/4), AB/BA → 1/4 (p 1/2), BB → 1 (p 1/4). The item mean stays 1/4; the 2.5 % / 97.5 %
    # quantiles of many resampled means are 0 and 1. Resampling the 4 items instead cannot reach 1 at 97.5 %:
    # P(all four draws are the 1) = 1/256.
    vals, groups = [0.0, 0.0, 0.0, 1.0], ["A", "A", "A", "B"]
    mean, low, high = bootstrap_ci(vals, n_boot=4000, groups=groups)
    assert (mean, low, high) == (0.25, 0.0, 1.0)
    assert bootstrap_ci(vals, n_boot=4000)[2] < 1.0


def test_clustered_data_gives_a_wider_interval_than_items():
    # 10 videos x 20 frames: frames of a video share its level (strong intra-cluster correlation).
    rng = np.random.default_rng(0)
    level = rng.normal(0.7, 0.15, size=10)
    x = np.repeat(level, 20) + rng.normal(0, 0.01, size=200)
    groups = np.repeat([f"video{i}" for i in range(10)], 20)
    _, lo_i, hi_i = bootstrap_ci(x, n_boot=2000)
    mean, lo_c, hi_c = bootstrap_ci(x, n_boot=2000, groups=groups)
    assert mean == pytest.approx(x.mean())
    assert (hi_c - lo_c) > 3 * (hi_i - lo_i)
    # The cluster interval is about the one of the 10 video means (design effect ~ 20).
    half = 1.96 * level.std(ddof=1) / math.sqrt(10)
    assert (hi_c - lo_c) / 2 == pytest.approx(half, rel=0.3)
    res_i = paired_bootstrap(np.zeros(200), x - 0.7, n_boot=2000)
    res_c = paired_bootstrap(np.zeros(200), x - 0.7, n_boot=2000, groups=groups)
    assert (res_c["ci_high"] - res_c["ci_low"]) > 3 * (res_i["ci_high"] - res_i["ci_low"])
    assert res_c["n"] == 200


def test_unequal_groups_weight_items_not_groups():
    # One big group of 0.9s and two singletons at 0.1: the estimate is the item mean (not the mean of group
    # means), every resampled mean lies between the extremes, and the result is seeded.
    vals = [0.9] * 8 + [0.1, 0.1]
    groups = ["big"] * 8 + ["s1", "s2"]
    mean, low, high = bootstrap_ci(vals, n_boot=1000, seed=2, groups=groups)
    assert mean == pytest.approx(0.74)
    assert 0.1 <= low < mean < high <= 0.9
    assert bootstrap_ci(vals, n_boot=1000, seed=2, groups=groups) == (mean, low, high)
    # All in one group: every resample is the whole data set.
    assert bootstrap_ci(vals, n_boot=100, groups=["g"] * 10) == pytest.approx((0.74, 0.74, 0.74))


def test_groups_nan_and_length_errors():
    # The NaN item leaves with its label: group "b" then only holds 0.5.
    vals = [0.1, 0.3, float("nan"), 0.5]
    assert bootstrap_ci(vals, n_boot=200, groups=["a", "a", "b", "b"]) == bootstrap_ci(
        [0.1, 0.3, 0.5], n_boot=200, groups=["a", "a", "b"])
    res = paired_bootstrap([0.1, float("nan"), 0.3], [0.2, 0.9, 0.5], n_boot=10, groups=[1, 1, 2])
    assert res["n"] == 2 and res["mean_diff"] == pytest.approx(0.15)
    with pytest.raises(ValueError, match="one label per value"):
        bootstrap_ci([1.0, 2.0], groups=["a"])
    with pytest.raises(ValueError, match="one label per value"):
        paired_bootstrap([1.0, 2.0], [1.0, 2.0], groups=["a", "b", "c"])
