"""Box priors: their positive set is the trivial baseline, and the residual starts as the prior exactly."""

import numpy as np
import torch

from medsam2.eval.baselines import box_to_mask, ellipse_from_box
from medsam2.model.priors import PRIORS, PriorResidual


def test_prior_positive_sets_are_the_baselines():
    box = (7.0, 11.0, 51.0, 40.0)
    boxes = torch.tensor([box])
    ell = PRIORS.get("ellipse")(boxes, 64)[0, 0].numpy() > 0
    assert (ell == ellipse_from_box(box, (64, 64))).mean() > 0.995  # ≤ 0.5 % boundary pixels differ (float)
    rect = PRIORS.get("box")(boxes, 64)[0, 0].numpy() > 0
    assert np.array_equal(rect, box_to_mask(box, (64, 64)))


def test_residual_is_the_prior_at_init_and_the_gate_gets_a_gradient():
    res = PriorResidual("ellipse")
    boxes = torch.tensor([[8.0, 8.0, 24.0, 30.0]])
    logits = torch.randn(1, 1, 32, 32, requires_grad=True)
    out = res(logits, boxes)
    assert torch.equal(out, PRIORS.get("ellipse")(boxes, 32))
    out.sum().backward()
    assert res.gate.grad is not None and float(res.gate.grad.abs()) > 0
