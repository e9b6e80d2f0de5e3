"""``mean_teacher``: an EMA teacher gives consistency targets on unlabelled images (Tarvainen & Valpola 2017).

Per step::

    loss = supervised(labelled)
         + unlabelled_weight × ramp(step) × MSE(σ(student(strong(x_u))), σ(teacher(weak(x_u))))

- **Teacher**: a deep copy of the segmenter, never trained by the optimiser (``requires_grad=False``, eval
  mode); after every optimiser step its weights follow the student's as an EMA with decay
  ``min(EMA_DECAY, 1 - 1/(updates + 1))`` (the warm-up form of the reference code, so the teacher is not stuck
  on the random init early). It is returned by ``extra_modules()`` only so that the loop's checkpoint holds it
  and a resumed run continues with the same teacher; having no gradient, the optimiser never changes it.
- **Perturbations** (on device, on the already normalised image): the teacher sees the image with light
  Gaussian noise (weak); the student sees a horizontal flip (per sample, 50 %), brightness/contrast jitter and
  stronger noise (strong). The flip is applied to the prompt too and undone on the student's logits, so both
  predictions live on the same pixel grid.
- **Prompts on unlabelled images.** A prompt-free model needs none. For box/point-prompted models the
  unlabelled sample's own prompt is used and is treated as a given weak annotation: in practice clinicians
  draw a box (or click) far more cheaply than they delineate a mask, so "box given, mask unknown" is the
  realistic unlabelled setting. Its mask is never read.
- **Ramp-up**: ``exp(-5 (1 - t)²)`` with ``t = step / (RAMP_FRACTION × train.max_steps)`` clipped to 1.

Without an unlabelled batch (no pool, e.g. ``data.label_fraction=1``) the step is plain supervised training.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from medsam2.semisup.base import STRATEGIES
from medsam2.semisup.supervised import Supervised

EMA_DECAY = 0.99
RAMP_FRACTION = 0.4
WEAK_NOISE = 0.05
STRONG_NOISE = 0.15


def sigmoid_rampup(step: int, length: int) -> float:
    """Laine & Aila's ramp ``exp(-5 (1 - t)²)``, t = step/length clipped to [0, 1]; 1.0 when length ≤ 0."""
    if length <= 0:
        return 1.0
    t = min(max(step / length, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def ramp_length(cfg) -> int:
    return max(1, int(RAMP_FRACTION * cfg.train.max_steps))


def unlabelled_prompts(batch: dict) -> dict[str, torch.Tensor]:
    """Prompt tensors of an unlabelled batch (``box``, ``points``, ``point_labels``); its mask is not read."""
    return {"boxes": batch["box"], "points": batch["points"], "point_labels": batch["point_labels"]}


def hflip_prompts(prompts: dict[str, torch.Tensor], flip: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
    """Mirror the prompts of the samples where ``flip`` (B,) bool is True on an S-wide image.

    Boxes (B,4) x0,y0,x1,y1 (exclusive end) become ``S - x1, y0, S - x0, y1``; points (B,N,2) x → ``S - x``.
    """
    out = dict(prompts)
    b = prompts["boxes"]
    fb = torch.stack([size - b[:, 2], b[:, 1], size - b[:, 0], b[:, 3]], 1)
    out["boxes"] = torch.where(flip.view(-1, 1), fb, b)
    p = prompts["points"]
    fp = torch.stack([size - p[..., 0], p[..., 1]], -1)
    out["points"] = torch.where(flip.view(-1, 1, 1), fp, p)
    return out


def hflip_images(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """(B,C,H,W) → the same, with samples where ``flip`` (B,) is True mirrored left-right (self-inverse)."""
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def weak_view(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Normalised (B,3,S,S) images + N(0, WEAK_NOISE²) noise (the normalised scale has std ≈ 1)."""
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return images + WEAK_NOISE * noise


def strong_view(
    images: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Strong perturbation of normalised (B,3,S,S) images → (images, flip (B,) bool).

    Per sample: contrast × U(0.7, 1.3), brightness + U(-0.3, 0.3) (in normalised units), N(0, STRONG_NOISE²)
    noise, and a horizontal flip with probability 0.5 (undo it on the prediction with :func:`hflip_images`).
    """
    b, dev, dt = images.shape[0], images.device, images.dtype

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand((b, *shape), generator=generator, device=dev, dtype=dt)

    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    x = (images - mean) * u(0.7, 1.3, 1, 1, 1) + mean + u(-0.3, 0.3, 1, 1, 1)
    x = x + STRONG_NOISE * torch.randn(images.shape, generator=generator, device=dev, dtype=dt)
    flip = torch.rand(b, generator=generator, device=dev) < 0.5
    return hflip_images(x, flip), flip


def consistency_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of sigmoid probabilities, (B,1,H,W) logits each → scalar in [0, 1].

    The teacher side is detached: gradients reach the student only. 0 when both logits are equal.
    """
    return F.mse_loss(torch.sigmoid(student_logits.float()), torch.sigmoid(teacher_logits.detach().float()))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher ← decay·teacher + (1 − decay)·student for each parameter the student trains; buffers copied."""
    s_params = dict(student.named_parameters())
    for name, t in teacher.named_parameters():
        s = s_params[name]
        if s.requires_grad:
            t.lerp_(s.detach().to(t.dtype), 1.0 - decay)
    s_buffers = dict(student.named_buffers())
    for name, t in teacher.named_buffers():
        t.copy_(s_buffers[name])


def make_teacher(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` in eval mode (no parameter requires grad)."""
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


class TeacherState(nn.Module):
    """The EMA teacher plus its update count, as one module so both are checkpointed and resumed."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = make_teacher(model)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self._n: int | None = None  # host mirror of ``updates`` (read once, after a possible resume)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def train(self, mode: bool = True) -> TeacherState:  # the teacher always predicts in eval mode
        super().train(False)
        return self

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        if self._n is None:
            self._n = int(self.updates)
        self._n += 1
        self.updates.fill_(self._n)
        decay = min(EMA_DECAY, 1.0 - 1.0 / (self._n + 1.0))
        ema_update(self.model, student, decay)


class MeanTeacher(Supervised):
    needs_unlabelled = True

    def __init__(self, model: nn.Module, cfg) -> None:
        super().__init__(model, cfg)
        self.weight = cfg.semisup.unlabelled_weight
        self.ramp = ramp_length(cfg)
        self.teacher = TeacherState(model)

    def extra_modules(self) -> list[nn.Module]:
        return [self.teacher]

    def unlabelled_loss(self, model: nn.Module, unlabelled: dict) -> torch.Tensor:
        """Consistency between the student on a strong view and the teacher on a weak view (scalar ≥ 0)."""
        x = unlabelled["image"]
        prompts = unlabelled_prompts(unlabelled)
        with torch.no_grad():
            t_logits = self.teacher(weak_view(x), **prompts)["logits"]
        xs, flip = strong_view(x)
        s_logits = model(xs, **hflip_prompts(prompts, flip, x.shape[-1]))["logits"]
        return consistency_mse(hflip_images(s_logits, flip), t_logits)

    def losses(self, model, batch, unlabelled, step) -> dict[str, torch.Tensor]:
        losses, _ = self.supervised(model, batch)
        if unlabelled is None:
            return losses
        cons = self.unlabelled_loss(model, unlabelled)
        w = self.weight * sigmoid_rampup(step, self.ramp)
        losses["loss_consistency"] = cons
        losses["loss"] = losses["loss"] + w * cons
        return losses

    def after_step(self, model) -> None:
        self.teacher.update(model)


@STRATEGIES.register("mean_teacher")
def mean_teacher(model: nn.Module, cfg) -> MeanTeacher:
    return MeanTeacher(model, cfg)
