"""Decode one :class:`~medsam2.data.layouts.Unit` into manifest rows + cache files (runs in a worker or
inline).

A unit never raises: every :class:`~medsam2.data.readers.QuarantineError` becomes a reject ``(rel, reason,
detail)``; a row-level problem (e.g. one blank slice of a volume) rejects only that row. Cache files are
written atomically under ``workdir/cache`` as ``<image_id>.npy`` (uint8 (H, W, 3)) and ``<image_id>.mask.npy``
(uint8 (H, W) in {0, 1}). Bump :data:`INGEST_VERSION` when decoding changes, so every unit is re-decoded.
"""

from __future__ import annotations

import hashlib
import json
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from medsam2.data import dicom as dcm
from medsam2.data.deid import safe_dicom_meta
from medsam2.data.layouts import Unit
from medsam2.data.manifest import CACHE_DIR, atomic_save_npy
from medsam2.data.readers import (
    QuarantineError,
    apply_window,
    binarise_mask,
    mask_box,
    nifti_array,
    nifti_slice,
    percentile_window,
    read_nifti,
    read_npy,
    read_raster,
    stem_of,
    to_rgb,
    to_uint8,
)

INGEST_VERSION = "2"  # 2: DICOM source paths recorded as pseudonyms, stat cache keys hashed


@dataclass
class UnitOutput:
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[tuple[str, str, str]] = field(default_factory=list)  # (rel, reason, detail)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", s).strip("_.") or "x"


def dataset_prefix(dataset: str) -> str:
    """Cache-file / image_id prefix of a dataset (``kvasir-seg`` → ``kvasir-seg__``)."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", dataset) + "__"


def make_image_id(dataset: str, rel: str, frame: int = -1, target_key: str | None = None, *,
                  readable: bool = True) -> str:
    """Stable, file-name-safe id from dataset + relative source path (+ frame/slice) (+ mask/structure key).

    ``kvasir-seg__images_cju0qkwl35piu0993l0dewei2__3f2a9c01de``; the hash covers the full key, the readable
    part is truncated. ``readable=False`` (DICOM: PACS exports name folders after patients) replaces the path
    part by ``dcm`` so that no path text reaches ids, cache file names, reports or MLflow.
    """
    key = "\0".join([dataset, rel, str(frame), target_key or ""])
    h = hashlib.sha1(key.encode()).hexdigest()[:10]
    p = PurePosixPath(rel)
    parts = [_slug((p.parent / stem_of(p.name)).as_posix())[-48:] if readable else "dcm"]
    if frame >= 0:
        parts.append(f"f{frame:04d}")
    if target_key:
        parts.append(_slug(target_key.split("#")[-1] if "#" in target_key else target_key)[-32:])
    return dataset_prefix(dataset) + "_".join(parts) + "__" + h


def _sha_arr(a: np.ndarray) -> str:
    h = hashlib.sha256(str(a.shape).encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class _Ctx:
    def __init__(self, ctx: dict[str, Any]) -> None:
        self.workdir = Path(ctx["workdir"])
        self.dataset: str = ctx["dataset"]
        self.base_uri: str = ctx["base_uri"]
        self.refs: dict[str, str] = ctx.get("refs", {})  # rel -> the URI recorded (a pseudonym for DICOM)
        self.shas: dict[str, str] = ctx["shas"]
        self.now: str = ctx["now"]
        self.fingerprint: str = ctx["fingerprint"]

    def ref(self, rel: str) -> str:
        return self.refs.get(rel) or f"{self.base_uri.rstrip('/')}/{rel}"


def _mean_std(rgb: np.ndarray) -> tuple[float, float]:
    """Exact mean and std over all pixels and channels of uint8 (H, W, 3), scaled to [0, 1]."""
    import cv2

    m, sd = cv2.meanStdDev(rgb)
    m, var = m.ravel(), sd.ravel() ** 2
    mean = float(m.mean())
    return mean / 255.0, float(np.sqrt((var + (m - mean) ** 2).mean())) / 255.0


def _build_row(
    c: _Ctx,
    u: Unit,
    rgb: np.ndarray,
    mask: np.ndarray | None,
    *,
    rel: str,
    frame: int = -1,
    target: str | None = None,
    target_key: str | None = None,
    mask_rel: str | None = None,
    flags: list[str] | None = None,
    meta: dict[str, Any] | None = None,
    volume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One manifest row; ``volume``: the row's ``volume_id``, ``slice_index``, ``spacing_mm``, ``orientation``
    when it is a slice of a volume (see ``manifest.MANIFEST_COLUMNS``)."""
    flags = sorted(set(flags or []))
    h, w = rgb.shape[:2]
    mean, std = _mean_std(rgb)
    if std == 0.0:
        raise QuarantineError("blank_image", f"constant image (value {int(rgb[0, 0, 0])})")
    box = None
    if mask is not None:
        if mask.shape != (h, w):
            raise QuarantineError("size_mismatch", f"image {w}x{h} vs mask {mask.shape[1]}x{mask.shape[0]}")
        box = mask_box(mask)
        if box is None:
            flags.append("empty_mask")
        label_kind = "mask"
    elif u.box is not None:
        x0, y0, x1, y1 = u.box
        cb = [max(0, min(x0, w)), max(0, min(y0, h)), max(0, min(x1, w)), max(0, min(y1, h))]
        if cb != list(u.box):
            flags.append("box_clipped")
        if cb[2] <= cb[0] or cb[3] <= cb[1]:
            raise QuarantineError("invalid_box", f"box {u.box} is empty inside the {w}x{h} image")
        box, label_kind = cb, "box"
    else:
        label_kind = "none"
    image_id = make_image_id(c.dataset, rel, frame, target_key, readable=u.kind != "dicom")
    cache = c.workdir / CACHE_DIR
    atomic_save_npy(cache / f"{image_id}.npy", rgb, fsync=False)  # synced once before the manifest write
    mask_uri = None
    if mask is not None:
        atomic_save_npy(cache / f"{image_id}.mask.npy", mask, fsync=False)
        mask_uri = f"{CACHE_DIR}/{image_id}.mask.npy"
    return {
        "image_id": image_id,
        "dataset": c.dataset,
        "patient_id": u.patient_id,
        "modality": u.modality,
        "image_uri": f"{CACHE_DIR}/{image_id}.npy",
        "mask_uri": mask_uri,
        "label_kind": label_kind,
        "box": box,
        "width": int(w),
        "height": int(h),
        "sha256": c.shas[rel],
        "mask_sha256": c.shas.get(mask_rel) if mask_rel else None,
        "source_uri": c.ref(rel),
        "mask_source_uri": c.ref(mask_rel) if mask_rel else None,
        "frame": int(frame),
        "target": target,
        "mask_fraction": np.count_nonzero(mask) / mask.size if mask is not None else 0.0,
        "intensity_mean": mean,
        "intensity_std": std,
        "pixel_sha256": _sha_arr(rgb),
        "mask_pixel_sha256": _sha_arr(mask) if mask is not None else None,
        "split_bucket": int(u.split_bucket),
        "flags": ",".join(sorted(set(flags))),
        "meta": json.dumps(meta or {}, sort_keys=True),
        "unit_key": u.key,
        "unit_fingerprint": c.fingerprint,
        "ingested_at": c.now,
        "split": "train",
        **{k: (volume or {}).get(k) for k in ("volume_id", "slice_index", "spacing_mm", "orientation")},
    }


