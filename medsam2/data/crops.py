"""Box-centred crops (``model.box_crop``): the neighbourhood of the box prompt becomes the whole model input.

At a small model input (128 px on a CPU) a polyp that covers a third of a 600 px frame gets ~40 px, and SAM's
S/4 mask grid gives it ~10 × 10 cells. Cropping the box grown by a margin and resizing that window to S × S
gives the lesion most of the model's pixels; the prediction is pasted back at the image's own resolution, with
everything outside the window background. Training crops around the (jittered) ground-truth box, inference
around the user's box, so both see the same geometry.

Conventions: images (H, W[, C]) in pixel coordinates, x right, y down; boxes ``(x0, y0, x1, y1)`` float with
exclusive ends (``eval.baselines``). A window is an integer box; parts of it outside the image are zero-padded.
The window → S × S map keeps no aspect ratio (as SAM2's own square resize).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

MIN_SIDE = 16
"""Smallest window side in pixels (a 3-pixel box still gets some context)."""
OUTSIDE_LOGIT = -20.0
"""Logit given to pixels outside the crop window when a prediction is pasted back (probability ≈ 2e-9)."""


def crop_window(box: np.ndarray, margin: float, hw: tuple[int, int]) -> np.ndarray:
    """(4,) box → (4,) int64 window: the box grown by ``margin`` × its side on each side, at least MIN_SIDE.

    The window may reach outside the (H, W) image (zero padding) so the box stays centred in it."""
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half_w = max(w * (0.5 + margin), MIN_SIDE / 2)
    half_h = max(h * (0.5 + margin), MIN_SIDE / 2)
    half_w = min(half_w, 2.0 * hw[1])  # a box bigger than the image cannot ask for an unbounded window
    half_h = min(half_h, 2.0 * hw[0])
    return np.array([np.floor(cx - half_w), np.floor(cy - half_h), np.ceil(cx + half_w), np.ceil(cy + half_h)],
                    np.int64)


def _padded_slice(array: np.ndarray, window: np.ndarray) -> np.ndarray:
    """``array[y0:y1, x0:x1]`` of an (H, W[, C]) array with zeros where the window leaves the array."""
    x0, y0, x1, y1 = (int(v) for v in window)
    h, w = array.shape[:2]
    out = np.zeros((y1 - y0, x1 - x0) + array.shape[2:], array.dtype)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = array[sy0:sy1, sx0:sx1]
    return out


def crop_pair(
    image: np.ndarray, mask: np.ndarray | None, window: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Cut ``window`` out of image (H, W, 3) uint8/float and mask (H, W) {0,1}, resize both to size × size
    (image: area when shrinking, else linear; mask: nearest)."""
    crop = _padded_slice(np.asarray(image), window)
    interp = cv2.INTER_AREA if min(crop.shape[:2]) > size else cv2.INTER_LINEAR
    img = cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=interp)
    msk = None
    if mask is not None:
        m = _padded_slice(np.asarray(mask), window)
        msk = cv2.resize(np.ascontiguousarray(m), (size, size), interpolation=cv2.INTER_NEAREST)
    return img, msk


def box_to_crop(box: np.ndarray, window: np.ndarray, size: int) -> np.ndarray:
    """(4,) box in image pixels → (4,) float32 box in the size × size crop's pixels."""
    x0, y0, x1, y1 = (float(v) for v in window)
    scale = np.array([size / (x1 - x0), size / (y1 - y0)] * 2, np.float64)
    return ((np.asarray(box, np.float64) - np.array([x0, y0, x0, y0])) * scale).astype(np.float32)


def paste_logits(logits: torch.Tensor, window: np.ndarray, hw: tuple[int, int]) -> torch.Tensor:
    """(1, 1, s, s) crop logits → (1, 1, H, W) image logits: resized once (bilinear) to the window's size and
    placed at the window; pixels outside the window get OUTSIDE_LOGIT."""
    x0, y0, x1, y1 = (int(v) for v in window)
    h, w = hw
    full = F.interpolate(logits.float(), size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)
    out = logits.new_full((1, 1, h, w), OUTSIDE_LOGIT, dtype=torch.float32)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[..., sy0:sy1, sx0:sx1] = full[..., sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0]
    return out
