"""One image file of any supported kind → the RGB array the model sees (serving and prediction), above both the
raster/NIfTI readers and the DICOM decoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsam2.data.dicom import decode_image
from medsam2.data.readers import (
    QuarantineError,
    apply_window,
    nifti_array,
    nifti_slice,
    percentile_window,
    read_nifti,
    read_npy,
    read_raster,
    sniff_kind,
    to_rgb,
    to_uint8,
)


def read_image_any(path: str | Path) -> np.ndarray:
    """Any supported file → uint8 (H, W, 3) RGB, windowed exactly as ingest does (for serving / prediction).

    DICOM: first frame; NIfTI: middle axial slice; raster/NPY: the image. Raises QuarantineError if
    unreadable.
    """
    path = Path(path)
    kind = sniff_kind(path)
    if kind == "dicom":
        return decode_image(path)[0][0]
    if kind == "nifti":
        img, _ = read_nifti(path)
        vol = nifti_array(img).astype(np.float32)
        return to_rgb(apply_window(nifti_slice(vol, vol.shape[2] // 2), *percentile_window(vol)))
    if kind == "npy":
        arr = read_npy(path)
    elif kind == "raster":
        arr = read_raster(path)
    else:
        raise QuarantineError("unsupported_format", f"cannot read {path.name}")
    return to_rgb(to_uint8(arr[..., :3] if arr.ndim == 3 else arr))
