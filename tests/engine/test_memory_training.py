"""Training SAM2's memory (issue 16): ``model.memory: true`` trains on clips of K consecutive slices of the
shared BraTS FLAIR volume (random direction), the box prompt on the first slice and the loss on every slice,
through the same ``train(cfg)`` loop; the memory modules change, the frozen ones do not, and the checkpoint
carries them. Weights: random init, 64 px."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from medsam2.data.clips import ClipDataset, volume_clips
from tests.conftest import remove_checkpoints, tiny_cfg

MEMORY_PREFIXES = ("memory_attention.", "memory_encoder.", "obj_ptr_proj.", "mask_downsample.")


@pytest.fixture(scope="module")
def brats_workdir(sample_data, tmp_path_factory):
    from medsam2.data.ingest import ingest

    root = tmp_path_factory.mktemp("brats")
    shutil.copytree(sample_data / "brats2021-flair-edema" / "volume", root / "src" / "volume")
    ingest(str(root / "src"), root / "work")
    return root / "work"


def test_clips_are_consecutive_slices_of_one_volume():
    rows = pd.DataFrame({
        "dataset": "d", "source_uri": ["a"] * 5 + ["b"] * 3, "target": None, "label_kind": "mask",
        "frame": [0, 1, 2, 4, 5, 7, 8, 9], "mask_fraction": [0.1, 0.0, 0.2, 0.3, 0.1, 0.0, 0.2, 0.2]})
    # a: 0-1-2 (first has foreground), 4-5 is too short, 2-4 is not consecutive; b: 7 is empty, 8-9 too short
    assert volume_clips(rows, 3) == [[0, 1, 2]]
    assert volume_clips(rows, 2) == [[0, 1], [3, 4], [6, 7]]


def test_clip_samples_run_both_ways(brats_workdir, tmp_path):
    from medsam2.data.manifest import read_manifest

    cfg = tiny_cfg(brats_workdir, tmp_path, "model.memory=true", "train.clip_length=3")
    ds = ClipDataset(read_manifest(brats_workdir), brats_workdir, cfg.model, 3)
    s = ds[0]
    assert s["image"].shape == (3, 3, 64, 64) and s["mask"].shape == (3, 1, 64, 64) and s["box"].shape == (4,)
    assert float(s["image"].min()) >= 0 and float(s["image"].max()) <= 1
    firsts = {float(ds[(len(ds) // 2, seed)]["mask"][0].sum()) for seed in range(12)}
    assert len(firsts) == 2  # seeds draw both directions: the prompted (first) slice is either end of the clip


def test_memory_training_steps_update_memory_modules(brats_workdir, tmp_path):
    from medsam2.engine.checkpoint import build_model, read_checkpoint
    from medsam2.engine.train import train

    cfg = tiny_cfg(brats_workdir, tmp_path / "run", "model.memory=true", "train.clip_length=3",
                   "train.batch_size=1", "train.max_steps=2", "train.eval_every=100", "model.adapter=lora")
    before, _ = build_model(cfg.model, seed=cfg.train.seed)
    start = {k: v.clone() for k, v in before.state_dict().items()}
    trainable = {n for n, p in before.named_parameters() if p.requires_grad}
    assert any(n.startswith("sam." + MEMORY_PREFIXES[0]) for n in trainable)
    assert not any(n.startswith("sam.image_encoder.") and "lora" not in n for n in trainable)
    res = train(cfg)
    assert res.steps == 2 and math.isfinite(res.metrics["final_loss"])
    assert {"loss_first", "loss_propagated"} <= set(res.history[-1])
    state = read_checkpoint(res.checkpoint)["model"]
    changed = {k for k, v in state.items() if k in start and not torch.equal(v, start[k])}
    for prefix in MEMORY_PREFIXES[:2]:  # memory attention and memory encoder learnt from the clips
        assert any(k.startswith("sam." + prefix) for k in changed), prefix
    frozen = [k for k in state if k.startswith("sam.image_encoder.") and "lora" not in k]
    assert all(torch.equal(state[k], start[k]) for k in frozen if k in start)
    assert np.isfinite(res.history[-1]["loss_propagated"])
    from medsam2.engine.checkpoint import load_model

    loaded, _ = load_model(res.checkpoint, torch.device("cpu"))  # the trained memory comes back with the model
    key = next(k for k in changed if k.startswith("sam.memory_attention."))
    assert torch.equal(loaded.state_dict()[key], state[key])
    remove_checkpoints(tmp_path)
