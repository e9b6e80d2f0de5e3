"""Segmentation losses on mask logits, with partial-label support; registered in ``LOSSES``.

Every registered loss has the signature::

    loss(logits, target, valid=None, **options) -> Tensor  # scalar, differentiable w.r.t. logits

- ``logits``: (B, 1, H, W) float, raw mask logits (before the sigmoid). Computed in float32 even under
  bf16 autocast.
- ``target``: (B, 1, H, W) float (or bool) in {0, 1}; soft targets in [0, 1] are accepted by the BCE terms.
- ``valid``: optional (B, 1, H, W) bool; only pixels where it is True count (partial labels: unknown regions
  are ignored). ``None`` = every pixel counts. A sample with no valid pixel contributes nothing; if no pixel
  of the batch is valid the loss is a differentiable 0.

``create_loss(name, **options)`` returns the loss with its options bound (unknown options are an error), which
is what ``train.loss`` in the config names. Two further losses have their own signatures and are not in the
registry: :func:`iou_prediction_loss` (SAM's IoU head) and :func:`box_projection_loss` (weak box labels).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from medsam2.registry import LOSSES

LossFn = Callable[..., torch.Tensor]


def _prepare(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 logits/target and a float weight map (1 = counts), all (B, ...) with the logits' shape."""
    if logits.shape != target.shape:
        raise ValueError(f"logits and target shapes differ: {tuple(logits.shape)} vs {tuple(target.shape)}")
    if logits.ndim < 2:
        raise ValueError(f"expected (B, 1, H, W) logits, got shape {tuple(logits.shape)}")
    x = logits.float()
    t = target.to(dtype=torch.float32)
    if valid is None:
        w = torch.ones_like(x)
    else:
        if valid.shape != logits.shape:
            raise ValueError(f"valid shape {tuple(valid.shape)} differs from logits {tuple(logits.shape)}")
        w = valid.to(dtype=torch.float32)
    return x, t, w


def _soft_dice_per_sample(
    probs: torch.Tensor, t: torch.Tensor, w: torch.Tensor, smooth: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 - soft Dice) per sample, shape (B,), and which samples have any valid pixel, shape (B,) bool."""
    p, t, w = probs.flatten(1), t.flatten(1), w.flatten(1)
    inter = (p * t * w).sum(1)
    denom = (p * w).sum(1) + (t * w).sum(1)
    loss = 1.0 - (2.0 * inter + smooth) / (denom + smooth)
    return loss, w.sum(1) > 0


def _masked_sample_mean(per_sample: torch.Tensor, has_valid: torch.Tensor) -> torch.Tensor:
    weights = has_valid.to(per_sample.dtype)
    return (per_sample * weights).sum() / weights.sum().clamp_min(1.0)


@LOSSES.register("dice")
def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None, *, smooth: float = 1.0
) -> torch.Tensor:
    """Soft Dice loss ``1 - (2 Σ p t + s) / (Σ p + Σ t + s)`` per sample on sigmoid probabilities, batch mean.

    ``smooth`` (s) keeps empty targets defined: an empty target with an all-zero prediction has loss 0.
    Returns a scalar in [0, 1].
    """
    x, t, w = _prepare(logits, target, valid)
    per_sample, has_valid = _soft_dice_per_sample(torch.sigmoid(x), t, w, smooth)
    return _masked_sample_mean(per_sample, has_valid)


@LOSSES.register("bce")
def bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    pos_weight: float | None = None,
) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over valid pixels of the whole batch. Scalar ≥ 0.

    ``pos_weight`` multiplies the foreground term (as in ``F.binary_cross_entropy_with_logits``).
    """
    x, t, w = _prepare(logits, target, valid)
    pw = None if pos_weight is None else torch.tensor(pos_weight, dtype=x.dtype, device=x.device)
    per_pixel = F.binary_cross_entropy_with_logits(x, t, reduction="none", pos_weight=pw)
    return (per_pixel * w).sum() / w.sum().clamp_min(1.0)


