"""Decoders for PNG/JPEG/TIFF/BMP, NPY, NIfTI and DICOM, and the one-time normalisation to uint8 RGB.

Every reader raises :class:`QuarantineError` (a short snake_case ``reason`` + a ``detail``) for inputs that
must be rejected; any other exception is a bug. Sizes are checked from headers *before* decoding, so a
decompression bomb never allocates its pixels (:data:`MAX_SIDE`, :data:`MAX_PIXELS`).

Output conventions:

* image → ``uint8 (H, W, 3)`` RGB, values 0–255; grey is replicated to 3 channels. Windowing happens here
  once: uint8 sources are kept as is; other dtypes use a window (DICOM header window, or a modality default,
  e.g. CT soft tissue W400/L40) or the 0.5–99.5 percentile range of the image/volume.
* mask → ``uint8 (H, W)`` in {0, 1} via :func:`binarise_mask` (rules in its docstring).
"""

from __future__ import annotations

import warnings
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

MAX_SIDE = 20_000
MAX_PIXELS = 250_000_000
MIN_SIDE = 8

RASTER_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NPY_EXT = (".npy",)
NIFTI_EXT = (".nii", ".nii.gz")
DICOM_EXT = (".dcm", ".dicom")


class QuarantineError(Exception):
    """An input that must go to the quarantine table with ``reason`` (snake_case) and a human ``detail``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def ext_of(name: str) -> str:
    n = name.lower()
    return ".nii.gz" if n.endswith(".nii.gz") else Path(n).suffix


KNOWN_EXT = RASTER_EXT + NPY_EXT + NIFTI_EXT + DICOM_EXT


def stem_of(name: str) -> str:
    """File name without a *known* image extension (``a.nii.gz`` → ``a``; ``CT.1.2.840`` stays whole)."""
    n = PurePosixPath(name).name
    e = ext_of(n)
    return n[: -len(e)] if e in KNOWN_EXT or (e and not e[1:].isdigit() and len(e) <= 5) else n


def sniff_kind(path: Path) -> str:
    """``raster|npy|nifti|dicom|unknown`` from the extension, falling back to magic bytes (DICM, PNG,
    JPEG)."""
    e = ext_of(path.name)
    if e in RASTER_EXT:
        return "raster"
    if e in NPY_EXT:
        return "npy"
    if e in NIFTI_EXT:
        return "nifti"
    if e in DICOM_EXT:
        return "dicom"
    if (
        e and not e[1:].replace(".", "").isdigit()
    ):  # a real unknown extension (UID-like names have digit "exts")
        return "unknown"
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return "unknown"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8\xff"):
        return "raster"
    return "unknown"


def check_size(width: int, height: int, frames: int = 1) -> None:
    """Reject absurd (decompression-bomb) or degenerate sizes from header values, before any decoding."""
    if width > MAX_SIDE or height > MAX_SIDE or width * height * max(frames, 1) > MAX_PIXELS:
        raise QuarantineError(
            "too_large", f"{width}x{height}x{frames} exceeds {MAX_SIDE} px/side or {MAX_PIXELS:.2g} px"
        )
    if width < MIN_SIDE or height < MIN_SIDE:
        raise QuarantineError("too_small", f"{width}x{height} is below {MIN_SIDE} px")


# -----------------------------------------------------------------------------------------------------
# rasters
def _pil_error(e: Exception) -> QuarantineError:
    msg = str(e)
    if "truncated" in msg.lower() or isinstance(e, EOFError):
        return QuarantineError("truncated", msg[:200])
    return QuarantineError("corrupt", f"{type(e).__name__}: {msg[:200]}")


def read_raster(path: Path, *, as_mask: bool = False) -> np.ndarray:
    """PNG/JPEG/BMP (Pillow) or TIFF (tifffile: handles RGB declared MinIsBlack, which Pillow refuses).

    Returns the native array: (H, W) or (H, W, C), dtype uint8/uint16/int32/float32. Palette images become RGB
    unless ``as_mask`` (then the palette indices are kept: they are labels).
    """
    if ext_of(path.name) in (".tif", ".tiff"):
        return _read_tiff(path)
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
            check_size(*im.size)
            im.load()
    except QuarantineError:
        raise
    except Image.DecompressionBombError as e:
        raise QuarantineError("too_large", str(e)[:200]) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise _pil_error(e) from None
    if im.mode == "P" and not as_mask:
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    elif im.mode == "1":
        im = im.convert("L")
    arr = np.asarray(im)
    if arr.ndim == 3 and arr.shape[2] in (2, 4):  # drop alpha
        arr = arr[..., :-1] if arr.shape[2] == 4 else arr[..., 0]
    return arr


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            if not tf.pages:
                raise QuarantineError("corrupt", "TIFF without pages")
            page = tf.pages[0]
            shape = page.shape
            h, w = (shape[0], shape[1]) if len(shape) >= 2 else (0, 0)
            if len(shape) == 3 and shape[0] in (3, 4) and shape[2] not in (1, 3, 4):  # planar (C, H, W)
                h, w = shape[1], shape[2]
            check_size(w, h)
            arr = page.asarray()
    except QuarantineError:
        raise
    except Exception as e:  # tifffile raises many types for broken files
        msg = str(e)
        reason = "truncated" if ("truncat" in msg.lower() or "eof" in msg.lower()) else "corrupt"
        raise QuarantineError(reason, f"TIFF: {type(e).__name__}: {msg[:160]}") from None
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    return arr


def raster_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header only."""
    if ext_of(path.name) in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tf:
            s = tf.pages[0].shape
            return int(s[1]), int(s[0])
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(path) as im:
            return im.size


