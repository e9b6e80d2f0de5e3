"""Plain freeze policies: ``full`` (everything trains) and ``decoder_only`` (image encoder frozen)."""

from __future__ import annotations

from torch import nn

from medsam2.model.adapters.base import ADAPTERS


def set_trainable(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def freeze_image_encoder(model: nn.Module) -> None:
    """Everything trains except the SAM2 image encoder (Hiera trunk + FPN neck)."""
    set_trainable(model, True)
    set_trainable(model.sam.image_encoder, False)


@ADAPTERS.register("full")
def full(model: nn.Module, cfg) -> None:
    set_trainable(model, True)


@ADAPTERS.register("decoder_only")
def decoder_only(model: nn.Module, cfg) -> None:
    freeze_image_encoder(model)
