"""Every documented backbone (hiera t/s/b+/l) of SAM2 and SAM2.1 builds from Meta's configs and segments: a
64 px forward at random init (no weights can be downloaded here), with sizes ordered t < s < b+ < l."""

from __future__ import annotations

import pytest
import torch

from medsam2.config import ModelCfg
from medsam2.engine.checkpoint import build_model

BACKBONES = ["hiera_t", "hiera_s", "hiera_b+", "hiera_l"]


@pytest.mark.parametrize("version", ["2.0", "2.1"])
def test_every_backbone_builds_and_segments(version):
    totals = []
    for backbone in BACKBONES:
        model, base = build_model(ModelCfg(backbone=backbone, sam2_version=version, image_size=64))
        assert base.source == "none"
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, 3, 64, 64), boxes=torch.tensor([[8.0, 8.0, 40.0, 40.0]]))
        assert out["logits"].shape == (1, 1, 64, 64) and torch.isfinite(out["logits"]).all()
        totals.append(model.param_count().total)
        del model
    assert totals == sorted(totals) and len(set(totals)) == 4, totals
    assert 30e6 < totals[0] < 50e6 and 200e6 < totals[-1] < 250e6  # hiera_t ≈ 39 M, hiera_l ≈ 224 M
