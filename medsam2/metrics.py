"""Segmentation metrics for binary 2-D masks: Dice, IoU, precision, recall, HD95 — and their summaries.

Definitions (P = predicted foreground pixels, T = target foreground pixels, |.| = pixel count):

- dice = 2|P∩T| / (|P| + |T|), iou = |P∩T| / |P∪T|, precision = |P∩T| / |P|, recall = |P∩T| / |T|.
- hd95 = 95th percentile (numpy linear interpolation) of the pooled symmetric surface distances: for every
  boundary pixel of P the Euclidean distance to the nearest boundary pixel of T, and vice versa. A boundary
  pixel is a foreground pixel removed by one binary erosion with the 4-connected cross (pixels on the image
  edge count as boundary). Distances are in ``spacing`` units, ``spacing = (row_spacing, col_spacing)``, i.e.
  (dy, dx) in the array's axis order, as in ``scipy.ndimage.distance_transform_edt(sampling=...)``.

Empty-mask rule (followed by every function here, by ``batch_dice`` and by the reports):

===========================  =====  =====  =========  ======  ===============================
case                         dice   iou    precision  recall  hd95
===========================  =====  =====  =========  ======  ===============================
P empty, T empty             1      1      1          1       0
P empty, T non-empty         0      0      0          0       image diagonal (in spacing units)
P non-empty, T empty         0      0      0          0       image diagonal (in spacing units)
===========================  =====  =====  =========  ======  ===============================

Correctly predicting nothing is perfect. When exactly one mask is empty the undefined ratio (precision when P
is empty, recall when T is empty) is 0, not 1, so predicting nothing is never rewarded; hd95 is the image
diagonal ``sqrt((H*dy)**2 + (W*dx)**2)`` — the largest distance possible in the image — so it stays finite and
means over a test set stay finite. Every metric is a Python float and never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import ndimage

from medsam2.eval.stats import bootstrap_ci

if TYPE_CHECKING:
    import pandas

METRIC_NAMES: tuple[str, ...] = ("dice", "iou", "precision", "recall", "hd95")
_CROSS = ndimage.generate_binary_structure(2, 1)


def _as_bool_mask(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) mask, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN; threshold probabilities before computing metrics")
    return arr > 0.5 if np.issubdtype(arr.dtype, np.floating) else arr != 0


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels (voxels) removed by one erosion with the face-connected cross of the mask's ndim
    (pixels on the array's edge count as boundary)."""
    cross = _CROSS if mask.ndim == 2 else ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=cross, border_value=0)


def _surface_distances(p: np.ndarray, t: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """For two non-empty boolean masks of any ndim: (distance of every boundary point of ``p`` to the nearest
    boundary point of ``t``, and vice versa), in ``spacing`` units (one spacing per axis)."""
    bp, bt = _boundary(p), _boundary(t)
    # Distance from every pixel to the nearest boundary pixel of the other mask (EDT of the non-boundary).
    dist_to_t = ndimage.distance_transform_edt(~bt, sampling=tuple(spacing))
    dist_to_p = ndimage.distance_transform_edt(~bp, sampling=tuple(spacing))
    return dist_to_t[bp], dist_to_p[bt]


def hd95(pred: np.ndarray, target: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0)) -> float:
    """95th-percentile symmetric Hausdorff distance between two binary (H, W) masks, in ``spacing`` units.

    Follows the empty-mask rule of this module: both empty → 0, exactly one empty → image diagonal.
    """
    p = _as_bool_mask(pred, "pred")
    t = _as_bool_mask(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target shapes differ: {p.shape} vs {t.shape}")
    p_any, t_any = bool(p.any()), bool(t.any())
    if not p_any and not t_any:
        return 0.0
    if not (p_any and t_any):
        h, w = p.shape
        return float(np.hypot(h * spacing[0], w * spacing[1]))
    return float(np.percentile(np.concatenate(_surface_distances(p, t, spacing)), 95))


VOLUME_METRIC_NAMES: tuple[str, ...] = ("dice", "hd95", "nsd")


def volume_metrics(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 2.0
                   ) -> dict[str, float]:
    """3-D Dice, HD95 (mm) and NSD for one binary (Z, H, W) volume pair with voxel ``spacing`` (dz, dy, dx) mm.

    dice = 2|P∩T| / (|P| + |T|) over voxels; hd95 as :func:`hd95` on the 3-D boundary voxels (face-connected
    erosion) with the anisotropic spacing; nsd (normalised surface Dice, Nikolov et al. 2021, on boundary voxels
    rather than surface elements) = (#boundary voxels of P within ``tolerance_mm`` of T's boundary + the same
    for T) / (#boundary voxels of P + of T), in [0, 1]. Empty masks follow this module's rule: both empty →
    dice 1, hd95 0, nsd 1; exactly one empty → dice 0, nsd 0, hd95 the volume diagonal in mm.
    """
    p, t = np.asarray(pred) != 0, np.asarray(target) != 0
    if p.ndim != 3 or p.shape != t.shape:
        raise ValueError(f"pred and target must be (Z, H, W) volumes of one shape, got {p.shape} and {t.shape}")
    n_p, n_t = int(p.sum()), int(t.sum())
    if n_p == 0 and n_t == 0:
        return {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}
    if n_p == 0 or n_t == 0:
        diag = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(p.shape, spacing, strict=True))))
        return {"dice": 0.0, "hd95": diag, "nsd": 0.0}
    d_pt, d_tp = _surface_distances(p, t, spacing)
    within = int((d_pt <= tolerance_mm).sum() + (d_tp <= tolerance_mm).sum())
    return {"dice": 2.0 * int(np.logical_and(p, t).sum()) / (n_p + n_t),
            "hd95": float(np.percentile(np.concatenate([d_pt, d_tp]), 95)),
            "nsd": within / (d_pt.size + d_tp.size)}


