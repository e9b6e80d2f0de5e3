"""DICOM decoding (pydicom 3): modality LUT → window → uint8, MONOCHROME1 inversion, multi-frame, DICOM-SEG.

Pixel pipeline for grey images, per frame::

    stored values --apply_modality_lut--> HU / physical units (float32)
      --window--> uint8: header WindowCenter/Width (first value, DICOM linear formula),
                 else a VOI LUT sequence (apply_voi_lut, then min-max),
                 else a modality default (CT: soft tissue W400/L40),
                 else the 0.5–99.5 percentile range of the frame
      --MONOCHROME1--> 255 - value (so that bright = dense for every image)

Colour images (RGB / YBR, decoded to RGB by pydicom) are kept as uint8 RGB. JPEG 2000 decodes via Pillow's
OpenJPEG; a transfer syntax no installed plugin can decode → ``unsupported_transfer_syntax``.

DICOM-SEG (Modality SEG): each frame is matched to its source image through
``PerFrameFunctionalGroupsSequence[i].DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID``
(and its ``ReferencedFrameNumber`` when the source is multi-frame; falling back to ``ReferencedSeriesSequence``
for single-frame SEGs of a single image) and carries a ``ReferencedSegmentNumber``; :func:`read_seg_frames`
returns {(source SOPInstanceUID, source frame or None, segment number): mask}.
No header value other than :data:`medsam2.data.deid.SAFE_DICOM_FIELDS` leaves this module (see deid.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medsam2.data.deid import phi_values, scrub
from medsam2.data.readers import QuarantineError, apply_window, binarise_mask, check_size, percentile_window

#: Default windows (low, high) when a header gives none: CT soft tissue W400 / L40.
DEFAULT_WINDOWS = {"CT": (40 - 200, 40 + 200)}

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def read_header(path: Path) -> Any:
    """Header only (``stop_before_pixels``); non-DICOM or unreadable → ``corrupt``."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as e:
        raise QuarantineError("corrupt", f"not a DICOM file: {str(e)[:120]}") from None
    except Exception as e:
        raise QuarantineError("corrupt", f"DICOM header: {type(e).__name__}") from None


def is_seg(ds: Any) -> bool:
    return str(ds.get("Modality", "")) == "SEG" or str(ds.get("SOPClassUID", "")) == SEG_SOP_CLASS


def modality_of(ds: Any) -> str:
    """Modality for the manifest; a breast radiograph stored as RG/CR/DX/OT secondary capture counts as MG."""
    m = str(ds.get("Modality", "") or "OT").upper()
    if m in ("RG", "CR", "DX", "OT") and str(ds.get("BodyPartExamined", "")).upper() == "BREAST":
        return "MG"
    return m


def _pixels(path: Path, *, image: bool = False) -> tuple[Any, np.ndarray, list[str]]:
    """Full dataset + pixel array (frames first when multi-frame); all failures become QuarantineError.
    ``image``: the caller wants an image, so a DICOM-SEG object is rejected (``seg_not_image``) before decoding."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as e:
        raise QuarantineError("corrupt", f"DICOM: {type(e).__name__}") from None
    phi = phi_values(ds)
    if len(ds) == 0:
        raise QuarantineError("corrupt", "DICOM preamble but no parseable data elements")
    if image and is_seg(ds):
        raise QuarantineError("seg_not_image", f"{Path(path).name} is a DICOM-SEG object (SOPClassUID "
                              f"{SEG_SOP_CLASS}): a segmentation, not an image; give the image it segments")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise QuarantineError("no_pixel_data", "DICOM object has no pixel data")
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        raise QuarantineError("burned_in_phi", "BurnedInAnnotation = YES: pixels may show identifying text")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception:
        raise QuarantineError("corrupt", "missing or invalid Rows/Columns/NumberOfFrames") from None
    check_size(cols, rows, frames)
    try:
        arr = ds.pixel_array
    except NotImplementedError as e:
        raise QuarantineError("unsupported_transfer_syntax", scrub(str(e), phi)[:200]) from None
    except RuntimeError as e:
        msg = scrub(str(e), phi)
        reason = "unsupported_transfer_syntax" if ("plugin" in msg or "decod" in msg.lower()) else "corrupt"
        raise QuarantineError(reason, msg[:200]) from None
    except Exception as e:
        msg = scrub(str(e), phi)
        short = ("shorter", "truncat", "EOF", "less than expected")
        reason = "truncated" if any(s in msg for s in short) else "corrupt"
        raise QuarantineError(reason, f"{type(e).__name__}: {msg[:160]}") from None
    return ds, arr, phi


def _first(v: Any) -> float | None:
    if v is None or v == "":
        return None
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return float(v[0]) if len(v) else None
    return float(v)


def window_of(ds: Any, modality: str) -> tuple[float, float] | None:
    """(low, high) from the header window (first of several) or the modality default; None = use
    percentiles."""
    c, w = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if c is not None and w is not None and w >= 1:
        # DICOM linear VOI: x <= c - 0.5 - (w-1)/2 → min, x > c - 0.5 + (w-1)/2 → max
        return c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    return DEFAULT_WINDOWS.get(modality)


def decode_image(path: Path) -> tuple[list[np.ndarray], dict[str, Any], Any]:
    """DICOM image → (frames as uint8 (H, W, 3) RGB, safe meta additions, header without pixels).

    Multi-frame objects give one array per frame.

    Raises:
        QuarantineError: ``seg_not_image`` for a DICOM-SEG object (Modality SEG or SOPClassUID
            :data:`SEG_SOP_CLASS`: a mask, read with :func:`read_seg_frames`), or any reason of an unreadable file.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds, arr, phi = _pixels(path, image=True)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    modality = modality_of(ds)
    if frames == 1:
        arr = arr[None]
    out: list[np.ndarray] = []
    used: dict[str, Any] = {}
    try:
        for f in arr:
            if spp == 3:
                u8 = f if f.dtype == np.uint8 else apply_window(f, *percentile_window(f))
                out.append(np.ascontiguousarray(u8[:, :, :3]))
                continue
            hu = apply_modality_lut(f, ds).astype(np.float32)
            win = window_of(ds, modality)
            if win is None and "VOILUTSequence" in ds:
                v = apply_voi_lut(hu, ds).astype(np.float32)
                win, hu = (float(v.min()), float(v.max())), v
                used["window_source"] = "voi_lut"
            if win is None:
                win = percentile_window(hu)
                used["window_source"] = "percentile"
            else:
                used.setdefault("window_source", "header" if ds.get("WindowWidth") else "modality_default")
            used["window"] = [round(win[0], 3), round(win[1], 3)]
            u8 = apply_window(hu, *win)
            if photometric == "MONOCHROME1":
                u8 = 255 - u8
            out.append(np.ascontiguousarray(np.repeat(u8[:, :, None], 3, axis=2)))
    except QuarantineError:
        raise
    except Exception as e:
        raise QuarantineError(
            "corrupt", f"pixel transform: {type(e).__name__}: {scrub(str(e), phi)[:120]}"
        ) from None
    del ds.PixelData
    return out, used, ds


