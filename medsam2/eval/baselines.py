"""Trivial box-prompt baselines: what a box alone gives, the floor a box-prompted model must clearly beat.

Box convention (used across the eval toolkit and by :func:`medsam2.losses.box_masks`): ``(x0, y0, x1, y1)`` in
pixels, inclusive start and **exclusive end** — ``x1`` is the last foreground column + 1 and ``y1`` the last
foreground row + 1 — so ``x1 - x0`` is the box width in pixels and ``mask[y0:y1, x0:x1]`` is the box.
"""

from __future__ import annotations

import numpy as np

from medsam2.registry import Registry

Box = tuple[int, int, int, int]

BASELINES: Registry = Registry("baseline")
"""Baseline name → ``fn(target_mask (H, W)) -> predicted bool mask``; names used in a report's ``method``."""


def mask_to_box(mask: np.ndarray) -> Box | None:
    """Tight bounding box ``(x0, y0, x1, y1)`` (exclusive end) of a (H, W) mask's foreground, or None."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {m.shape}")
    m = m.astype(bool)
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(m.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _check_box(box: tuple[float, float, float, float], shape: tuple[int, int]) -> None:
    if len(shape) != 2:
        raise ValueError(f"shape must be (H, W), got {shape}")
    if len(box) != 4:
        raise ValueError(f"box must be (x0, y0, x1, y1), got {box}")


def box_to_mask(box: tuple[float, float, float, float] | None, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool mask of pixels whose centre ``(j + .5, i + .5)`` lies inside the box; None → empty."""
    out = np.zeros(shape, dtype=bool)
    if box is None:
        return out
    _check_box(box, shape)
    x0, y0, x1, y1 = (float(v) for v in box)
    xs = np.arange(shape[1]) + 0.5
    ys = np.arange(shape[0]) + 0.5
    return ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]


def ellipse_from_box(box: tuple[float, float, float, float] | None, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool ellipse inscribed in ``box`` (axis-aligned, touching its four sides); None → empty.

    A pixel is inside when its centre satisfies ``((x - cx) / a)² + ((y - cy) / b)² ≤ 1`` with the box's
    centre ``(cx, cy)`` and half-sides ``a, b``.
    """
    out = np.zeros(shape, dtype=bool)
    if box is None:
        return out
    _check_box(box, shape)
    x0, y0, x1, y1 = (float(v) for v in box)
    a, b = (x1 - x0) / 2.0, (y1 - y0) / 2.0
    if a <= 0 or b <= 0:
        return out
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    xs = (np.arange(shape[1]) + 0.5 - cx) / a
    ys = (np.arange(shape[0]) + 0.5 - cy) / b
    return ys[:, None] ** 2 + xs[None, :] ** 2 <= 1.0


@BASELINES.register("ellipse_in_box")
def ellipse_in_box(mask: np.ndarray) -> np.ndarray:
    """Ellipse inscribed in the tight bounding box of ``mask`` (H, W); same shape, bool. Empty → empty."""
    m = np.asarray(mask)
    return ellipse_from_box(mask_to_box(m), m.shape)


@BASELINES.register("fill_box")
def fill_box(mask: np.ndarray) -> np.ndarray:
    """The whole tight bounding box of ``mask`` (H, W) filled; same shape, bool. Empty → empty."""
    m = np.asarray(mask)
    return box_to_mask(mask_to_box(m), m.shape)


@BASELINES.register("empty")
def empty_mask(mask: np.ndarray) -> np.ndarray:
    """Predict nothing: an all-background (H, W) bool mask."""
    return np.zeros(np.asarray(mask).shape, dtype=bool)


MEAN_MASK_GRID = 64
MEAN_MASK_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)


def mean_mask_baseline(train_masks: list[np.ndarray], grid: int = MEAN_MASK_GRID):
    """The prompt-free trivial baseline ``mean_mask``: the training masks' mean on a grid × grid canvas,
    thresholded at the level (of ``MEAN_MASK_THRESHOLDS``) with the best mean Dice on those training masks.

    Returns ``fn(target (H, W)) -> bool (H, W)`` (the target is only used for its shape), or None without masks.
    The threshold is chosen on training masks only, never on the evaluated ones."""
    import cv2

    if not train_masks:
        return None
    small = np.stack([cv2.resize(np.asarray(m, np.float32), (grid, grid), interpolation=cv2.INTER_AREA) > 0.5
                      for m in train_masks])
    mean = small.mean(0)

    def dice_at(th: float) -> float:
        pred = mean >= th
        inter = (small & pred).sum((1, 2))
        denom = small.sum((1, 2)) + pred.sum()
        return float(np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0).mean())

    best = max(MEAN_MASK_THRESHOLDS, key=dice_at)
    canvas = (mean >= best).astype(np.uint8)

    def fn(mask: np.ndarray) -> np.ndarray:
        h, w = np.asarray(mask).shape
        return cv2.resize(canvas, (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)

    return fn


#: Trivial baselines reported beside (and gated against by) a model of each prompt mode. ``mean_mask`` is built
#: per evaluation from the training masks (:func:`mean_mask_baseline`); the others are in ``BASELINES``.
PROMPT_BASELINES: dict[str, tuple[str, ...]] = {
    "box": ("ellipse_in_box", "fill_box"),
    "points": ("empty", "mean_mask"),
    "none": ("empty", "mean_mask"),
}
