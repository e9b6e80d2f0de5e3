"""The whole variant matrix — adapter × decoder × prompt mode (+ the dense box prompt) — trains through the one
training loop on real Kvasir images at 256 px (hiera-t, random init, CPU), and every parameter outside the
variant's trainable set is bit-identical after AdamW steps."""

from __future__ import annotations

import pytest
import torch

from medsam2.engine.checkpoint import read_checkpoint
from medsam2.engine.train import train
from medsam2.model.segmenter import build_segmenter
from tests.conftest import tiny_cfg

pytestmark = pytest.mark.slow

ADAPTERS = ["full", "decoder_only", "bottleneck", "lora"]
HEADS = [("sam2", "box"), ("sam2", "points"), ("sam2", "none"), ("multiscale", "box"), ("multiscale", "points"),
         ("multiscale", "none"), ("prompt_free", "none"), ("sam2", "box_mask")]


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("decoder,prompt", HEADS)
def test_variant_trains_in_the_loop_and_frozen_weights_stay_put(adapter, decoder, prompt, kvasir_workdir, tmp_path):
    box_mask = prompt == "box_mask"
    cfg = tiny_cfg(kvasir_workdir, tmp_path / "run", "model.image_size=256", "train.max_steps=2",
                   "train.batch_size=1", "train.eval_every=2", "train.checkpoint_every=2",
                   f"model.adapter={adapter}", f"model.decoder={decoder}",
                   f"model.prompt={'box' if box_mask else prompt}", f"model.box_mask={str(box_mask).lower()}",
                   "model.num_neg_points=1")
    initial, _ = build_segmenter(cfg.model, seed=cfg.train.seed)  # the same seeded init the loop builds
    res = train(cfg)
    assert res.steps == 2 and (adapter == "full" or res.trainable_params < res.total_params)
    trained = read_checkpoint(res.checkpoint)["model"]
    trainable = {n for n, p in initial.named_parameters() if p.requires_grad}
    changed = {n for n, p in initial.named_parameters() if n in trained and not torch.equal(p, trained[n])}
    assert changed & trainable, "nothing trained"
    assert not changed - trainable, f"frozen parameters changed: {sorted(changed - trainable)[:5]}"
    missing = trainable - set(trained)
    assert not missing, f"trainable tensors missing from the checkpoint: {sorted(missing)[:5]}"