# ----------------------------------------------------------------------------------------------------------
# NPY
def read_npy(path: Path) -> np.ndarray:
    """2D (H, W) or (H, W, C≤4) array; shape and dtype are checked from the header before reading data."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read_header = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
            shape, _, dtype = read_header(f)  # header only, no data
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise QuarantineError("corrupt", f"NPY header: {str(e)[:160]}") from None
    if dtype.hasobject:
        raise QuarantineError("unsupported_dtype", "object/pickled arrays are not read")
    if len(shape) in (2, 3) and 0 not in shape:
        check_size(int(shape[1]), int(shape[0]))
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        msg = str(e)
        reason = "truncated" if "mmap length" in msg or "size" in msg else "corrupt"
        raise QuarantineError(reason, f"NPY: {msg[:160]}") from None
    except (OSError, EOFError) as e:
        raise QuarantineError("corrupt", f"NPY: {type(e).__name__}: {str(e)[:160]}") from None
    if arr.dtype.kind not in "biuf":
        raise QuarantineError("unsupported_dtype", f"dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise QuarantineError("wrong_ndim", f"shape {tuple(arr.shape)}; want (H, W) or (H, W, 3)")
    h, w = arr.shape[:2]
    if h == 0 or w == 0:
        raise QuarantineError("empty_image", f"shape {tuple(arr.shape)}")
    check_size(w, h)
    try:
        out = np.array(arr)  # materialise (raises on truncated data)
    except (ValueError, OSError) as e:
        raise QuarantineError("truncated", f"NPY data shorter than header: {str(e)[:120]}") from None
    if out.dtype.kind == "f" and not np.isfinite(out).all():
        raise QuarantineError("nan_inf", "array contains NaN or inf")
    return out[..., :3] if out.ndim == 3 else out


# -------------------------------------------------------------------------------------------------- windowing
def percentile_window(arr: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> tuple[float, float]:
    """(low, high) intensity bounds from percentiles of ``arr`` (NaN-free)."""
    a = arr if arr.size <= 4_000_000 else arr.reshape(-1)[:: max(1, arr.size // 4_000_000)]
    low, high = np.percentile(a, [lo, hi])
    if high <= low:
        low, high = float(a.min()), float(a.max())
    return float(low), float(high)


def apply_window(arr: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map [low, high] → [0, 255], clipped, uint8."""
    if high <= low:
        return np.zeros(arr.shape, np.uint8)
    out = (arr.astype(np.float32) - low) * (255.0 / (high - low))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def to_uint8(arr: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """uint8 stays; bool → {0,255}; other dtypes → ``window`` or the percentile window of ``arr``."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise QuarantineError("nan_inf", "image contains NaN or inf")
    low, high = window if window is not None else percentile_window(arr)
    return apply_window(arr, low, high)


def to_rgb(u8: np.ndarray) -> np.ndarray:
    """(H, W) / (H, W, 1) / (H, W, 3) / (H, W, 4) uint8 → contiguous (H, W, 3) uint8."""
    if u8.ndim == 2:
        return np.ascontiguousarray(np.repeat(u8[:, :, None], 3, axis=2))
    if u8.ndim == 3 and u8.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(u8, 3, axis=2))
    if u8.ndim == 3 and u8.shape[2] in (3, 4):
        return np.ascontiguousarray(u8[:, :, :3])
    raise QuarantineError("wrong_ndim", f"image shape {tuple(u8.shape)}")


def binarise_mask(arr: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Native mask array → (uint8 (H, W) in {0, 1}, flags).

    Rules: colour masks are reduced with a max over channels. ``{0, 1}`` / bool → as is. Otherwise the full
    scale is 255 (values ≤ 255) or the dtype max, and ``mask = value > scale / 2`` (the ``> 127`` rule for
    JPEG masks). A mask whose values are neither near 0 nor near full scale (between 12.5 % and 87.5 % of it)
    on more than 2 % of its pixels is not a binary mask (a probability map, a photo, a multi-label map) →
    ``non_binary_mask``; so is a small-integer map with more than two values (e.g. {0, 1, 2}: multi-label).
    When thresholding changed any value (JPEG ringing, stray low values), the row gets the flag ``binarised``.
    """
    flags: list[str] = []
    if arr.ndim == 3:  # max over channels (pairwise: much faster than a reduction over the last axis)
        red = arr[..., 0]
        for c in range(1, arr.shape[2]):
            red = np.maximum(red, arr[..., c])
        arr = red
    if arr.ndim != 2:
        raise QuarantineError("wrong_ndim", f"mask shape {tuple(arr.shape)}")
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8), flags
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise QuarantineError("nan_inf", "mask contains NaN or inf")
    mx = float(arr.max()) if arr.size else 0.0
    if mx <= 1.0:
        if arr.dtype.kind == "f":
            mid = np.count_nonzero((arr > 0.125) & (arr < 0.875)) / arr.size
            if mid > 0.02:
                raise QuarantineError("non_binary_mask", f"{mid:.1%} of pixels are fractional (0.125–0.875)")
            m = arr > 0.5
            if np.count_nonzero((arr != 0) & (arr != 1)):
                flags.append("binarised")
            return m.astype(np.uint8), flags
        return (arr > 0).astype(np.uint8), flags
    if mx < 32 and arr.dtype.kind in "iu":
        vals = np.unique(arr)
        if len(vals) > 2:
            raise QuarantineError("non_binary_mask", f"values {vals[:8].tolist()}: looks multi-label")
        return (arr > 0).astype(np.uint8), flags
    full = 255.0 if mx <= 255 else (float(np.iinfo(arr.dtype).max) if arr.dtype.kind in "iu" else mx)
    mid = np.count_nonzero((arr > 0.125 * full) & (arr < 0.875 * full)) / arr.size
    if mid > 0.02:
        raise QuarantineError("non_binary_mask", f"{mid:.1%} of pixels are mid-grey (not near 0 or {full:g})")
    m = arr > full / 2
    if np.count_nonzero((arr != 0) & (arr != full)):
        flags.append("binarised")
    return m.astype(np.uint8), flags