def _read_2d(path: Path, *, as_mask: bool = False) -> np.ndarray:
    return read_npy(path) if path.name.lower().endswith(".npy") else read_raster(path, as_mask=as_mask)


def _process_2d(c: _Ctx, u: Unit, paths: dict[str, str], out: UnitOutput) -> None:
    arr = _read_2d(Path(paths[u.image]))
    if arr.ndim == 3 and arr.shape[2] >= 3 and arr.dtype != np.uint8:
        rgb = to_rgb(to_uint8(arr[..., :3]))
    else:
        rgb = to_rgb(to_uint8(arr))
    mask, flags = None, []
    if u.mask:
        if u.mask.startswith("\0"):
            raise QuarantineError("outside_root", f"mask path {u.mask[1:]!r} leaves the source root")
        mask, flags = binarise_mask(_read_2d(Path(paths[u.mask]), as_mask=True))
    meta = {"source_dtype": str(arr.dtype), "source_shape": list(arr.shape)}
    out.rows.append(
        _build_row(
            c,
            u,
            rgb,
            mask,
            rel=u.image,
            target=u.target,
            target_key=(u.mask if u.target else None),
            mask_rel=u.mask,
            flags=flags,
            meta=meta,
        )
    )


def _volume_id(dataset: str, key: str) -> str:
    """A volume's id: a hash of its dataset and source (a file path, or a series' UID), never the UID itself."""
    return "vol-" + hashlib.sha256(f"{dataset}\0{key}".encode()).hexdigest()[:16]


