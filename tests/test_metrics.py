"""Golden values for medsam2.metrics on hand-made masks (every number below is worked out by hand)."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from medsam2.metrics import batch_dice, hd95, segmentation_metrics, summarize


def square(shape, r0, c0, side=4):
    m = np.zeros(shape, dtype=bool)
    m[r0 : r0 + side, c0 : c0 + side] = True
    return m


# Two 4x4 squares, B shifted right by 2 columns: overlap 4x2 = 8 px, union 24 px.
A = square((10, 10), 2, 2)
B = square((10, 10), 2, 4)


def test_overlapping_squares_golden():
    m = segmentation_metrics(B, A)
    assert m["dice"] == pytest.approx(2 * 8 / 32)
    assert m["iou"] == pytest.approx(8 / 24)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(0.5)
    # Boundary = the 12-pixel ring of each square. From A's ring to B's ring the distances are four 0s
    # (columns 4, 5 of the top/bottom rows), four 1s and four 2s (columns 3 and 2); same the other way.
    # 95th percentile of eight 0s, eight 1s, eight 2s = 2.
    assert m["hd95"] == pytest.approx(2.0)


def test_hd95_uses_spacing():
    # Column spacing 0.5: every nearest-boundary distance above is horizontal, so all halve → 1.0.
    assert hd95(B, A, spacing=(1.0, 0.5)) == pytest.approx(1.0)
    # Row spacing does not matter here (no nearest distance is vertical).
    assert hd95(B, A, spacing=(3.0, 1.0)) == pytest.approx(2.0)


def test_hd95_ignores_a_single_outlier_pixel():
    target = square((8, 20), 2, 2)
    pred = target.copy()
    pred[2, 17] = True  # isolated pixel 12 columns right of the ring's column 5
    m = segmentation_metrics(pred, target)
    # 25 surface distances: 24 zeros and one 12 → the 95th percentile (index 22.8) is 0, the max would be 12.
    assert m["hd95"] == pytest.approx(0.0)
    assert m["dice"] == pytest.approx(32 / 33)
    assert m["iou"] == pytest.approx(16 / 17)
    assert m["precision"] == pytest.approx(16 / 17)
    assert m["recall"] == pytest.approx(1.0)


def test_single_pixels_at_3_4_5_distance():
    pred, target = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    pred[1, 1], target[4, 5] = True, True
    m = segmentation_metrics(pred, target)
    assert m == pytest.approx({"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0, "hd95": 5.0})


def test_identical_masks_are_perfect():
    m = segmentation_metrics(A, A.astype(np.uint8))
    assert m == pytest.approx({"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "hd95": 0.0})


@pytest.mark.parametrize(
    "pred_empty,target_empty,expected",
    [
        (True, True, {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "hd95": 0.0}),
        (True, False, {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0, "hd95": 5.0}),
        (False, True, {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0, "hd95": 5.0}),
    ],
)
def test_empty_mask_rule(pred_empty, target_empty, expected):
    full = np.zeros((3, 4), bool)
    full[1, 1:3] = True
    pred = np.zeros((3, 4), bool) if pred_empty else full
    target = np.zeros((3, 4), bool) if target_empty else full
    m = segmentation_metrics(pred, target)
    assert m == pytest.approx(expected)  # 3x4 image: diagonal = 5
    assert all(math.isfinite(v) for v in m.values())


def test_empty_hd95_diagonal_in_spacing_units():
    empty, one = np.zeros((3, 4), bool), np.zeros((3, 4), bool)
    one[0, 0] = True
    assert hd95(empty, one, spacing=(2.0, 1.5)) == pytest.approx(math.hypot(6.0, 6.0))


def test_metric_input_validation():
    with pytest.raises(ValueError, match="shapes differ"):
        segmentation_metrics(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="2-D"):
        segmentation_metrics(np.zeros((1, 3, 3)), np.zeros((1, 3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        segmentation_metrics(np.full((2, 2), np.nan), np.zeros((2, 2)))


def test_batch_dice_golden_and_empty_rule():
    target = torch.zeros(4, 1, 10, 10)
    probs = torch.zeros(4, 1, 10, 10)
    target[0, 0], probs[0, 0] = torch.from_numpy(A), torch.from_numpy(B).float() * 0.9  # Dice 0.5
    # sample 1: both empty → 1;  sample 2: pred empty, target not → 0;  sample 3: target empty → 0
    target[2, 0] = torch.from_numpy(A)
    probs[3, 0] = torch.from_numpy(B).float()
    expected = torch.tensor([0.5, 1.0, 0.0, 0.0])
    assert torch.allclose(batch_dice(probs, target, from_logits=False), expected)
    logits = torch.where(probs > 0.5, 5.0, -5.0)
    assert torch.allclose(batch_dice(logits, target.bool()), expected)
    # A higher threshold turns sample 0's 0.9 probabilities off → pred empty, target not → 0.
    assert batch_dice(probs, target, from_logits=False, threshold=0.95)[0] == 0.0


def test_batch_dice_matches_per_image_metric():
    rng = np.random.default_rng(0)
    pred = rng.random((3, 1, 16, 16)) > 0.5
    target = rng.random((3, 1, 16, 16)) > 0.6
    got = batch_dice(torch.from_numpy(pred).float(), torch.from_numpy(target).float(), from_logits=False)
    want = [segmentation_metrics(p[0], t[0])["dice"] for p, t in zip(pred, target, strict=True)]
    assert got.tolist() == pytest.approx(want, abs=1e-6)


def test_summarize_means_cis_and_nan():
    rows = [{"dice": 0.5, "iou": 0.25}, {"dice": 1.0, "iou": float("nan")}, {"dice": 0.0, "iou": 0.75}]
    s = summarize(rows, metrics=("dice", "iou"), n_boot=200)
    assert s["dice"]["mean"] == pytest.approx(0.5) and s["dice"]["n"] == 3
    assert s["iou"]["mean"] == pytest.approx(0.5) and s["iou"]["n"] == 2
    assert 0.0 <= s["dice"]["ci_low"] <= 0.5 <= s["dice"]["ci_high"] <= 1.0
    assert summarize(pd.DataFrame(rows), metrics=("dice",), n_boot=200) == {"dice": s["dice"]}


def test_summarize_single_row_and_all_nan():
    s = summarize([{"dice": 0.7, "hd95": float("nan")}], metrics=("dice", "hd95"))
    assert s["dice"] == {"mean": 0.7, "ci_low": 0.7, "ci_high": 0.7, "n": 1}
    assert s["hd95"]["n"] == 0 and math.isnan(s["hd95"]["mean"])


def test_summarize_errors():
    with pytest.raises(ValueError, match="at least one row"):
        summarize([])
    with pytest.raises(KeyError, match="hd95"):
        summarize([{"dice": 1.0}])


def test_summarize_bootstraps_patients_when_rows_carry_patient_id():
    # Four frames of video A at 0 and one of video B at 1: patients are resampled, so the interval reaches 1.
    rows = [{"dice": 0.0, "patient_id": "A"}] * 4 + [{"dice": 1.0, "patient_id": "B"}]
    s = summarize(rows, metrics=("dice",), n_boot=2000)["dice"]
    assert s["mean"] == pytest.approx(0.2) and s["n"] == 5
    assert s["ci_high"] == 1.0
    assert summarize([{"dice": r["dice"]} for r in rows], metrics=("dice",), n_boot=2000)["dice"]["ci_high"] < 1.0
    # One image per patient (Kvasir) or empty patient ids: the same interval as without the column.
    kv = [{"dice": d, "patient_id": f"kv{i}"} for i, d in enumerate([0.2, 0.9, 0.5, 0.7])]
    bare = [{"dice": r["dice"]} for r in kv]
    assert summarize(kv, metrics=("dice",)) == summarize(bare, metrics=("dice",))
    empty = [{"dice": r["dice"], "patient_id": ""} for r in kv]
    assert summarize(empty, metrics=("dice",)) == summarize(bare, metrics=("dice",))
