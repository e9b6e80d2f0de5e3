"""Isotonic calibration, ECE and the failure flags' precision/recall, on values whose answer is known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medsam2.eval.calibration import (
    CalibrationCfg,
    Calibrator,
    assess,
    choose_flag_threshold,
    choose_input,
    ece,
    fit_isotonic,
    flag_quality,
    input_values,
    reliability,
)


def test_isotonic_pools_violators_and_clips_outside_the_fit():
    """Pool-adjacent-violators on a known case: Dice 0.25, 0.75, 0.5, 1.0 at IoU 0.1-0.4 pools the middle
    pair to 0.625; outside the fitted range the confidence is clipped to the end knots."""
    cal = fit_isotonic(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.25, 0.75, 0.5, 1.0]), centred=False)
    np.testing.assert_allclose(cal(np.array([0.1, 0.2, 0.3, 0.4])), [0.25, 0.625, 0.625, 1.0])
    np.testing.assert_allclose(cal(np.array([0.0, 0.5])), [0.25, 1.0])
    # centred: the pooled step (0.2-0.3 at 0.625) is one knot at 0.25, so its two images are no longer tied
    cir = fit_isotonic(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.25, 0.75, 0.5, 1.0]))
    assert cir.x == (0.1, 0.25, 0.4) and cir.y == (0.25, 0.625, 1.0)
    np.testing.assert_allclose(cir(np.array([0.2, 0.25, 0.3])), [0.5, 0.625, 0.75])
    rng = np.random.default_rng(0)
    x = rng.random(200).round(2)  # ties included
    grid = np.linspace(0, 1, 101)
    assert np.all(np.diff(fit_isotonic(x, np.clip(x ** 2 + rng.normal(0, 0.15, 200), 0, 1))(grid)) >= 0)


def test_calibration_fixes_an_overconfident_score_and_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    iou = rng.uniform(0.6, 1.0, 500)  # says 0.6-1.0 …
    dice = np.clip((iou - 0.6) * 2.0 + rng.normal(0, 0.05, 500), 0, 1)  # … means 0-0.8
    cal = fit_isotonic(iou[:250], dice[:250], review_below=0.5)
    res = assess(cal, iou[250:], dice[250:])
    assert res["ece_raw"] > 0.25 and res["ece"] < 0.05
    assert res["spearman"] > 0.9 and res["flags"]["precision"] > 0.8 and res["flags"]["recall"] > 0.8
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"calibrator": cal.to_dict()}))
    again = Calibrator.load(path)
    np.testing.assert_array_equal(again(iou), cal(iou))
    assert again.needs_review(0.6) and not again.needs_review(0.99)
    with pytest.raises(ValueError, match="isotonic"):
        Calibrator.from_dict({"method": "platt"})


def test_ece_reliability_and_flags_by_hand():
    conf = np.array([0.05, 0.15, 0.15, 0.95])
    dice = np.array([0.05, 0.35, 0.35, 0.55])
    bins = reliability(conf, dice, 10)
    assert [(b["low"], b["n"]) for b in bins] == [(0.0, 1), (0.1, 2), (0.9, 1)]
    assert ece(conf, dice, 10) == pytest.approx((0 + 2 * 0.2 + 0.4) / 4)
    q = flag_quality(np.array([True, True, False, False]), np.array([True, False, True, False]))
    assert (q["precision"], q["recall"], q["n_flagged"], q["n_failures"]) == (0.5, 0.5, 2, 2)
    none = flag_quality(np.zeros(3, bool), np.zeros(3, bool))
    assert np.isnan(none["precision"]) and np.isnan(none["recall"])


def _rare_failures(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Kvasir's pattern: most masks are good (Dice 0.9); below predicted IoU 0.8 three in ten fail (Dice 0.3), so
    the expected Dice there is 0.72: above review_below 0.7, and a threshold at 0.7 flags nothing."""
    rng = np.random.default_rng(seed)
    iou = rng.uniform(0.7, 1.0, n)
    failed = rng.random(n) < np.where(iou < 0.8, 0.3, 0.03)
    return iou, np.where(failed, 0.3, 0.9) + rng.normal(0, 0.01, n)


def test_flag_threshold_chosen_on_val_catches_failures_an_expected_dice_threshold_misses():
    val_iou, val_dice = _rare_failures(300, 0)
    test_iou, test_dice = _rare_failures(2000, 1)
    at_review = assess(fit_isotonic(val_iou, val_dice, 0.7), test_iou, test_dice)
    assert at_review["flags"]["recall"] in (0.0, None) or at_review["flags"]["recall"] < 0.2
    flag = choose_flag_threshold(val_iou, val_dice, 0.7, folds=5, seed=0)
    cal = fit_isotonic(val_iou, val_dice, 0.7, flag)
    chosen = assess(cal, test_iou, test_dice)
    assert 0.7 < flag < 0.9 and chosen["flag_below"] == flag
    assert chosen["flags"]["recall"] > 0.6 and chosen["flags"]["precision"] > 0.2  # base rate of failure: ~0.12
    assert cal.needs_review(0.75) and not cal.needs_review(0.95)
    again = Calibrator.from_dict(cal.to_dict())
    assert again.flag_threshold == flag
    old = {k: v for k, v in cal.to_dict().items() if k != "flag_below"}  # a calibration.json from before
    assert Calibrator.from_dict(old).flag_threshold == 0.7