def mask_box(mask: np.ndarray) -> list[int] | None:
    """Tight box ``[x0, y0, x1, y1]`` (x1/y1 exclusive) of the foreground of a (H, W) mask, or None if
    empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    if ys.size == 0:
        return None
    xs = np.flatnonzero(mask.any(axis=0))
    return [int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1]


# -------------------------------------------------------------------------------------------------------
# NIfTI
def read_nifti(path: Path) -> tuple[Any, tuple[int, ...]]:
    """(nibabel image reoriented to RAS+ canonical, shape) — header checks only, data not yet read.

    A 4D volume with a singleton 4th axis is accepted; other 4D+ or <2D volumes → ``wrong_ndim``.
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
    except Exception as e:  # nibabel raises ImageFileError, EOFError, zlib/gzip errors ...
        raise QuarantineError("corrupt", f"NIfTI: {type(e).__name__}: {str(e)[:160]}") from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) not in (2, 3):
        raise QuarantineError("wrong_ndim", f"NIfTI shape {shape}; want 2D or 3D")
    if len(shape) == 3:
        check_size(shape[0], shape[1], shape[2])
    else:
        check_size(shape[0], shape[1])
    if 0 in shape:
        raise QuarantineError("empty_image", f"NIfTI shape {shape}")
    try:
        img = nib.as_closest_canonical(img)
    except Exception:  # non-invertible affine: keep voxel order
        pass
    return img, shape


def nifti_array(img: Any) -> np.ndarray:
    """Voxel data (X, Y, Z) as float32 (images) or native integer (labels); 2D volumes get Z = 1."""
    try:
        arr = np.asanyarray(img.dataobj)
    except Exception as e:
        raise QuarantineError("truncated", f"NIfTI data: {type(e).__name__}: {str(e)[:160]}") from None
    if arr.ndim == 4:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise QuarantineError("nan_inf", "volume contains NaN or inf")
    return arr


def nifti_slice(vol: np.ndarray, z: int) -> np.ndarray:
    """Axial slice z of a RAS+ volume in display orientation: (H=Y reversed, W=X), anterior up."""
    return np.ascontiguousarray(np.rot90(vol[:, :, z]))
