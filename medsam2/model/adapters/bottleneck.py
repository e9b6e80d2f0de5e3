"""Multi-scale bottleneck feature adapters in every Hiera block (AdaptFormer-style, parallel to the MLP).

PEFT's wrapper idea: the original MLP is kept as ``base_layer`` and untouched; the adapter adds
``up(act(down(x)))`` with ``up`` zero-initialised, so at step 0 the output equals the base model's. Width is
per stage: ``round(bottleneck_ratio × stage width)`` (Hiera-t: 96/192/384/768 → 24/48/96/192 at 0.25), so
each resolution level of the feature pyramid gets an adapter sized to it.
"""

from __future__ import annotations

import torch
from torch import nn

from medsam2.model.adapters.base import ADAPTERS
from medsam2.model.adapters.freeze import freeze_image_encoder


class BottleneckAdapter(nn.Module):
    """``y = base_layer(x) + scale · up(GELU(down(x)))``; x, y: (..., dim) channel-last Hiera features."""

    def __init__(self, base_layer: nn.Module, dim: int, width: int, scale: float = 1.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.down = nn.Linear(dim, width)
        self.act = nn.GELU()
        self.up = nn.Linear(width, dim)
        self.scale = scale
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.scale * self.up(self.act(self.down(x)))


def inject_bottleneck(trunk: nn.Module, ratio: float) -> int:
    """Wrap ``block.mlp`` of every Hiera ``MultiScaleBlock`` in ``trunk``; returns the number wrapped."""
    n = 0
    for block in trunk.blocks:
        if isinstance(block.mlp, BottleneckAdapter):
            continue
        dim = block.dim_out
        block.mlp = BottleneckAdapter(block.mlp, dim, max(8, round(dim * ratio)))
        n += 1
    return n


@ADAPTERS.register("bottleneck")
def bottleneck(model: nn.Module, cfg) -> None:
    """Frozen image encoder + trainable adapters in every trunk block + trainable prompt encoder/decoder."""
    inject_bottleneck(model.sam.image_encoder.trunk, cfg.bottleneck_ratio)
    freeze_image_encoder(model)
    for name, p in model.sam.image_encoder.named_parameters():
        if ".mlp.down." in name or ".mlp.up." in name:
            p.requires_grad_(True)