def _focal(x: torch.Tensor, t: torch.Tensor, w: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017; torchvision's form) averaged over valid pixels."""
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return (loss * w).sum() / w.sum().clamp_min(1.0)


@LOSSES.register("focal_dice")
def focal_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    alpha: float = 0.25,
    gamma: float = 2.0,
    smooth: float = 1.0,
) -> torch.Tensor:
    """``focal_weight * focal + dice_weight * dice`` — SAM's mask loss (20:1, alpha 0.25, gamma 2).

    ``alpha < 0`` disables the class-balance factor. Scalar ≥ 0.
    """
    x, t, w = _prepare(logits, target, valid)
    focal = _focal(x, t, w, alpha, gamma)
    per_sample, has_valid = _soft_dice_per_sample(torch.sigmoid(x), t, w, smooth)
    return focal_weight * focal + dice_weight * _masked_sample_mean(per_sample, has_valid)


@LOSSES.register("dice_bce")
def dice_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    dice_weight: float = 1.0,
    bce_weight: float = 1.0,
    smooth: float = 1.0,
) -> torch.Tensor:
    """``dice_weight * soft Dice + bce_weight * BCE`` (equal weights by default, as MedSAM). Scalar ≥ 0."""
    return dice_weight * dice_loss(logits, target, valid, smooth=smooth) + bce_weight * bce_loss(
        logits, target, valid
    )


def _lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. sorted errors (Berman et al. 2018, alg. 1).

    ``gt_sorted``: (N,) float {0, 1}, the target ordered by decreasing error. Returns (N,) float weights.
    """
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1.0 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if gt_sorted.numel() > 1:
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def _lovasz_hinge_per_sample(x: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lovász hinge per sample over its valid pixels, shape (B,), and which samples have a valid pixel (B,)."""
    losses = []
    for xi, ti, wi in zip(x.flatten(1), t.flatten(1), w.flatten(1), strict=True):
        keep = wi > 0
        if not bool(keep.any()):
            losses.append(xi.sum() * 0.0)
            continue
        xi, ti = xi[keep], (ti[keep] > 0.5).float()
        errors = 1.0 - xi * (2.0 * ti - 1.0)
        errors_sorted, perm = torch.sort(errors, descending=True)
        losses.append(torch.dot(F.relu(errors_sorted), _lovasz_grad(ti[perm])))
    return torch.stack(losses), w.flatten(1).sum(1) > 0


@LOSSES.register("lovasz_bce")
def lovasz_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    lovasz_weight: float = 1.0,
    bce_weight: float = 1.0,
) -> torch.Tensor:
    """``lovasz_weight * Lovász hinge + bce_weight * BCE``: a direct surrogate of each image's IoU, so the
    boundary pixels that decide Dice get the gradient, not the easy interior (Berman et al., CVPR 2018).

    The hinge is computed per image over its valid pixels on the binarised target (> 0.5), then averaged
    over images with a valid pixel. Scalar ≥ 0 (the hinge term is unbounded above for confident errors).
    """
    x, t, w = _prepare(logits, target, valid)
    per_sample, has_valid = _lovasz_hinge_per_sample(x, t, w)
    return lovasz_weight * _masked_sample_mean(per_sample, has_valid) + bce_weight * bce_loss(logits, target, valid)


def create_loss(name: str, **options: object) -> LossFn:
    """The registered loss ``name`` with ``options`` bound: ``create_loss("dice_bce", bce_weight=2.0)``.

    Raises:
        KeyError: unknown loss name (the message lists the known ones).
        TypeError: an option the loss does not take.
    """
    fn = LOSSES.get(name)
    params = inspect.signature(fn).parameters
    unknown = [k for k in options if k not in params or k in ("logits", "target", "valid")]
    if unknown:
        allowed = [p for p in params if p not in ("logits", "target", "valid")]
        raise TypeError(f"loss {name!r} takes no option(s) {unknown}; options: {allowed}")
    return functools.partial(fn, **options) if options else fn


