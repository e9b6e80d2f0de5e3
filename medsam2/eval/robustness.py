"""Corruption suite for robustness evaluation: image corruptions and prompt corruptions at severities 0..5.

Severity 0 is the identity (a copy); 1..5 grow in strength (parameters in ``_SEVERITY`` below, chosen so
severity 3 is a realistic but clearly visible degradation). Everything is deterministic given ``seed``; the
same seed gives the same noise pattern at every severity, so severity curves differ only in strength.

Image corruptions take and return uint8 images, (H, W, 3) RGB or (H, W) grey:

- ``gaussian_noise``: additive N(0, σ) noise, σ as a fraction of 255.
- ``blur``: Gaussian blur, σ as a fraction of the image's short side (resolution independent).
- ``low_contrast``: pixel values pulled towards the image mean, ``mean + c (x - mean)``.
- ``jpeg``: JPEG re-encoding at a falling quality (Pillow, 4:2:0 chroma subsampling).
- ``brightness``: a constant added to every pixel, as a fraction of 255 (then clipped).

Prompt corruptions (``image_size = (H, W)`` is needed to clip to the image):

- ``box_jitter``: each box coordinate moved by U(-f, f) × the box's side (width for x, height for y).
- ``box_scale``: the box enlarged about its centre by a factor (a loose box, as from a hasty annotator).
- ``point_shift``: each (x, y) point moved by ``r`` × the image's short side in a random direction.

Boxes are ``(x0, y0, x1, y1)`` pixels with exclusive end (see :mod:`medsam2.eval.baselines`); corrupted boxes
are float, clipped to ``[0, W] × [0, H]`` and at least one pixel wide and high. Points are (N, 2) float
``(x, y)`` pixel coordinates, clipped to ``[0, W-1] × [0, H-1]``.

Use :func:`apply_corruption`; ``CORRUPTIONS`` maps each name to its function
``fn(value, severity: int, rng: np.random.Generator, image_size: (H, W)) -> value`` (severity ≥ 1).
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from medsam2.registry import Registry

CORRUPTIONS: Registry = Registry("corruption")
IMAGE_CORRUPTIONS: tuple[str, ...] = ("gaussian_noise", "blur", "low_contrast", "jpeg", "brightness")
PROMPT_CORRUPTIONS: tuple[str, ...] = ("box_jitter", "box_scale", "point_shift")
MAX_SEVERITY = 5

# Parameter per severity 1..5 (index 0 unused = identity).
_SEVERITY: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.0, 0.02, 0.04, 0.06, 0.09, 0.12),  # σ / 255
    "blur": (0.0, 0.002, 0.004, 0.006, 0.009, 0.012),  # σ / short side (512 px → 1, 2, 3, 4.6, 6 px)
    "low_contrast": (1.0, 0.8, 0.65, 0.5, 0.35, 0.2),  # contrast factor c
    "jpeg": (100, 80, 60, 40, 25, 10),  # JPEG quality
    "brightness": (0.0, 0.06, 0.12, 0.18, 0.24, 0.3),  # offset / 255
    "box_jitter": (0.0, 0.05, 0.1, 0.15, 0.2, 0.3),  # f, fraction of the box side
    "box_scale": (1.0, 1.1, 1.2, 1.3, 1.45, 1.6),  # side scale factor
    "point_shift": (0.0, 0.01, 0.02, 0.04, 0.06, 0.08),  # r, fraction of the short side
}
_TARGET: dict[str, str] = {
    **dict.fromkeys(IMAGE_CORRUPTIONS, "image"),
    "box_jitter": "box",
    "box_scale": "box",
    "point_shift": "points",
}


class Corrupted(NamedTuple):
    """Result of :func:`apply_corruption`: the targeted input corrupted, the others passed through."""

    image: np.ndarray | None
    box: np.ndarray | None
    points: np.ndarray | None


def corruption_target(name: str) -> str:
    """``"image"``, ``"box"`` or ``"points"``: which input the corruption ``name`` changes."""
    CORRUPTIONS.get(name)  # raises a clear KeyError for unknown names
    return _TARGET[name]


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


@CORRUPTIONS.register("gaussian_noise")
def gaussian_noise(image: np.ndarray, severity: int, rng: np.random.Generator, image_size=None) -> np.ndarray:
    sigma = _SEVERITY["gaussian_noise"][severity] * 255.0
    return _to_uint8(image.astype(np.float32) + rng.standard_normal(image.shape, dtype=np.float32) * sigma)


@CORRUPTIONS.register("blur")
def blur(image: np.ndarray, severity: int, rng: np.random.Generator, image_size=None) -> np.ndarray:
    sigma = _SEVERITY["blur"][severity] * min(image.shape[:2])
    sigmas = (sigma, sigma) + (0.0,) * (image.ndim - 2)
    return _to_uint8(ndimage.gaussian_filter(image.astype(np.float32), sigma=sigmas, mode="reflect"))


@CORRUPTIONS.register("low_contrast")
def low_contrast(image: np.ndarray, severity: int, rng: np.random.Generator, image_size=None) -> np.ndarray:
    c = _SEVERITY["low_contrast"][severity]
    x = image.astype(np.float32)
    mean = x.mean(axis=(0, 1), keepdims=True)
    return _to_uint8(mean + c * (x - mean))


@CORRUPTIONS.register("jpeg")
def jpeg(image: np.ndarray, severity: int, rng: np.random.Generator, image_size=None) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(_SEVERITY["jpeg"][severity]))
    buf.seek(0)
    out = np.asarray(Image.open(buf).convert("RGB" if image.ndim == 3 else "L"))
    return out.copy()


@CORRUPTIONS.register("brightness")
def brightness(image: np.ndarray, severity: int, rng: np.random.Generator, image_size=None) -> np.ndarray:
    return _to_uint8(image.astype(np.float32) + _SEVERITY["brightness"][severity] * 255.0)


def _clip_box(box: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    h, w = image_size
    x0, y0, x1, y1 = box
    x0, x1 = np.clip([x0, x1], 0, w)
    y0, y1 = np.clip([y0, y1], 0, h)
    # Keep at least one pixel, inside the image.
    x0, y0 = min(x0, w - 1.0), min(y0, h - 1.0)
    x1, y1 = max(x1, x0 + 1.0), max(y1, y0 + 1.0)
    return np.array([x0, y0, x1, y1], dtype=np.float64)


@CORRUPTIONS.register("box_jitter")
def box_jitter(box: np.ndarray, severity: int, rng: np.random.Generator, image_size) -> np.ndarray:
    f = _SEVERITY["box_jitter"][severity]
    bw, bh = box[2] - box[0], box[3] - box[1]
    shift = rng.uniform(-f, f, size=4) * np.array([bw, bh, bw, bh])
    return _clip_box(box + shift, image_size)


@CORRUPTIONS.register("box_scale")
def box_scale(box: np.ndarray, severity: int, rng: np.random.Generator, image_size) -> np.ndarray:
    s = _SEVERITY["box_scale"][severity]
    cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
    hw, hh = s * (box[2] - box[0]) / 2.0, s * (box[3] - box[1]) / 2.0
    return _clip_box(np.array([cx - hw, cy - hh, cx + hw, cy + hh]), image_size)


@CORRUPTIONS.register("point_shift")
def point_shift(points: np.ndarray, severity: int, rng: np.random.Generator, image_size) -> np.ndarray:
    h, w = image_size
    r = _SEVERITY["point_shift"][severity] * min(h, w)
    angle = rng.uniform(0.0, 2.0 * np.pi, size=len(points))
    moved = points + r * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return np.stack([np.clip(moved[:, 0], 0, w - 1), np.clip(moved[:, 1], 0, h - 1)], axis=1)


def apply_corruption(
    name: str,
    *,
    image: np.ndarray | None = None,
    box: Sequence[float] | np.ndarray | None = None,
    points: np.ndarray | None = None,
    severity: int,
    seed: int = 0,
    image_size: tuple[int, int] | None = None,
) -> Corrupted:
    """Apply corruption ``name`` at ``severity`` to the input it targets; pass the others through.

    Args:
        name: one of ``CORRUPTIONS.names()`` (image: ``IMAGE_CORRUPTIONS``, prompt: ``PROMPT_CORRUPTIONS``).
        image: uint8 (H, W, 3) RGB or (H, W) grey. Required for image corruptions.
        box: ``(x0, y0, x1, y1)`` pixels, exclusive end. Required for ``box_*``.
        points: (N, 2) ``(x, y)`` pixel coordinates. Required for ``point_shift``.
        severity: 0 (identity) to 5.
        seed: seed of the corruption's randomness (noise, jitter, shift directions).
        image_size: (H, W) for clipping prompts; taken from ``image`` when omitted.

    Returns:
        ``Corrupted(image, box, points)``: the target corrupted (image uint8 of the same shape; box float64
        (4,); points float64 (N, 2)), the other fields as given (None where not given). Severity 0 returns
        copies.

    Example::

        out = apply_corruption("blur", image=img, box=box, severity=3)
        pred = model(out.image, out.box)
    """
    target = corruption_target(name)
    fn = CORRUPTIONS.get(name)
    if not (isinstance(severity, int | np.integer) and 0 <= severity <= MAX_SEVERITY):
        raise ValueError(f"severity must be an int in 0..{MAX_SEVERITY}, got {severity!r}")
    img = None if image is None else np.asarray(image)
    if img is not None and (img.dtype != np.uint8 or img.shape[2:] not in ((), (3,))):
        raise ValueError(f"image must be uint8 (H, W, 3) or (H, W); got {img.dtype} {img.shape}")
    bx = None if box is None else np.asarray(box, dtype=np.float64).reshape(-1)
    if bx is not None and bx.shape != (4,):
        raise ValueError(f"box must be (x0, y0, x1, y1), got {box!r}")
    pts = None if points is None else np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if image_size is None and img is not None:
        image_size = img.shape[:2]
    given = {"image": img, "box": bx, "points": pts}
    if given[target] is None:
        raise ValueError(f"corruption {name!r} changes the {target}; pass {target}=...")
    if target != "image" and image_size is None:
        raise ValueError(f"corruption {name!r} needs image_size=(H, W) (or image=...) to clip to the image")
    out = {k: (None if v is None else v.copy()) for k, v in given.items()}
    if severity > 0:
        out[target] = fn(given[target], int(severity), np.random.default_rng(seed), image_size)
    return Corrupted(**out)


def iter_conditions(
    names: Sequence[str] | None = None, severities: Sequence[int] = (1, 2, 3, 4, 5)
) -> Iterator[tuple[str, int]]:
    """``("clean", 0)`` then every ``(corruption, severity)``: the conditions of a robustness run."""
    yield "clean", 0
    for name in names if names is not None else CORRUPTIONS.names():
        CORRUPTIONS.get(name)
        for s in severities:
            yield name, int(s)


def severity_drop(df, metric: str = "dice", column: str | None = None) -> dict[tuple[str, int], float]:
    """Mean ``metric`` drop (clean − corrupted) for each (corruption, severity ≥ 1).

    Args:
        df: per-image results with columns ``severity``, ``metric`` and the corruption name in ``column``
            (default: ``corruption`` if present, else ``condition``, as in report tables).
        metric: metric column; for Dice a positive drop means worse under corruption.

    The clean reference of a corruption is its own severity-0 rows when it has any, otherwise the rows of
    condition ``"clean"`` (or every severity-0 row). NaNs are ignored.

    Returns:
        ``{(corruption, severity): mean(clean) - mean(corrupted)}``; NaN if there is no clean reference.
    """
    if column is None:
        column = "corruption" if "corruption" in df.columns else "condition"
    missing = [c for c in (column, "severity", metric) if c not in df.columns]
    if missing:
        raise KeyError(f"severity_drop needs columns {missing}; have {sorted(map(str, df.columns))}")
    sev = df["severity"].astype(int)
    clean_rows = df[df[column] == "clean"] if (df[column] == "clean").any() else df[sev == 0]
    global_clean = float(clean_rows[metric].mean()) if len(clean_rows) else float("nan")
    out: dict[tuple[str, int], float] = {}
    for name, group in df[df[column] != "clean"].groupby(column, sort=True):
        g_sev = group["severity"].astype(int)
        own_clean = group[g_sev == 0][metric]
        ref = float(own_clean.mean()) if len(own_clean) else global_clean
        for s, rows in group[g_sev > 0].groupby(g_sev[g_sev > 0], sort=True):
            out[(str(name), int(s))] = ref - float(rows[metric].mean())
    return out
