"""Box priors (``model.box_prior``): the decoder predicts a correction to what the box alone already says.

A randomly initialised SAM2 trained for minutes on two CPU cores starts far below the trivial ellipse inscribed
in the box prompt (BENCHMARKS.md: 0.805 Dice on Kvasir's PraNet split), and a few hundred steps are not enough to
climb past it. With a prior, the mask logits are

    logits = prior(box) + correction,

where the correction is the decoder's output with its last layer zero-initialised (:func:`zero_init_correction`:
SAM's per-token hypernetwork output layers; the multiscale refiner's head is zero-initialised already). Step 0
scores exactly the prior's baseline; the zeroed layer gets a gradient at once and the layers before it from step
2 on, so the correction opens within a few steps. (A zero-initialised scalar gate on the decoder's output was
tried first: Adam moves a scalar by ~lr per step, and after 150 CPU steps the gate was 0.005 × 50 and val Dice
0.874 vs the ellipse's 0.877.) With pretrained weights the zeroing discards SAM's pretrained output layer, which
then re-learns: the prior is meant for random-init and short runs.

Registered priors (``PRIORS``), each ``fn(boxes (B,4) x0,y0,x1,y1 in [0,S] pixels, size S) -> (B,1,S,S)
float log-odds`` whose positive set (logit > 0) is the corresponding trivial baseline of ``eval.baselines``:

- ``ellipse``: ``SHARPNESS · (1 − ρ)`` with ρ the ellipse radius ``√(((x−cx)/a)² + ((y−cy)/b)²)``: +4 at the
  box centre, 0 on the inscribed ellipse, ≈ −1.7 at the box corners;
- ``box``: +SHARPNESS/2 inside the box, −SHARPNESS/2 outside.
"""

from __future__ import annotations

import torch
from torch import nn

from medsam2.registry import PRIORS

SHARPNESS = 4.0


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
    """``forward(logits (B,1,S,S), boxes (B,4)) -> prior(boxes) + logits`` (no parameters of its own)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.fn = PRIORS.get(name)

    def forward(self, logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return self.fn(boxes, logits.shape[-1]).to(logits.dtype) + logits


@torch.no_grad()
def zero_init_correction(sam: nn.Module) -> None:
    """Zero the last layer of every SAM mask-token hypernetwork MLP, so SAM's mask logits start at exactly 0."""
    for mlp in sam.sam_mask_decoder.output_hypernetworks_mlps:
        last = mlp.layers[-1]
        nn.init.zeros_(last.weight)
        if last.bias is not None:
            nn.init.zeros_(last.bias)
