"""``adversarial``: a mask discriminator pushes predictions on unlabelled images towards realistic masks
(Hung et al. 2018; Zhang et al. 2017's DAN for medical images).

The discriminator (:class:`MaskDiscriminator`, the strategy's extra module) sees a mask probability map
concatenated with its image at model resolution and outputs a real/fake logit per image. One backward pass
trains both players, and the two losses are kept apart by construction:

- **Discriminator loss** ``½ (BCE(D(gt ⊕ x_l), 1) + BCE(D(σ(s_u).detach() ⊕ x_u), 0))``: its inputs are
  detached, so it only produces gradients for the discriminator's parameters, never for the segmenter.
- **Generator (adversarial) loss** ``BCE(D'(σ(s_u) ⊕ x_u), 1)`` (non-saturating): ``D'`` is the discriminator
  called through ``torch.func.functional_call`` with *detached* copies of its parameters, so this loss only
  produces gradients for the segmenter, never for the discriminator.

Total: ``supervised + d_loss + unlabelled_weight × ADV_SCALE × ramp(step) × g_loss``. Both players share
the loop's AdamW (same LR/clipping). Real masks are the labelled batch's fully labelled, non-weak samples
(partially labelled or box-only samples are not real masks: weight 0 in the real term, no host sync).
Prompts on unlabelled images: as in ``mean_teacher`` (the sample's own box/points are given weak annotations).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from medsam2.semisup.base import STRATEGIES
from medsam2.semisup.mean_teacher import ramp_length, sigmoid_rampup
from medsam2.semisup.supervised import Supervised, forward_batch

ADV_SCALE = 0.1
"""Adversarial terms are usually weighted 0.01–0.1 of the supervised loss; this scales unlabelled_weight."""


class MaskDiscriminator(nn.Module):
    """Small CNN: (B,1,S,S) mask probability in [0,1] ⊕ (B,3,S,S) normalised image → (B,) real/fake logit.

    ``depth`` stride-2 4×4 convs (width doubling, capped at 8×width), GroupNorm + LeakyReLU(0.2), then global
    average pooling and a linear layer.
    """

    def __init__(self, width: int = 32, depth: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 4
        for i in range(depth):
            cout = width * min(2**i, 8)
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1)]
            if i:
                layers += [nn.GroupNorm(min(8, cout), cout)]
            layers += [nn.LeakyReLU(0.2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, 1)

    def forward(self, mask_prob: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = torch.cat([mask_prob.to(image.dtype), image], 1)
        return self.head(self.features(x).mean(dim=(2, 3))).squeeze(1)


def discriminator_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, real_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """½ (BCE(real, 1) + BCE(fake, 0)) on (N,)/(M,) logits → scalar ≥ 0; low when real ≫ 0 and fake ≪ 0.

    ``real_weight`` (N,) float in {0, 1} picks which real samples count (their weighted mean; 0 if none).
    """
    real = F.binary_cross_entropy_with_logits(
        real_logits.float(), torch.ones_like(real_logits, dtype=torch.float), reduction="none"
    )
    w = torch.ones_like(real) if real_weight is None else real_weight.float()
    fake_logits = fake_logits.float()
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return 0.5 * ((real * w).sum() / w.sum().clamp_min(1.0) + fake)


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating adversarial loss BCE(D(fake), 1) on (N,) logits; low when D takes fakes for real."""
    fake_logits = fake_logits.float()
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def frozen_call(module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    """``module(*args)`` with detached parameters: gradients reach the inputs, never the module's weights."""
    params = {n: p.detach() for n, p in module.named_parameters()}
    return functional_call(module, params, args)


def real_mask_rows(batch: dict) -> torch.Tensor:
    """(B,) bool: samples whose mask is a complete ground truth (every pixel valid, not a weak box label)."""
    ok = batch["valid"].flatten(1).all(1)
    weak = batch.get("weak_box")
    return ok & ~weak if weak is not None else ok


class Adversarial(Supervised):
    needs_unlabelled = True

    def __init__(self, model: nn.Module, cfg) -> None:
        super().__init__(model, cfg)
        self.weight = cfg.semisup.unlabelled_weight * ADV_SCALE
        self.ramp = ramp_length(cfg)
        self.disc = MaskDiscriminator()

    def extra_modules(self) -> list[nn.Module]:
        return [self.disc]

    def losses(self, model, batch, unlabelled, step) -> dict[str, torch.Tensor]:
        losses, _ = self.supervised(model, batch)
        if unlabelled is None:
            return losses
        x_u = unlabelled["image"]
        prob_u = torch.sigmoid(forward_batch(model, unlabelled)["logits"].float())
        g = generator_loss(frozen_call(self.disc, prob_u, x_u))
        real = self.disc(batch["mask"], batch["image"])
        d = discriminator_loss(real, self.disc(prob_u.detach(), x_u), real_mask_rows(batch))
        losses["loss_adv"] = g
        losses["loss_disc"] = d
        losses["loss"] = losses["loss"] + self.weight * sigmoid_rampup(step, self.ramp) * g + d
        return losses


@STRATEGIES.register("adversarial")
def adversarial(model: nn.Module, cfg) -> Adversarial:
    return Adversarial(model, cfg)
