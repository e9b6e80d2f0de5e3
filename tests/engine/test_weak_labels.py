"""Weak labels through the real data path: hidden masks become box-only rows trained by the box loss."""

from __future__ import annotations

import torch

from medsam2.data.dataset import SegDataset
from medsam2.data.selection import select_rows
from medsam2.engine.train import train
from tests.conftest import tiny_cfg


def test_box_only_rows_are_emitted_and_train(kvasir_workdir, tmp_path):
    cfg = tiny_cfg(kvasir_workdir, tmp_path / "run", "data.label_fraction=0.5", "data.weak_labels=true",
                   "data.augment=light", "train.batch_size=6")
    labelled, pool = select_rows(cfg.data, "train")
    assert (labelled["label_kind"] == "box").sum() >= 1 and (labelled["label_kind"] == "mask").sum() >= 1
    assert pool.empty  # hidden masks kept their box instead of joining the unlabelled pool
    ds = SegDataset(labelled, cfg.data.workdir, cfg.model, "light")
    kinds = list(labelled["label_kind"])
    for i, kind in enumerate(kinds):
        s = ds[(i, 123)]
        assert bool(s["weak_box"]) == (kind == "box")
        if kind == "box":
            assert not s["valid"].any() and s["mask"].sum() == 0
            x0, y0, x1, y1 = s["gt_box"].tolist()
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        else:
            assert s["valid"].all()
    res = train(cfg)
    assert res.steps == 3 and torch.isfinite(torch.tensor(res.metrics["final_loss"]))
    without = select_rows(tiny_cfg(kvasir_workdir, tmp_path / "r2", "data.label_fraction=0.5").data, "train")
    assert (without[0]["label_kind"] == "mask").all() and len(without[1]) >= 1