def _dicom_volume(c: _Ctx, ds: Any, frames: int, rel: str) -> dict[str, Any] | None:
    """The volume fields of a DICOM image: a multi-frame object is a volume of its frames; a single-frame image
    with a position is a slice of its series (``slice_index`` set later, in position order, by
    ``manifest.index_volumes`` from ``meta["slice_position_mm"]``); anything else is 2-D (None). A series whose
    SeriesInstanceUID was blanked by an anonymiser is its folder's slices of one FrameOfReferenceUID."""
    try:
        dr, dc = (float(v) for v in ds.PixelSpacing)
    except (AttributeError, TypeError, ValueError):
        dr = dc = None
    thick = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
    if frames > 1:
        sop = str(ds.get("SOPInstanceUID", "") or "")
        return {"volume_id": _volume_id(c.dataset, "sop:" + sop), "orientation": "LPS",
                "spacing_mm": [float(thick) if thick else None, dr, dc]}
    series = str(ds.get("SeriesInstanceUID", "") or "")
    frame_of_ref = str(ds.get("FrameOfReferenceUID", "") or "")
    if not series and frame_of_ref:
        series = f"{PurePosixPath(rel).parent}|{frame_of_ref}"
    try:
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    except (AttributeError, TypeError, ValueError):
        return None
    if not series or iop.size != 6 or ipp.size != 3:
        return None
    return {"volume_id": _volume_id(c.dataset, "series:" + series), "orientation": "LPS",
            "spacing_mm": [None, dr, dc], "position": round(float(np.cross(iop[:3], iop[3:]) @ ipp), 4)}


def _process_nifti(c: _Ctx, u: Unit, paths: dict[str, str], out: UnitOutput) -> None:
    img, shape = read_nifti(Path(paths[u.image]))
    vol = nifti_array(img).astype(np.float32)
    lab = None
    if u.mask:
        limg, lshape = read_nifti(Path(paths[u.mask]))
        if lshape[:3] != shape[:3]:
            raise QuarantineError("size_mismatch", f"image volume {shape} vs label volume {lshape}")
        lab = nifti_array(limg)
        if lab.dtype.kind == "f":
            if not np.array_equal(lab, np.round(lab)):
                raise QuarantineError("non_binary_mask", "label volume has non-integer values")
            lab = lab.astype(np.int32)
    low, high = percentile_window(vol)
    mode = u.options.get("label_mode", "foreground")
    skip_empty = bool(u.options.get("skip_empty_slices", False))
    meta = {
        "source_shape": list(shape),
        "window": [round(low, 3), round(high, 3)],
        "window_source": "percentile",
        "zooms": [round(float(z), 4) for z in img.header.get_zooms()[:3]],
    }
    zooms = [float(v) for v in img.header.get_zooms()[:3]] + [1.0] * (3 - len(img.header.get_zooms()[:3]))
    volume = {"volume_id": _volume_id(c.dataset, u.image), "orientation": "RAS",  # slices as nifti_slice shows them
              "spacing_mm": [round(zooms[2], 4), round(zooms[1], 4), round(zooms[0], 4)]}
    for z in range(vol.shape[2]):
        volume = {**volume, "slice_index": z}
        try:
            rgb = to_rgb(apply_window(nifti_slice(vol, z), low, high))
            if lab is None:
                out.rows.append(_build_row(c, u, rgb, None, rel=u.image, frame=z, meta=meta, volume=volume))
                continue
            ls = nifti_slice(lab, z)
            if skip_empty and not ls.any():
                raise QuarantineError(
                    "skipped_empty_slice", "label slice is empty and skip_empty_slices is set"
                )
            if mode == "per_label" and ls.any():
                for v in np.unique(ls[ls != 0]):
                    out.rows.append(
                        _build_row(
                            c,
                            u,
                            rgb,
                            (ls == v).astype(np.uint8),
                            rel=u.image,
                            frame=z,
                            target=f"label_{int(v)}",
                            target_key=f"label_{int(v)}",
                            mask_rel=u.mask,
                            meta=meta,
                            volume=volume,
                        )
                    )
            else:
                out.rows.append(
                    _build_row(
                        c, u, rgb, (ls > 0).astype(np.uint8), rel=u.image, frame=z, mask_rel=u.mask, meta=meta,
                        volume=volume,
                    )
                )
        except QuarantineError as e:
            out.rejects.append((f"{u.image}#slice={z}", e.reason, e.detail))


