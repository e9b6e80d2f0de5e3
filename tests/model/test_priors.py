"""Box priors: their positive set is the trivial baseline, and the residual starts as the prior exactly."""

import numpy as np
import torch

from medsam2.eval.baselines import box_to_mask, ellipse_from_box
from medsam2.model.priors import PRIORS


def test_prior_positive_sets_are_the_baselines():
    box = (7.0, 11.0, 51.0, 40.0)
    boxes = torch.tensor([box])
    ell = PRIORS.get("ellipse")(boxes, 64)[0, 0].numpy() > 0
    assert (ell == ellipse_from_box(box, (64, 64))).mean() > 0.995  # ≤ 0.5 % boundary pixels differ (float)
    rect = PRIORS.get("box")(boxes, 64)[0, 0].numpy() > 0
    assert np.array_equal(rect, box_to_mask(box, (64, 64)))


def test_segmenter_with_a_prior_starts_as_the_prior_and_its_correction_gets_a_gradient():
    from medsam2.config import ModelCfg
    from medsam2.engine.checkpoint import build_model

    cfg = ModelCfg(image_size=64, box_prior="ellipse", box_mask=True)
    net, _ = build_model(cfg)
    boxes = torch.tensor([[8.0, 10.0, 40.0, 50.0], [0.0, 0.0, 64.0, 64.0]])
    out = net(torch.randn(2, 3, 64, 64), boxes=boxes)
    assert torch.equal(out["logits"], PRIORS.get("ellipse")(boxes, 64))  # exactly the prior at step 0
    out["logits"].square().mean().backward()
    last = net.sam.sam_mask_decoder.output_hypernetworks_mlps[0].layers[-1]
    assert float(last.weight.grad.abs().sum()) > 0  # the zeroed layer learns from the first step


def test_prior_needs_a_box_prompt_and_a_known_name():
    import pytest

    from medsam2.config import ModelCfg

    with pytest.raises(ValueError, match="box_prior needs model.prompt=box"):
        ModelCfg(prompt="none", decoder="prompt_free", box_prior="ellipse")
    with pytest.raises(ValueError, match="Input should be 'none', 'box' or 'ellipse'"):
        ModelCfg(box_prior="circle")
