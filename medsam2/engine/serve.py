"""Serving requests → masks: the typed records the MLflow pyfunc takes, their checks, limits and encodings.

A request is a list of :class:`ServeRecord` (``{"inputs": [...], "params": {"format": "png"|"rle"}}`` over HTTP).
Each record carries its image **in the request**: ``image`` is the base64 text of a PNG, JPEG, TIFF or DICOM file;
or a CT/MR volume, ``volume`` (base64 of a NIfTI file or a ZIP of a DICOM series) with ``prompts`` on one or more
slices, which SAM2's memory propagates through the volume (:mod:`medsam2.engine.serve_volume`).
``image_path`` (a file on the server) is refused unless the serving environment names an allowed root
(``MEDSAM2_SERVE_IMAGE_ROOT``), and then only a path that resolves (symlinks followed) under that root.

Every problem of a request is a :class:`RequestError`: an HTTP status (413 for a limit, 422 for a bad field, 403
for a refused path) and one sentence naming the record and the field, without a server path or a traceback.
Decoding is the one of ``medsam2 predict`` (:func:`medsam2.data.images.read_image_any`), so a served mask equals
the CLI's on the same file.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from medsam2.data.images import read_image_any
from medsam2.data.readers import QuarantineError
from medsam2.engine.predict import predict
from medsam2.engine.prompt_sources import check_prompt
from medsam2.engine.serve_volume import VolumePrompt, finite, segment_volume_record
from medsam2.errors import RequestError

__all__ = ["RLE", "RequestError", "ServeLimits", "ServeRecord", "ServeResult", "VolumePrompt", "serve"]

FORMATS = ("png", "rle")
MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff", "tiff-le": b"II*\x00", "tiff-be": b"MM\x00*"}
SUFFIX = {"png": ".png", "jpeg": ".jpg", "tiff-le": ".tif", "tiff-be": ".tif", "dicom": ".dcm"}


class ServeRecord(BaseModel):
    """One image and its prompt. ``image``: base64 of the file's bytes (PNG/JPEG/TIFF/DICOM); ``box``:
    ``[x0, y0, x1, y1]`` in the image's pixels; ``points``: ``[[x, y], …]`` with ``point_labels`` (1 foreground,
    0 background); ``image_path``: only where the server allows it. Or a volume: ``volume``, base64 of a NIfTI
    file (.nii/.nii.gz) or of a ZIP of a DICOM series, ``series`` (UID or SeriesNumber, when the ZIP holds
    several) and ``prompts`` (one :class:`VolumePrompt` per prompted slice)."""

    image: str | None = None
    image_path: str | None = None
    box: list[float] | None = None
    points: list[list[float]] | None = None
    point_labels: list[int] | None = None
    volume: str | None = None
    series: str | None = None
    prompts: list[VolumePrompt] | None = None


class RLE(BaseModel):
    """COCO run-length encoding (``pycocotools.mask.decode`` reads it): ``size`` = [height, width]."""

    size: list[int]
    counts: str


class ServeResult(BaseModel):
    """One record's mask at the image's own size: ``mask`` (base64 PNG, 0/255) or ``rle`` as ``format`` says;
    ``iou_pred``: SAM's predicted IoU in [0, 1]; ``confidence``: the calibrated confidence when the model has
    one, else None. For a volume record: ``format`` ``nifti``, ``volume`` (base64 of a ``.nii.gz`` uint8 {0,1}
    label volume with the source's shape and affine), ``dicom_seg`` (base64 of a DICOM-SEG referencing every
    slice, for a DICOM series), ``shape`` (the source's voxel shape), ``height``/``width`` a slice's,
    ``foreground_slices``; ``iou_pred`` is None."""

    format: str
    height: int
    width: int
    mask: str | None = None
    rle: RLE | None = None
    iou_pred: float | None = None
    confidence: float | None = None
    volume: str | None = None
    dicom_seg: str | None = None
    shape: list[int] | None = None
    foreground_slices: int | None = None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        return int(float(raw)) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


@dataclass(frozen=True)
class ServeLimits:
    """What one request may hold. Defaults: 32 records, 40 megapixels per image, 64 million voxels per volume,
    64 MiB of image bytes per request (the HTTP body limit itself belongs to the reverse proxy:
    ``infra/README.md``); no server paths."""

    max_records: int = 32
    max_pixels: int = 40_000_000
    max_bytes: int = 64 * 2**20
    image_root: Path | None = None
    max_voxels: int = 64_000_000

    @classmethod
    def from_env(cls) -> ServeLimits:
        """``MEDSAM2_SERVE_MAX_RECORDS``, ``_MAX_PIXELS``, ``_MAX_VOXELS``, ``_MAX_BYTES`` and ``_IMAGE_ROOT``
        (unset: defaults)."""
        root = os.environ.get("MEDSAM2_SERVE_IMAGE_ROOT", "").strip()
        return cls(max_records=_env_int("MEDSAM2_SERVE_MAX_RECORDS", cls.max_records),
                   max_pixels=_env_int("MEDSAM2_SERVE_MAX_PIXELS", cls.max_pixels),
                   max_bytes=_env_int("MEDSAM2_SERVE_MAX_BYTES", cls.max_bytes),
                   max_voxels=_env_int("MEDSAM2_SERVE_MAX_VOXELS", cls.max_voxels),
                   image_root=Path(root).resolve() if root else None)


def _kind(data: bytes) -> str | None:
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return next((k for k, m in MAGIC.items() if data.startswith(m)), None)


def _header_size(data: bytes, kind: str) -> tuple[int, int, int]:
    """(width, height, frames) from the header only: a decompression bomb is refused before it is decoded."""
    if kind == "dicom":
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        return int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0), int(ds.get("NumberOfFrames", 1) or 1)
    if kind.startswith("tiff"):
        import tifffile

        with tifffile.TiffFile(io.BytesIO(data)) as tf:
            page = tf.pages[0]
            return int(page.imagewidth), int(page.imagelength), 1
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.width, im.height, 1


def _decode_bytes(data: bytes, where: str, limits: ServeLimits) -> np.ndarray:
    kind = _kind(data)
    if kind is None:
        raise RequestError(422, f"{where}: image is not a PNG, JPEG, TIFF or DICOM file")
    try:
        w, h, frames = _header_size(data, kind)
    except Exception:  # noqa: BLE001 (any parser failure is the client's unreadable file)
        raise RequestError(422, f"{where}: image could not be read as {kind.split('-')[0].upper()}") from None
    if w * h > limits.max_pixels:
        raise RequestError(413, f"{where}: image is {w}x{h} = {w * h / 1e6:.1f} megapixels; this server takes "
                                f"at most {limits.max_pixels / 1e6:.1f} (MEDSAM2_SERVE_MAX_PIXELS)")
    with tempfile.TemporaryDirectory(prefix="medsam2-serve-") as tmp:
        path = Path(tmp) / f"image{SUFFIX[kind]}"
        path.write_bytes(data)
        return _read(path, where)


def _read(path: Path, where: str) -> np.ndarray:
    try:
        return read_image_any(path)
    except QuarantineError as e:
        raise RequestError(422, f"{where}: image could not be decoded ({e.reason})") from None
    except Exception:  # noqa: BLE001 (a truncated or corrupt file the header check let through)
        raise RequestError(422, f"{where}: image could not be decoded") from None


def _from_path(raw: str, where: str, limits: ServeLimits) -> np.ndarray:
    """A server file, only under the allowed root: no ``..``, resolved (symlinks followed) inside the root."""
    if limits.image_root is None:
        raise RequestError(403, f"{where}: image_path is disabled on this server; send the file's bytes as "
                                "base64 in 'image'")
    if ".." in Path(raw).parts:
        raise RequestError(403, f"{where}: image_path may not contain '..'")
    target = Path(raw) if Path(raw).is_absolute() else limits.image_root / raw
    try:
        resolved = target.resolve(strict=True)
    except (OSError, RuntimeError):
        raise RequestError(422, f"{where}: image_path names no file under the allowed image root") from None
    if not resolved.is_relative_to(limits.image_root):
        raise RequestError(403, f"{where}: image_path is outside the allowed image root")
    if not resolved.is_file():
        raise RequestError(422, f"{where}: image_path names no file under the allowed image root")
    return _read(resolved, where)


def _b64(text: str, where: str, field: str = "image") -> bytes:
    try:
        data = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, f"{where}: {field} is not valid base64") from None
    if not data:
        raise RequestError(422, f"{where}: {field} is empty")
    return data


def _check_prompt(rec: ServeRecord, prompt: str, hw: tuple[int, int], where: str) -> None:
    """The fields the prompt mode needs, well-formed; the geometry checked as ``medsam2 predict`` checks it."""
    box = pts = None
    if prompt == "box":
        if rec.box is None:
            raise RequestError(422, f"{where}: box required for a box-prompted model ([x0, y0, x1, y1] in pixels)")
        if len(rec.box) != 4 or not finite(rec.box):
            raise RequestError(422, f"{where}: box must be 4 finite numbers [x0, y0, x1, y1]")
        box = np.asarray(rec.box, np.float32)
    elif prompt == "points":
        labels = rec.point_labels
        if not rec.points or labels is None:
            raise RequestError(422, f"{where}: points and point_labels required for a point-prompted model")
        if any(len(p) != 2 or not finite(p) for p in rec.points):
            raise RequestError(422, f"{where}: points must be [[x, y], …] pairs of finite numbers")
        if len(labels) != len(rec.points) or any(v not in (0, 1) for v in labels):
            raise RequestError(422, f"{where}: point_labels must hold one 0 (background) or 1 (foreground) "
                                    f"per point ({len(rec.points)} points, {len(labels)} labels)")
        pts = np.asarray(rec.points, np.float32)
    try:
        check_prompt(box, pts, hw)
    except ValueError as e:
        raise RequestError(422, f"{where}: {e}") from None


def load_records(records: Sequence[ServeRecord | dict[str, Any]], prompt: str, limits: ServeLimits
                 ) -> tuple[list[ServeRecord], list[np.ndarray | None]]:
    """Check a request and decode its images → (records, uint8 (H,W,3) RGB images; None for a volume record,
    decoded one at a time by :func:`serve`). Raises RequestError."""
    recs = [r if isinstance(r, ServeRecord) else ServeRecord.model_validate(r) for r in records]
    if not recs:
        raise RequestError(422, "inputs: the request holds no records")
    if len(recs) > limits.max_records:
        raise RequestError(413, f"inputs: {len(recs)} records in one request; this server takes at most "
                                f"{limits.max_records} (MEDSAM2_SERVE_MAX_RECORDS)")
    total = sum(len(r.image or "") + len(r.volume or "") for r in recs) * 3 // 4
    if total > limits.max_bytes:
        raise RequestError(413, f"inputs: {total / 2**20:.1f} MiB of images in one request; this server takes at "
                                f"most {limits.max_bytes / 2**20:.1f} MiB (MEDSAM2_SERVE_MAX_BYTES)")
    images = []
    for i, rec in enumerate(recs):
        where = f"record {i}"
        if rec.volume is not None:
            if rec.image is not None or rec.image_path is not None:
                raise RequestError(422, f"{where}: give an image or a volume, not both")
            images.append(None)
            continue
        if rec.image is not None and rec.image_path is not None:
            raise RequestError(422, f"{where}: give image or image_path, not both")
        if rec.image is not None:
            img = _decode_bytes(_b64(rec.image, where), where, limits)
        elif rec.image_path is not None:
            img = _from_path(rec.image_path, where, limits)
        else:
            raise RequestError(422, f"{where}: image required (base64 of a PNG, JPEG, TIFF or DICOM file), or a "
                                    "volume (base64 of a NIfTI file or a ZIP of a DICOM series)")
        if img.shape[0] * img.shape[1] > limits.max_pixels:
            raise RequestError(413, f"{where}: image is {img.shape[1]}x{img.shape[0]}; this server takes at most "
                                    f"{limits.max_pixels / 1e6:.1f} megapixels (MEDSAM2_SERVE_MAX_PIXELS)")
        _check_prompt(rec, prompt, img.shape[:2], where)
        images.append(img)
    return recs, images


def encode_mask(mask: np.ndarray, fmt: str) -> dict[str, Any]:
    """(H,W) bool/{0,1} mask → ``{"mask": base64 PNG (0/255)}`` or ``{"rle": COCO RLE}``."""
    m = np.asarray(mask).astype(np.uint8)
    if fmt == "rle":
        from pycocotools import mask as mask_utils

        rle = mask_utils.encode(np.asfortranarray(m))
        return {"rle": RLE(size=[int(s) for s in rle["size"]], counts=rle["counts"].decode("ascii"))}
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(m * 255).save(buf, format="PNG", optimize=True)
    return {"mask": base64.b64encode(buf.getvalue()).decode("ascii")}


def decode_mask(result: dict[str, Any]) -> np.ndarray:
    """A :class:`ServeResult` as JSON → the (H,W) bool mask (for clients and tests)."""
    if result.get("rle"):
        from pycocotools import mask as mask_utils

        rle = dict(result["rle"])
        return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(result["mask"])))) > 127


def output_format(params: dict[str, Any] | None) -> str:
    fmt = str((params or {}).get("format") or "png").lower()
    if fmt not in FORMATS:
        raise RequestError(422, f"params.format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return fmt


def serve(model, prompt: str, records: Sequence[ServeRecord | dict[str, Any]], params: dict[str, Any] | None,
          limits: ServeLimits | None = None) -> list[ServeResult]:
    """Check, decode and predict one request with a loaded ``Segmenter``; ``prompt`` is the model's prompt mode
    (``box``/``points``/``none``) for image records (a volume record brings its own prompts). Results come in
    the records' order. Raises :class:`RequestError` for anything the client has to fix."""
    fmt = output_format(params)
    limits = limits or ServeLimits.from_env()
    recs, images = load_records(records, prompt, limits)
    box, pts = prompt == "box", prompt == "points"
    flat = [i for i, im in enumerate(images) if im is not None]
    out: dict[int, ServeResult] = {}

    def run(idx: list[int]) -> None:
        preds = predict(model, [images[i] for i in idx], boxes=[recs[i].box if box else None for i in idx],
                        points=[recs[i].points if pts else None for i in idx],
                        point_labels=[recs[i].point_labels if pts else None for i in idx])
        for i, p in zip(idx, preds, strict=True):
            out[i] = ServeResult(format=fmt, height=int(p.mask.shape[0]), width=int(p.mask.shape[1]),
                                 iou_pred=float(p.iou_pred), **encode_mask(p.mask, fmt))

    if pts and len({len(recs[i].points or []) for i in flat}) > 1:  # a batch stacks equal point counts
        for i in flat:
            run([i])
    elif flat:
        run(flat)
    for i, rec in enumerate(recs):
        if images[i] is None:
            where = f"record {i}"
            out[i] = ServeResult(format="nifti", **segment_volume_record(
                model, _b64(rec.volume, where, "volume"), rec.series, rec.prompts, where,
                max_bytes=limits.max_bytes, max_voxels=limits.max_voxels))
    return [out[i] for i in range(len(recs))]