def _process_dicom(c: _Ctx, u: Unit, paths: dict[str, str], out: UnitOutput) -> None:
    frames, used, ds = dcm.decode_image(Path(paths[u.image]))
    meta = {**safe_dicom_meta(ds), **used}
    volume = _dicom_volume(c, ds, len(frames), u.image)
    if volume is not None and "position" in volume:  # a series slice: ordered with its series after decoding
        meta["slice_position_mm"] = volume.pop("position")
    sop = hashlib.sha256(str(ds.get("SOPInstanceUID", "") or "").strip().encode()).hexdigest()
    masks: dict[int | None, list[tuple[str, int, str, np.ndarray]]] = {}  # source frame (1-based) → masks
    for seg in u.segs:
        try:
            seg_masks, labels = dcm.read_seg_frames(Path(paths[seg]))
        except QuarantineError as e:
            out.rejects.append((seg, e.reason, e.detail))
            continue
        for (uid, ref_frame, no), m in sorted(seg_masks.items(), key=lambda kv: (kv[0][1] or 0, kv[0][2])):
            if hashlib.sha256(uid.encode()).hexdigest() == sop:
                masks.setdefault(ref_frame, []).append((seg, no, labels.get(no, f"segment_{no}"), m))
    if len(frames) > 1 and None in masks:  # the standard requires ReferencedFrameNumber for multi-frame sources
        for seg, no, _, _ in masks.pop(None):
            out.rejects.append((f"{seg}#seg={no}", "mask_without_image",
                                "SEG frame references a multi-frame image without ReferencedFrameNumber"))
    for fi, rgb in enumerate(frames):
        frame = fi if len(frames) > 1 else -1
        frame_masks = masks.get(fi + 1, []) + (masks.get(None, []) if len(frames) == 1 else [])
        try:
            if frame_masks:
                for seg, no, label, m in frame_masks:
                    try:
                        out.rows.append(
                            _build_row(
                                c,
                                u,
                                rgb,
                                m,
                                rel=u.image,
                                frame=frame,
                                target=label,
                                target_key=f"{seg}#{no}",
                                mask_rel=seg,
                                meta=meta,
                                volume=_frame_volume(volume, frame),
                            )
                        )
                    except QuarantineError as e:
                        out.rejects.append((f"{u.image}#seg={seg}:{no}", e.reason, e.detail))
            else:
                out.rows.append(_build_row(c, u, rgb, None, rel=u.image, frame=frame, meta=meta,
                                           volume=_frame_volume(volume, frame)))
        except QuarantineError as e:
            out.rejects.append((f"{u.image}#frame={fi}" if len(frames) > 1 else u.image, e.reason, e.detail))
    stray = sorted(k for k in masks if k is not None and not 1 <= k <= len(frames))
    for k in stray:
        for seg, no, _, _ in masks[k]:
            out.rejects.append((f"{seg}#seg={no}", "mask_without_image", f"SEG references frame {k} of a "
                                f"{len(frames)}-frame image"))


def _frame_volume(volume: dict[str, Any] | None, frame: int) -> dict[str, Any] | None:
    """A DICOM row's volume fields: a multi-frame object's frame is its slice index."""
    if volume is None:
        return None
    return {**volume, "slice_index": frame} if frame >= 0 else volume


def process_unit(u: Unit, paths: dict[str, str], ctx: dict[str, Any]) -> UnitOutput:
    """Decode ``u`` (files at local ``paths``), write its cache files, return rows and rejects. Never
    raises."""
    c = _Ctx(ctx)
    out = UnitOutput()
    try:
        if u.kind == "2d":
            _process_2d(c, u, paths, out)
        elif u.kind == "nifti":
            _process_nifti(c, u, paths, out)
        elif u.kind == "dicom":
            _process_dicom(c, u, paths, out)
        else:
            raise QuarantineError("unsupported_format", f"unit kind {u.kind}")
    except QuarantineError as e:
        out.rejects.append((u.image or u.key, e.reason, e.detail))
        out.rows.clear()
    except MemoryError:
        out.rejects.append((u.image or u.key, "too_large", "out of memory while decoding"))
        out.rows.clear()
    except Exception as e:  # a bug or an exotic file: quarantine, keep the traceback's last line only
        # DICOM messages may echo header values: keep only the exception type there
        tb = (
            type(e).__name__ if u.kind == "dicom" else traceback.format_exception_only(type(e), e)[-1].strip()
        )
        out.rejects.append((u.image or u.key, "decode_error", tb[:200]))
        out.rows.clear()
    return out
