"""Training augmentation (albumentations 2.x) for image float32 [0, 1] (H, W, 3) + mask uint8 (H, W) {0, 1}.

Strengths:

* ``none`` — identity (an empty Compose, so callers need no special case);
* ``light`` — horizontal/vertical flips, rot90, a small affine (±5 % shift, 0.9–1.1 scale, ±10°),
  brightness/contrast ±0.1;
* ``strong`` — light + scale/crop (affine 0.75–1.33, crop-or-pad ±10 % resized back to the same size), CLAHE,
  gamma 0.8–1.25, Gaussian noise (σ 1–5 % of range), Gaussian blur, elastic deformation.

Geometry is applied identically to image and mask; masks use nearest-neighbour interpolation and constant 0
fill, so they stay binary and aligned. Intensity transforms touch only the image; outputs stay float32 and are
clipped to [0, 1]. CLAHE runs on float32 input: albumentations converts to uint8 internally (the cache is
8-bit anyway, so nothing is lost). Every transform is built with ``strict=True`` so a misspelt or dropped
argument is an error, not a warning (RandomRotate90 has no ``strict`` option but rejects unknown arguments
anyway). ``seed`` makes the pipeline deterministic (``Compose(seed=...)``); callers that need a per-sample
stream call ``compose.set_random_seed(s)`` before each call.
"""

from __future__ import annotations

from typing import Literal

import albumentations as A
import cv2

Strength = Literal["none", "light", "strong"]


def _t(cls: type, **kw: object) -> A.BasicTransform:
    """``cls(**kw, strict=True)``; RandomRotate90 has no such option but rejects unknown args anyway."""
    try:
        return cls(**kw, strict=True)
    except TypeError as e:
        if "strict" not in str(e):
            raise
        return cls(**kw)


_GEOM = {
    "border_mode": cv2.BORDER_CONSTANT,
    "fill": 0,
    "fill_mask": 0,
    "mask_interpolation": cv2.INTER_NEAREST,
}


def _light() -> list[A.BasicTransform]:
    return [
        _t(A.HorizontalFlip, p=0.5),
        _t(A.VerticalFlip, p=0.5),
        _t(A.RandomRotate90, p=0.5),
        _t(A.Affine, scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10), p=0.5, **_GEOM),
        _t(A.RandomBrightnessContrast, brightness_limit=0.1, contrast_limit=0.1, p=0.5),
    ]


def _strong() -> list[A.BasicTransform]:
    return _light() + [
        _t(A.Affine, scale=(0.75, 1.33), p=0.3, **_GEOM),
        _t(
            A.CropAndPad,
            percent=(-0.1, 0.1),
            keep_size=True,
            p=0.3,
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=0,
            mask_interpolation=cv2.INTER_NEAREST,
        ),
        _t(A.CLAHE, clip_limit=(1.0, 3.0), tile_grid_size=(8, 8), p=0.2),
        _t(A.RandomGamma, gamma_limit=(80, 125), p=0.3),
        _t(A.GaussNoise, std_range=(0.01, 0.05), p=0.2),
        _t(A.GaussianBlur, blur_limit=(3, 5), p=0.2),
        _t(
            A.ElasticTransform,
            alpha=30.0,
            sigma=6.0,
            p=0.2,
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=0,
            mask_interpolation=cv2.INTER_NEAREST,
        ),
    ]


def build_augment(strength: Strength = "light", seed: int | None = None) -> A.Compose:
    """An ``A.Compose`` for ``compose(image=float32 (H,W,3) in [0,1], mask=uint8 (H,W) {0,1})``.

    Returns ``{"image": float32 (H, W, 3) in [0, 1], "mask": uint8 (H, W) in {0, 1}}``; same size for square
    inputs (rot90 swaps H and W of a non-square image — the training dataset augments after resizing to S×S).
    """
    if strength == "none":
        ts: list[A.BasicTransform] = []
    elif strength == "light":
        ts = _light()
    elif strength == "strong":
        ts = _strong()
    else:
        raise ValueError(f"augment strength must be none|light|strong, got {strength!r}")
    return A.Compose(ts, seed=seed)