def segmentation_metrics(
    pred: np.ndarray, target: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0)
) -> dict[str, float]:
    """Dice, IoU, precision, recall and HD95 for one binary 2-D mask pair.

    Args:
        pred: predicted mask, (H, W), bool or 0/1 integers (floats are thresholded at 0.5 — pass a mask, not
            logits).
        target: ground-truth mask, same shape and conventions.
        spacing: (row, column) pixel size, e.g. millimetres; only HD95 uses it.

    Returns:
        ``{"dice", "iou", "precision", "recall", "hd95"}`` as Python floats; overlap metrics in [0, 1],
        hd95 in [0, image diagonal]. Empty masks follow the module's empty-mask rule.
    """
    p = _as_bool_mask(pred, "pred")
    t = _as_bool_mask(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target shapes differ: {p.shape} vs {t.shape}")
    n_p, n_t = int(p.sum()), int(t.sum())
    if n_p == 0 and n_t == 0:
        return {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "hd95": 0.0}
    inter = int(np.logical_and(p, t).sum())
    union = n_p + n_t - inter
    return {
        "dice": 2.0 * inter / (n_p + n_t),
        "iou": inter / union,
        "precision": inter / n_p if n_p else 0.0,
        "recall": inter / n_t if n_t else 0.0,
        "hd95": hd95(p, t, spacing),
    }


def batch_dice(
    logits_or_probs: torch.Tensor, target: torch.Tensor, *, from_logits: bool = True, threshold: float = 0.5
) -> torch.Tensor:
    """Hard Dice per sample, on device, without a host sync (usable inside a training/eval loop).

    Args:
        logits_or_probs: (B, 1, H, W) float — raw logits if ``from_logits`` else probabilities in [0, 1].
            Any (B, ...) shape works; all non-batch dimensions are reduced.
        target: (B, 1, H, W) ground truth, bool or float in {0, 1} (values > 0.5 are foreground).
        from_logits: apply a sigmoid before thresholding.
        threshold: probability threshold for the prediction (0.5 ⇔ logit 0).

    Returns:
        (B,) float32 Dice in [0, 1]; both masks empty → 1, exactly one empty → 0 (module rule).
    """
    if logits_or_probs.shape != target.shape:
        raise ValueError(
            f"prediction and target shapes differ: {tuple(logits_or_probs.shape)} vs {tuple(target.shape)}"
        )
    if logits_or_probs.ndim < 2:
        raise ValueError(f"expected a batch (B, ...) of masks, got shape {tuple(logits_or_probs.shape)}")
    x = logits_or_probs.detach().float()
    probs = torch.sigmoid(x) if from_logits else x
    p = (probs > threshold).flatten(1).float()
    t = (target.detach().float() > 0.5).flatten(1).float()
    inter = (p * t).sum(1)
    denom = p.sum(1) + t.sum(1)
    return torch.where(denom > 0, 2.0 * inter / denom.clamp_min(1.0), torch.ones_like(denom))


def _cluster_labels(df: pandas.DataFrame) -> np.ndarray | None:
    """Bootstrap cluster of each row: its ``patient_id``, or a label of its own when that is empty; shape (N,)."""
    if "patient_id" not in df.columns:
        return None
    pid = df["patient_id"].to_numpy(dtype=object)
    own = np.array([f"\x00row{i}" for i in range(len(df))], dtype=object)
    missing = np.array([p is None or (isinstance(p, float) and np.isnan(p)) or str(p) == "" for p in pid])
    return np.where(missing, own, np.array([str(p) for p in pid], dtype=object))


def summarize(
    rows: Sequence[dict] | pandas.DataFrame,
    metrics: Sequence[str] = METRIC_NAMES,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Mean and 95 % bootstrap CI of each metric over per-image rows.

    When the rows carry a ``patient_id`` column the CI is a cluster bootstrap over patients (all images of a
    patient — e.g. the frames of one CVC-ClinicDB video — are resampled together); rows with an empty or missing
    ``patient_id`` are each their own cluster. Without the column, images are resampled one by one. With one
    image per patient (Kvasir-SEG) both give the same interval for the same seed.

    Args:
        rows: one dict per image (or a DataFrame with one row per image) holding the metric columns and
            optionally ``patient_id``.
        metrics: metric names to summarise; each must be a column/key of ``rows``.
        n_boot, seed: bootstrap resamples and seed (see :func:`medsam2.eval.stats.bootstrap_ci`).

    Returns:
        ``{metric: {"mean", "ci_low", "ci_high", "n"}}``; NaN values are ignored and ``n`` counts the rest.
        A metric whose values are all NaN gets NaN statistics and ``n = 0``.

    Raises:
        ValueError: ``rows`` is empty. KeyError: a requested metric is missing.
    """
    import pandas as pd

    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if len(df) == 0:
        raise ValueError("summarize needs at least one row")
    missing = [m for m in metrics if m not in df.columns]
    if missing:
        raise KeyError(f"metrics {missing} not in rows; available: {sorted(map(str, df.columns))}")
    groups = _cluster_labels(df)
    out: dict[str, dict[str, float]] = {}
    for m in metrics:
        vals = pd.to_numeric(df[m], errors="coerce").to_numpy(dtype=np.float64)
        n = int((~np.isnan(vals)).sum())
        if n == 0:
            nan = float("nan")
            out[m] = {"mean": nan, "ci_low": nan, "ci_high": nan, "n": 0}
            continue
        mean, low, high = bootstrap_ci(vals, n_boot=n_boot, seed=seed, groups=groups)
        out[m] = {"mean": mean, "ci_low": low, "ci_high": high, "n": n}
    return out
