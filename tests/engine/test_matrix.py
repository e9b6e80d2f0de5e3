"""The adapter × decoder × prompt matrix, one optimizer step each, in memory (no checkpoint is written: the old
matrix test trained through ``train()`` and filled the disk with a checkpoint per cell).

Every cell: hiera_t at 64 px, random init, the training loop's own loss (``semisup.method=none``), one AdamW
step. It must give a finite loss, move at least one trainable tensor, and leave every frozen tensor
bit-identical — so an adapter that freezes nothing, or trains nothing, fails here.
"""

from __future__ import annotations

import math

import pytest
import torch

from medsam2.config import ModelCfg, load_config
from medsam2.engine.checkpoint import build_model
from medsam2.model.adapters import ADAPTERS
from medsam2.model.decoders import DECODERS
from medsam2.semisup import STRATEGIES

S = 64
PROMPTS = ("box", "points", "none")
CELLS = [(a, d, p) for a in ADAPTERS.names() for d in DECODERS.names() for p in PROMPTS
         if d != "prompt_free" or p == "none"]


def _batch(b: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(b, 1, S, S)
    mask[:, :, 16:40, 20:44] = 1
    return {
        "image": torch.randn(b, 3, S, S, generator=g), "mask": mask,
        "valid": torch.ones(b, 1, S, S, dtype=torch.bool), "box": torch.tensor([[20.0, 16, 44, 40]] * b),
        "points": torch.tensor([[[32.0, 28.0]]] * b), "point_labels": torch.ones(b, 1, dtype=torch.int32),
        "index": torch.arange(b),
    }


def test_matrix_covers_every_registered_name():
    assert {a for a, _, _ in CELLS} == set(ADAPTERS.names())
    assert {d for _, d, _ in CELLS} == set(DECODERS.names())
    assert {p for _, _, p in CELLS} == set(PROMPTS)
    assert len(CELLS) == len(ADAPTERS.names()) * (2 * len(PROMPTS) + 1)  # prompt_free takes no prompt


@pytest.mark.slow
@pytest.mark.parametrize(("adapter", "decoder", "prompt"), CELLS)
def test_one_step_per_cell(adapter, decoder, prompt):
    mcfg = ModelCfg(backbone="hiera_t", image_size=S, adapter=adapter, decoder=decoder, prompt=prompt)
    cfg = load_config(overrides=["model.image_size=64", "train.max_steps=1"]).model_copy(update={"model": mcfg})
    model, _ = build_model(mcfg, seed=0)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and (adapter == "full" or len(trainable) < len(before))
    strategy = STRATEGIES.create("none", model, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = strategy.losses(model, _batch(), None, 1)["loss"]
    assert math.isfinite(loss.item())
    loss.backward()
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and moved <= trainable, (sorted(moved - trainable)[:5], len(moved))
