"""``predict(agreement=True)``: each mask's Dice with its mirror image's mask (a failure-flag input and the
``tta_flip`` acquisition score), on logits whose answer is known and through a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsam2.config import ModelCfg
from medsam2.engine.checkpoint import build_model
from medsam2.engine.predict import _agreement, predict


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
