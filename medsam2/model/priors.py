"""Box priors (``model.box_prior``): the decoder predicts a correction to what the box alone already says.

A randomly initialised SAM2 trained for minutes on two CPU cores starts far below the trivial ellipse inscribed
in the box prompt (BENCHMARKS.md: 0.805 Dice on Kvasir's PraNet split), and 190 steps are not enough to climb
past it. With a prior, the mask logits are

    logits = prior(box) + GATE_GAIN · gate · decoder_logits,    gate a scalar, zero at initialisation,

so step 0 scores exactly the prior's baseline, and training only has to learn where the lesion departs from
it. ``GATE_GAIN`` exists because Adam moves a parameter by ~lr per step whatever its gradient's scale: with
lr 4e-4 a bare zero-initialised scalar would need thousands of steps to open; with the gain it opens within
tens of steps (4e-4 × 50 = 0.02 per step).

Registered priors (``PRIORS``), each ``fn(boxes (B,4) x0,y0,x1,y1 in [0,S] pixels, size S) -> (B,1,S,S)
float log-odds`` whose positive set (logit > 0) is the corresponding trivial baseline of ``eval.baselines``:

- ``ellipse``: ``SHARPNESS · (1 − ρ)`` with ρ the ellipse radius ``√(((x−cx)/a)² + ((y−cy)/b)²)``: +4 at the
  box centre, 0 on the inscribed ellipse, ≈ −1.7 at the box corners;
- ``box``: +SHARPNESS/2 inside the box, −SHARPNESS/2 outside.
"""

from __future__ import annotations

import torch
from torch import nn

from medsam2.registry import Registry

PRIORS: Registry = Registry("box prior")
SHARPNESS = 4.0
GATE_GAIN = 50.0


def _grid(size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates (S,) of an S × S grid (pixel j covers [j, j+1), centre j + 0.5)."""
    c = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    return c, c


@PRIORS.register("ellipse")
def ellipse_prior(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(B,4) → (B,1,S,S) log-odds, > 0 exactly inside the ellipse inscribed in each box."""
    xs, ys = _grid(size, boxes.device)
    b = boxes.float()
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    a = ((b[:, 2] - b[:, 0]) / 2).clamp_min(0.5)
    c = ((b[:, 3] - b[:, 1]) / 2).clamp_min(0.5)
    dx = (xs[None, None, :] - cx[:, None, None]) / a[:, None, None]  # (B,1,S)
    dy = (ys[None, :, None] - cy[:, None, None]) / c[:, None, None]  # (B,S,1)
    rho = torch.sqrt(dx**2 + dy**2)
    return (SHARPNESS * (1.0 - rho)).unsqueeze(1)


@PRIORS.register("box")
def box_prior(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(B,4) → (B,1,S,S) log-odds, > 0 exactly for pixel centres inside each box."""
    xs, ys = _grid(size, boxes.device)
    b = boxes.float()
    inside_x = (xs[None, :] >= b[:, 0:1]) & (xs[None, :] < b[:, 2:3])  # (B,S)
    inside_y = (ys[None, :] >= b[:, 1:2]) & (ys[None, :] < b[:, 3:4])
    inside = inside_y[:, :, None] & inside_x[:, None, :]
    return (SHARPNESS * (inside.float() - 0.5)).unsqueeze(1)


class PriorResidual(nn.Module):
    """``forward(logits (B,1,S,S), boxes (B,4)) -> prior(boxes) + GATE_GAIN · gate · logits``; gate starts at 0."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.fn = PRIORS.get(name)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        prior = self.fn(boxes, logits.shape[-1]).to(logits.dtype)
        return prior + (GATE_GAIN * self.gate).to(logits.dtype) * logits