def test_flag_threshold_without_failures_or_images_is_review_below():
    assert choose_flag_threshold(np.linspace(0.8, 1, 50), np.full(50, 0.9), 0.7) == 0.7
    assert choose_flag_threshold(np.array([0.5, 0.9, 0.7]), np.array([0.2, 0.9, 0.8]), 0.7) == 0.7  # 3 < 2 folds


def test_stability_is_an_input_chosen_on_val_only_where_recorded():
    """``stability`` competes on val like the others: chosen where it ranks Dice best, skipped where the
    predictions have none (results written before it existed), and a calibrator on it refuses to run without
    it (a clear error naming what is missing)."""
    rng = np.random.default_rng(5)
    dice = rng.uniform(0.2, 1.0, 80)
    iou = np.clip(0.9 + rng.normal(0, 0.05, 80), 0, 1)
    stab = np.clip(dice + rng.normal(0, 0.03, 80), 0, 1)
    name, rho = choose_input(iou, None, dice, stab)
    assert name == "stability" and set(rho) == {"iou_pred", "stability"} and rho["stability"] > 0.9
    assert choose_input(iou, None, dice)[0] == "iou_pred"
    np.testing.assert_allclose(input_values("stability", iou, None, stab), stab)
    cal = fit_isotonic(stab, dice, input="stability")
    assert not cal.needs_flip and Calibrator.from_dict(cal.to_dict()).input == "stability"
    assert assess(cal, iou, dice, stability=stab)["spearman"] > 0.9
    with pytest.raises(ValueError, match="needs stability"):
        cal.confidence(iou)


def test_centred_fit_keeps_the_ranking_that_flat_steps_tie():
    """Fitted on 30 val-sized noisy pairs, plain isotonic steps tie many test images (Spearman drops below the
    input's); the centred fit keeps the input's ranking inside the knots (seeded: the answer is fixed)."""
    rng = np.random.default_rng(0)

    def pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.uniform(0.6, 1.0, n)
        return x, np.clip(x + rng.normal(0, 0.1, n), 0, 1)

    (x, y), (xt, yt) = pairs(30), pairs(400)
    plain, centred = assess(fit_isotonic(x, y, centred=False), xt, yt), assess(fit_isotonic(x, y), xt, yt)
    assert plain["spearman"] < plain["spearman_raw"] - 0.02
    assert abs(centred["spearman"] - centred["spearman_raw"]) < 0.005 and centred["ece"] < 0.05


def test_the_input_that_ranks_dice_best_on_val_is_chosen_and_stored(tmp_path):
    rng = np.random.default_rng(4)
    dice = rng.uniform(0.2, 1.0, 80)
    iou = np.clip(0.9 + rng.normal(0, 0.05, 80), 0, 1)  # SAM's head: high, whatever the Dice
    flip = np.clip(dice + rng.normal(0, 0.05, 80), 0, 1)  # the two views agree where the mask is right
    name, rho = choose_input(iou, flip, dice)
    assert name in ("flip_agreement", "iou_flip") and rho["flip_agreement"] > 0.9 > abs(rho["iou_pred"])
    assert choose_input(iou, None, dice) == ("iou_pred", {"iou_pred": rho["iou_pred"]})  # no mirrored pass
    np.testing.assert_allclose(input_values("iou_flip", iou, flip), (iou + flip) / 2)
    cal = fit_isotonic(input_values("flip_agreement", iou, flip), dice, input="flip_agreement")
    assert cal.needs_flip and Calibrator.from_dict(cal.to_dict()).input == "flip_agreement"
    res = assess(cal, iou, dice, flip_agreement=flip)
    assert res["input"] == "flip_agreement" and res["spearman"] > 0.9
    with pytest.raises(ValueError, match="flip_agreement"):
        cal.confidence(iou)
    with pytest.raises(ValueError, match="unknown confidence input"):
        Calibrator.from_dict({**cal.to_dict(), "input": "vibes"})
    with pytest.raises(ValueError, match="unknown confidence input"):
        CalibrationCfg(input="vibes")
    assert CalibrationCfg().may_need_flip and not CalibrationCfg(input="iou_pred").may_need_flip
    assert not fit_isotonic(iou, dice).needs_flip  # written before inputs existed: iou_pred
