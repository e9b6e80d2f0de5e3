"""``predict(agreement=True)``: each mask's Dice with its mirror image's mask (a failure-flag input and the
``tta_flip`` acquisition score), on logits whose answer is known and through a tiny model; and SAM's stability
score, the failure-flag input every prediction carries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsam2.config import ModelCfg
from medsam2.engine import runtime
from medsam2.engine.checkpoint import build_model
from medsam2.engine.predict import _agreement, predict, stability_score


def test_agreement_of_known_masks():
    a = torch.full((3, 1, 8, 8), -1.0)
    a[0, 0, 2:6, 2:6] = 1.0  # same mask in both views: 1
    a[1, 0, :, :4] = 1.0  # left half against right half: 0
    b = a.clone()
    b[1] = -1.0
    b[1, 0, :, 4:] = 1.0  # both empty (sample 2): 1, by the metrics' empty rule
    assert _agreement(a, None, b, None) == [1.0, 0.0, 1.0]
    # a prior is added at its own size: a strong positive prior makes both views all foreground
    prior = torch.full((3, 1, 16, 16), 10.0)
    assert _agreement(a, prior, b, prior) == [1.0, 1.0, 1.0]


def test_stability_score_of_known_logits():
    """IoU of the masks at logit > +1 and > -1: 4 of 10 pixels above +1, 8 above -1 → 0.5; a mask with a sharp
    edge (all |logit| > 1) → 1; nothing above -1 → 1 (both empty); a custom offset moves both thresholds."""
    lg = torch.tensor([3.0, 2.0, 1.5, 1.2, 0.5, 0.0, -0.5, -0.9, -1.5, -4.0])
    assert stability_score(lg) == 0.5
    assert stability_score(torch.tensor([[5.0, -5.0], [2.0, -3.0]])) == 1.0
    assert stability_score(torch.full((4, 4), -2.0)) == 1.0
    assert stability_score(lg, offset=0.25) == pytest.approx(5 / 6)  # > 0.25: 5; > -0.25: those and 0.0


def test_predict_records_stability_of_the_logits_it_thresholds():
    """Every prediction carries the stability score of its logits at the image's size, in [0, 1], and the same
    for the same input (it is not a random draw)."""
    torch.manual_seed(0)
    model, _ = build_model(ModelCfg(image_size=64, prompt="box"))
    model.eval()
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(3)]
    boxes = [np.array([5, 5, 40, 40], np.float32)] * 3
    preds = predict(model, images, boxes=boxes, precision="fp32")
    again = predict(model, images, boxes=boxes, precision="fp32")
    for p, q in zip(preds, again, strict=True):
        assert p.stability is not None and 0.0 <= p.stability <= 1.0 and p.stability == q.stability
        logit = np.log(p.prob.astype(np.float64) / (1 - p.prob.astype(np.float64)))
        inner, outer = (logit > 1).sum(), (logit > -1).sum()
        assert p.stability == pytest.approx(inner / outer if outer else 1.0, abs=0.02)


@pytest.mark.parametrize("tta", [False, True])
def test_predict_reports_agreement_without_changing_the_masks(tta):
    torch.manual_seed(0)
    model, _ = build_model(ModelCfg(image_size=64, prompt="box", box_prior="ellipse", box_crop=0.2, tta_flip=tta))
    model.eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), rng.integers(0, 255, (80, 60, 3), dtype=np.uint8)]
    boxes = [np.array([5, 5, 40, 40], np.float32), np.array([10, 20, 50, 70], np.float32)]
    plain = predict(model, images, boxes=boxes, precision="fp32")
    both = predict(model, images, boxes=boxes, precision="fp32", agreement=True)
    for p, q in zip(plain, both, strict=True):
        np.testing.assert_array_equal(p.mask, q.mask)
        assert q.flip_agreement is not None and 0.0 <= q.flip_agreement <= 1.0
        assert (p.flip_agreement is not None) == tta  # test-time flipping computes it anyway


def test_bf16_predicted_iou_is_not_rounded_to_bf16_steps():
    """Under bf16 autocast SAM's IoU head runs in fp32 (a forward hook; SAM2 unforked): without it every
    predicted IoU in [0.5, 1) is a multiple of 1/256 and a random-init model gave 4 distinct values on 12
    images. Here: the values follow fp32's within 0.01 and are not all on that grid."""
    torch.manual_seed(0)
    model, _ = build_model(ModelCfg(image_size=64, prompt="box"))
    model.eval()
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(6)]
    boxes = [np.array([4 + i, 6, 40 + 3 * i, 50], np.float32) for i in range(6)]
    fp32 = np.array([p.iou_pred for p in predict(model, images, boxes=boxes, precision="fp32")])
    bf16 = np.array([p.iou_pred for p in predict(model, images, boxes=boxes, precision="bf16")])
    np.testing.assert_allclose(bf16, fp32, atol=0.01)
    assert (fp32 >= 0.25).all()  # bf16 steps are 1/512 or coarser from 0.25 up

    def on_grid(v: np.ndarray) -> bool:
        return bool(np.allclose(v * 512, np.round(v * 512), atol=1e-6))

    assert not on_grid(bf16)
    if runtime.cpu_has_native_bf16():  # elsewhere "bf16" runs fp32 and nothing is rounded
        model.sam.sam_mask_decoder.iou_prediction_head._forward_hooks.clear()  # without the hook: rounded
        assert on_grid(np.array([p.iou_pred for p in predict(model, images, boxes=boxes, precision="bf16")]))
