"""``mutual_consistency``: two decoder heads teach each other on unlabelled images (cross pseudo supervision,
Chen et al. 2021; in the spirit of MC-Net, Wu et al. 2021).

**Parameters.** Shared by both heads: the whole image path up to the decoder — SAM2's image encoder (Hiera
trunk + FPN neck, with its adapters), ``no_mem_embed`` and the prompt encoder. Head A is the model's own
decoder (``sam.sam_mask_decoder`` + ``model.decoder``'s own modules, e.g. the multiscale refiner); it is what
the checkpoint exports and what inference uses. Head B (:class:`SecondHead`, the strategy's extra module,
trained by the same optimiser) is a deep copy of both, every parameter trainable, its weights perturbed by a
little seeded noise so the two heads disagree from the start (CPS needs differently initialised branches).

**Losses.** Each head gets the full supervised step on labelled images (mask loss + IoU head, weak boxes via
the box-projection loss). On unlabelled images each head is trained on the other's hard pseudo-label
(``σ(logits) > 0.5``, detached) with the configured mask loss::

    loss = sup_A + sup_B + unlabelled_weight × ramp(step) × ½ (L(A, ⌊B⌉) + L(B, ⌊A⌋))

The image is encoded once per batch: a forward hook on ``model.decoder`` captures its inputs (features and
prompt embeddings), which head B then decodes. Prompts on unlabelled images: as in ``mean_teacher`` (the
sample's own box/points are taken as given weak annotations; the mask is never read).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from medsam2.semisup.base import STRATEGIES
from medsam2.semisup.mean_teacher import ramp_length, sigmoid_rampup
from medsam2.semisup.supervised import Supervised, forward_batch

HEAD_NOISE = 0.05
"""Std of the perturbation added to head B's weights, relative to each tensor's own std."""


class _SamView:
    """Looks like the SAM2 module to a decoder, but with head B's mask decoder (not an ``nn.Module``, so the
    shared prompt encoder is not registered — and optimised — twice)."""

    def __init__(self, sam: nn.Module, mask_decoder: nn.Module) -> None:
        self._sam, self.sam_mask_decoder = sam, mask_decoder

    def __getattr__(self, name: str):
        return getattr(self._sam, name)


class SecondHead(nn.Module):
    """Head B: copies of SAM2's mask decoder and of the model's decoder module.

    ``forward(sam, feats, sparse, dense, images)`` has the decoder contract (see ``model.decoders``) and
    returns (logits (B,1,S,S) pre-sigmoid, iou_pred (B,1)).
    """

    def __init__(self, model: nn.Module, *, noise: float = HEAD_NOISE, seed: int = 0) -> None:
        super().__init__()
        self.mask_decoder = copy.deepcopy(model.sam.sam_mask_decoder)
        self.decoder = copy.deepcopy(model.decoder)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in self.parameters():
                p.requires_grad_(True)
                if noise > 0 and p.is_floating_point() and p.numel() > 1:
                    std = float(p.detach().float().std())
                    if std > 0:
                        p.add_(noise * std * torch.randn(p.shape, generator=gen).to(p.device, p.dtype))

    def forward(self, sam, feats, sparse, dense, images):
        return self.decoder(_SamView(sam, self.mask_decoder), feats, sparse, dense, images)


@contextmanager
def capture_decoder_inputs(model: nn.Module) -> Iterator[dict]:
    """Within the block, every call of ``model.decoder`` stores its positional inputs in ``store["args"]``."""
    store: dict = {}
    handle = model.decoder.register_forward_hook(lambda mod, args, out: store.__setitem__("args", args))
    try:
        yield store
    finally:
        handle.remove()


class _Fixed:
    """A stand-in 'model' returning precomputed outputs, so head B reuses the shared supervised step."""

    def __init__(self, out: dict) -> None:
        self.out = out

    def __call__(self, *args, **kwargs) -> dict:
        return self.out


def cps_loss(loss_fn, logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """½ (L(a, [σ(b) > .5]) + L(b, [σ(a) > .5])) for (B,1,H,W) logits; pseudo-labels detached. Scalar ≥ 0."""
    hard_a = (logits_a.detach() > 0).float()
    hard_b = (logits_b.detach() > 0).float()
    return 0.5 * (loss_fn(logits_a, hard_b) + loss_fn(logits_b, hard_a))


class MutualConsistency(Supervised):
    needs_unlabelled = True

    def __init__(self, model: nn.Module, cfg) -> None:
        super().__init__(model, cfg)
        self.weight = cfg.semisup.unlabelled_weight
        self.ramp = ramp_length(cfg)
        self.head = SecondHead(model, seed=cfg.train.seed)

    def extra_modules(self) -> list[nn.Module]:
        return [self.head]

    def two_heads(self, model: nn.Module, batch: dict) -> tuple[dict, dict]:
        """Both heads' outputs ({"logits", "iou_pred"}) on one batch, encoding the images once."""
        with capture_decoder_inputs(model) as store:
            out_a = forward_batch(model, batch)
        logits_b, iou_b = self.head(*store["args"])
        return out_a, {"logits": logits_b, "iou_pred": iou_b}

    def losses(self, model, batch, unlabelled, step) -> dict[str, torch.Tensor]:
        out_a, out_b = self.two_heads(model, batch)
        sup_a, _ = self.supervised(_Fixed(out_a), batch)
        sup_b, _ = self.supervised(_Fixed(out_b), batch)
        losses = dict(sup_a)
        losses["loss_mask_b"] = sup_b["loss_mask"]
        losses["loss"] = sup_a["loss"] + sup_b["loss"]
        if unlabelled is not None:
            ua, ub = self.two_heads(model, unlabelled)
            cps = cps_loss(self.loss_fn, ua["logits"], ub["logits"])
            losses["loss_cps"] = cps
            losses["loss"] = losses["loss"] + self.weight * sigmoid_rampup(step, self.ramp) * cps
        return losses


@STRATEGIES.register("mutual_consistency")
def mutual_consistency(model: nn.Module, cfg) -> MutualConsistency:
    return MutualConsistency(model, cfg)