def iou_prediction_loss(
    pred_iou: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between SAM's predicted IoU and the actual IoU of the thresholded mask (target detached).

    Args:
        pred_iou: (B, K) float, the IoU head's output (K masks per prompt, usually 1).
        logits: (B, K, H, W) mask logits; the mask is ``logits > 0``. Only used without gradient.
        target: (B, 1, H, W) or (B, K, H, W) ground truth in {0, 1}.
        valid: optional bool mask broadcastable like ``target``; IoU is computed on valid pixels only.

    Returns:
        Scalar MSE. The actual IoU of an empty prediction on an empty target is 1 (empty-mask rule).
    """
    if pred_iou.shape != logits.shape[:2]:
        raise ValueError(
            f"pred_iou shape {tuple(pred_iou.shape)} must be logits' (B, K) {tuple(logits.shape[:2])}"
        )
    with torch.no_grad():
        p = (logits.detach() > 0).float()
        t = (target.detach().float() > 0.5).float().expand_as(p)
        w = torch.ones_like(p) if valid is None else valid.float().expand_as(p)
        inter = (p * t * w).flatten(2).sum(-1)
        union = ((p + t - p * t) * w).flatten(2).sum(-1)
        actual = torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))
    return F.mse_loss(pred_iou.float(), actual)


def box_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 1, H, W) float {0, 1} masks of pixels whose centre lies in each box.

    ``boxes`` is (B, 4) ``x0, y0, x1, y1`` in pixels, exclusive end (``x1`` = last column + 1), so integer
    boxes cover columns ``x0 .. x1-1``; fractional boxes select pixels whose centre ``(j + .5, i + .5)`` is
    inside.
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (B, 4) x0, y0, x1, y1; got shape {tuple(boxes.shape)}")
    b = boxes.float()
    xs = torch.arange(width, device=b.device, dtype=torch.float32) + 0.5
    ys = torch.arange(height, device=b.device, dtype=torch.float32) + 0.5
    in_x = (xs[None] >= b[:, 0:1]) & (xs[None] < b[:, 2:3])  # (B, W)
    in_y = (ys[None] >= b[:, 1:2]) & (ys[None] < b[:, 3:4])  # (B, H)
    return (in_y[:, :, None] & in_x[:, None, :]).unsqueeze(1).float()


def box_projection_loss(
    logits: torch.Tensor, boxes: torch.Tensor, *, outside_weight: float = 1.0, eps: float = 1e-6
) -> torch.Tensor:
    """Weak-label loss from a box only (BoxInst's projection term plus an outside-the-box term).

    The max of the predicted probability over rows (a (B, W) profile) must match the box's column profile
    and the max over columns (B, H) the box's row profile; each match is a Dice loss
    ``1 - 2 Σ a b / (Σ a² + Σ b²)``. Then ``outside_weight`` × BCE pushing every pixel outside the box to
    probability 0.

    Args:
        logits: (B, 1, H, W) float mask logits.
        boxes: (B, 4) float ``x0, y0, x1, y1`` in pixels of that H×W grid, exclusive end (see
            :func:`box_masks`).

    Returns:
        Scalar ≥ 0 (the two projection terms are each in [0, 1]).
    """
    if logits.ndim != 4 or logits.shape[1] != 1:
        raise ValueError(f"logits must be (B, 1, H, W), got {tuple(logits.shape)}")
    if boxes.shape[0] != logits.shape[0]:
        raise ValueError(f"{boxes.shape[0]} boxes for a batch of {logits.shape[0]}")
    x = logits.float()
    _, _, h, w = x.shape
    m = box_masks(boxes.to(x.device), h, w)
    probs = torch.sigmoid(x)

    def proj_dice(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return 1.0 - (2.0 * (a * b).sum(-1) + eps) / ((a * a).sum(-1) + (b * b).sum(-1) + eps)

    loss_x = proj_dice(probs.amax(dim=2).flatten(1), m.amax(dim=2).flatten(1))  # profile over columns (B,)
    loss_y = proj_dice(probs.amax(dim=3).flatten(1), m.amax(dim=3).flatten(1))  # profile over rows (B,)
    outside = 1.0 - m
    bce0 = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
    loss_out = (bce0 * outside).flatten(1).sum(1) / outside.flatten(1).sum(1).clamp_min(1.0)
    return (loss_x + loss_y + outside_weight * loss_out).mean()