def _ref_source(item: Any) -> tuple[str | None, int | None]:
    """(ReferencedSOPInstanceUID, ReferencedFrameNumber or None) of a SEG frame's first source image."""
    from pydicom.multival import MultiValue

    try:
        src = item.DerivationImageSequence[0].SourceImageSequence[0]
    except (AttributeError, IndexError, KeyError):
        return None, None
    uid = str(src.get("ReferencedSOPInstanceUID", "") or "") or None
    ref = src.get("ReferencedFrameNumber")
    if ref is None or ref == "":
        return uid, None
    try:
        return uid, int(ref[0] if isinstance(ref, MultiValue) else ref)  # a SEG frame maps to one source frame
    except (TypeError, ValueError, IndexError):
        return uid, None


def read_seg_frames(path: Path) -> tuple[dict[tuple[str, int | None, int], np.ndarray], dict[int, str]]:
    """DICOM-SEG → ({(source SOPInstanceUID, source frame number or None, segment number): uint8 (H, W) {0,1}},
    {segment number: label}).

    The frame number (1-based ``ReferencedFrameNumber``) is set when the SEG frame references one frame of a
    multi-frame source image, else None. Frames of the same key are OR-ed. FRACTIONAL segmentations are
    thresholded at half of ``MaximumFractionalValue``. Frames without a resolvable source reference →
    ``mask_without_image``.
    """
    ds, arr, phi = _pixels(path)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if n == 1 and arr.ndim == 2:
        arr = arr[None]
    labels = {
        int(s.SegmentNumber): str(s.get("SegmentLabel", f"segment_{s.SegmentNumber}"))
        for s in ds.get("SegmentSequence", [])
    }
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", [])
    fallback = None
    try:
        insts = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence
        if len(insts) == 1:
            fallback = str(insts[0].ReferencedSOPInstanceUID)
    except (AttributeError, IndexError, KeyError):
        pass
    frac = str(ds.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL"
    maxv = float(ds.get("MaximumFractionalValue", 255) or 255)
    out: dict[tuple[str, int | None, int], np.ndarray] = {}
    for i in range(arr.shape[0]):
        item = per_frame[i] if i < len(per_frame) else None
        uid, frame = _ref_source(item) if item is not None else (None, None)
        uid = uid or fallback
        try:
            seg_no = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber) if item else 1
        except (AttributeError, IndexError, KeyError):
            seg_no = 1
        if uid is None:
            raise QuarantineError("mask_without_image", f"SEG frame {i} has no source image reference")
        if frac:
            m = (arr[i] > maxv / 2).astype(np.uint8)
        else:
            m, _ = binarise_mask(arr[i])
        key = (uid, frame, seg_no)
        out[key] = m if key not in out else np.maximum(out[key], m)
    return out, labels
