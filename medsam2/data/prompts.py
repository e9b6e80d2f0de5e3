"""Prompt sampling from masks: boxes (with jitter) and positive/negative points.

Coordinates are pixel coordinates of the array they come from, x right, y down. A box is
``(x0, y0, x1, y1)`` with ``x1``/``y1`` exclusive (last foreground column/row + 1), float32.
The same functions serve training (with jitter/randomness) and evaluation (exact box, deterministic points).
"""

from __future__ import annotations

import numpy as np

from medsam2.eval.baselines import mask_to_box


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """Tight box of a (H,W) binary mask as float32 (4,), or None for an empty mask (``eval.baselines.mask_to_box``)."""
    box = mask_to_box(mask)
    return None if box is None else np.asarray(box, dtype=np.float32)


def jitter_box(box: np.ndarray, jitter: float, hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Move each corner by up to ``jitter`` × the box side (uniform), clipped to the image (H, W)."""
    if jitter <= 0:
        return box.astype(np.float32)
    w, h = box[2] - box[0], box[3] - box[1]
    d = rng.uniform(-jitter, jitter, size=4) * np.array([w, h, w, h])
    out = box + d
    out[[0, 2]] = np.clip(out[[0, 2]], 0, hw[1])
    out[[1, 3]] = np.clip(out[[1, 3]], 0, hw[0])
    if out[2] - out[0] < 1 or out[3] - out[1] < 1:
        return box.astype(np.float32)
    return out.astype(np.float32)


def sample_points(
    mask: np.ndarray, n_pos: int, n_neg: int, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """k positive points inside the mask and k negative points outside → (N,2) float32 x,y and (N,) int32 labels.

    ``rng=None`` is the deterministic evaluation mode: positives are the most interior foreground pixels
    (largest distance to the border), negatives the most distant background pixels from the object.
    Where a set is empty (empty mask / full mask), its slots are padding points with label -1.
    """
    from scipy.ndimage import distance_transform_edt

    pts, labels = [], []
    for want, region, label in ((n_pos, mask > 0, 1), (n_neg, mask == 0, 0)):
        if want == 0:
            continue
        ys, xs = np.nonzero(region)
        if len(xs) == 0:
            pts.append(np.zeros((want, 2), np.float32))
            labels.append(-np.ones(want, np.int32))
            continue
        if rng is None:
            dist = distance_transform_edt(region)[ys, xs]
            idx = np.argsort(-dist, kind="stable")[:want]
            idx = np.resize(idx, want)
        else:
            idx = rng.integers(0, len(xs), size=want)
        pts.append(np.stack([xs[idx] + 0.5, ys[idx] + 0.5], 1).astype(np.float32))
        labels.append(np.full(want, label, np.int32))
    return np.concatenate(pts, 0), np.concatenate(labels, 0)
