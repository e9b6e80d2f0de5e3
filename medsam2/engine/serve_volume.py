"""Served volumes: a CT or MR volume in a request, prompts on one or more slices, SAM2's memory through the rest
(:func:`medsam2.engine.volume.segment_volume`, what ``medsam2 predict --volume`` runs), the label volume back.

A volume record (:class:`~medsam2.engine.serve.ServeRecord` with ``volume``) carries base64 of a NIfTI file
(``.nii`` or ``.nii.gz``) or of a ZIP of one DICOM series folder (files with or without a suffix; ``series``, a
SeriesInstanceUID or SeriesNumber, picks one when the ZIP holds several), and ``prompts``: one
:class:`VolumePrompt` per prompted slice. Slice indices and coordinates are those of ``medsam2 predict --volume``
(:mod:`medsam2.data.volumes`: RAS+ axial slices from inferior to superior for NIfTI, position order for DICOM).

The answer (:func:`segment_volume_record`) holds base64 of a ``.nii.gz`` uint8 {0,1} label volume with the
source's shape and affine, and for a DICOM series base64 of a multi-frame DICOM-SEG that references every slice.
Every problem is a :class:`~medsam2.errors.RequestError` naming the record and the field, never a server path.
"""

from __future__ import annotations

import base64
import math
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from medsam2.data.volumes import Volume, read_volume, source_datasets
from medsam2.engine.prompt_sources import check_prompt
from medsam2.engine.volume import SlicePrompt, check_memory_model, segment_volume
from medsam2.errors import MedsamError, RequestError

NIFTI_MAGIC = (b"n+1\x00", b"ni1\x00")  # at byte 344 of a NIfTI-1 header


class VolumePrompt(BaseModel):
    """The prompt on one slice of a volume: ``box`` ``[x0, y0, x1, y1]`` and/or ``points`` ``[[x, y], …]`` with
    ``point_labels`` (1 foreground, 0 background), in the slice's pixels; or ``mask``, base64 of a PNG of the
    slice's size (non-zero = the object), alone."""

    slice: int
    box: list[float] | None = None
    points: list[list[float]] | None = None
    point_labels: list[int] | None = None
    mask: str | None = None


def volume_kind(data: bytes) -> str | None:
    """``zip`` (a DICOM series), ``nii.gz``, ``nii`` or None, from the first bytes."""
    if data.startswith(b"PK\x03\x04"):
        return "zip"
    if data.startswith(b"\x1f\x8b"):
        return "nii.gz"
    if len(data) >= 348 and data[344:348] in NIFTI_MAGIC:
        return "nii"
    return None


def _refusal(e: MedsamError, where: str, tmp: str) -> RequestError:
    """A library error about the volume → one sentence for the client, the server's temp path taken out."""
    text = e.message + (f"; {e.hint}" if e.hint else "")
    text = text.replace(f"{tmp}/", "").replace(tmp, "the ZIP").replace("--series", "'series'")
    return RequestError(422, f"{where}: volume: {text}")


def _unzip(data: bytes, dest: Path, where: str, max_bytes: int) -> Path:
    """The ZIP's files into ``dest`` under their own index (no member names reach the disk: no zip-slip)."""
    import io

    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in zf.infolist() if not m.is_dir()]
    except zipfile.BadZipFile:
        raise RequestError(422, f"{where}: volume is not a readable ZIP") from None
    if not members:
        raise RequestError(422, f"{where}: volume: the ZIP holds no files")
    unpacked = sum(m.file_size for m in members)
    if unpacked > max_bytes:
        raise RequestError(413, f"{where}: volume unpacks to {unpacked / 2**20:.1f} MiB; this server takes at most "
                                f"{max_bytes / 2**20:.1f} MiB (8 × MEDSAM2_SERVE_MAX_BYTES)")
    folder = dest / "series"
    folder.mkdir()
    with zf:
        for i, m in enumerate(members):
            try:
                (folder / f"{i:06d}").write_bytes(zf.read(m))
            except (zipfile.BadZipFile, RuntimeError, ValueError):  # corrupt, encrypted or unsupported member
                raise RequestError(422, f"{where}: volume: ZIP member {i} could not be read") from None
    return folder


def _header_voxels(path: Path) -> int:
    import nibabel as nib

    return math.prod(int(s) for s in nib.load(str(path)).shape)


def read_volume_bytes(data: bytes, series: str | None, where: str, *, max_bytes: int, max_voxels: int
                      ) -> tuple[Volume, list[Any] | None]:
    """A volume record's bytes → (:class:`Volume`, the DICOM slices' headers in slice order for a DICOM-SEG, or
    None for NIfTI). A NIfTI's size is checked from its header before its voxels are decompressed; a ZIP's
    unpacked size before it is unpacked. Raises RequestError (413 a limit, 422 bad data)."""
    kind = volume_kind(data)
    if kind is None:
        raise RequestError(422, f"{where}: volume is not a NIfTI file (.nii/.nii.gz) or a ZIP of a DICOM series")
    with tempfile.TemporaryDirectory(prefix="medsam2-serve-") as tmp:
        try:
            if kind == "zip":
                path = _unzip(data, Path(tmp), where, 8 * max_bytes)
            else:
                path = Path(tmp) / f"volume.{kind}"
                path.write_bytes(data)
                try:
                    voxels = _header_voxels(path)
                except Exception:  # noqa: BLE001 (any header the parser refuses is the client's bad file)
                    raise RequestError(422, f"{where}: volume could not be read as NIfTI") from None
                _check_voxels(voxels, where, max_voxels)
            vol = read_volume(path, series)
            if kind != "zip":
                return vol, None
            _check_voxels(len(vol) * vol.hw[0] * vol.hw[1], where, max_voxels)
            return vol, source_datasets(vol)  # headers in memory: the files go with the temp dir
        except MedsamError as e:
            raise _refusal(e, where, tmp) from None


def _check_voxels(voxels: int, where: str, max_voxels: int) -> None:
    if voxels > max_voxels:
        raise RequestError(413, f"{where}: volume has {voxels / 1e6:.1f} million voxels; this server takes at most "
                                f"{max_voxels / 1e6:.1f} (MEDSAM2_SERVE_MAX_VOXELS)")


def finite(values: list[float]) -> bool:
    """Every value a finite int or float (a prompt's coordinates; shared with image records in ``serve``)."""
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


def _mask(text: str, hw: tuple[int, int], where: str) -> np.ndarray:
    import io

    from PIL import Image

    try:
        m = np.asarray(Image.open(io.BytesIO(base64.b64decode(text.strip(), validate=True))))
    except Exception:  # noqa: BLE001 (not base64, not an image: the client's field)
        raise RequestError(422, f"{where}: mask is not base64 of a PNG") from None
    m = (m.max(axis=-1) if m.ndim == 3 else m) > 0
    if m.shape != hw:
        raise RequestError(422, f"{where}: mask is {m.shape[1]}×{m.shape[0]}, the slices are {hw[1]}×{hw[0]}")
    if not m.any():
        raise RequestError(422, f"{where}: mask is empty")
    return m


def slice_prompts(prompts: list[VolumePrompt] | None, vol: Volume, where: str) -> dict[int, SlicePrompt]:
    """A record's ``prompts`` → {slice: :class:`SlicePrompt`}, each checked against the volume and its slice."""
    if not prompts:
        raise RequestError(422, f"{where}: prompts required for a volume: [{{\"slice\": Z, \"box\": [x0, y0, x1, "
                                "y1]}}, …] (or points / mask)")
    out: dict[int, SlicePrompt] = {}
    for j, p in enumerate(prompts):
        at = f"{where}: prompts[{j}]"
        if not 0 <= p.slice < len(vol):
            raise RequestError(422, f"{at}: slice {p.slice} is outside the volume: it has {len(vol)} slices "
                                    f"(0..{len(vol) - 1})")
        if p.slice in out:
            raise RequestError(422, f"{at}: slice {p.slice} is prompted twice")
        if p.mask is not None:
            if p.box is not None or p.points is not None:
                raise RequestError(422, f"{at}: a mask is the slice's whole prompt; give mask, or box and/or points")
            out[p.slice] = SlicePrompt(mask=_mask(p.mask, vol.hw, at))
            continue
        if p.box is None and p.points is None:
            raise RequestError(422, f"{at}: give box, points or mask")
        if p.box is not None and (len(p.box) != 4 or not finite(p.box)):
            raise RequestError(422, f"{at}: box must be 4 finite numbers [x0, y0, x1, y1]")
        if p.points is not None:
            labels = p.point_labels if p.point_labels is not None else [1] * len(p.points)
            if any(len(q) != 2 or not finite(q) for q in p.points) or not p.points:
                raise RequestError(422, f"{at}: points must be [[x, y], …] pairs of finite numbers")
            if len(labels) != len(p.points) or any(v not in (0, 1) for v in labels):
                raise RequestError(422, f"{at}: point_labels must hold one 0 or 1 per point")
        box = None if p.box is None else np.asarray(p.box, np.float32)
        pts = None if p.points is None else np.asarray(p.points, np.float32)
        try:
            check_prompt(box, pts, vol.hw)
        except ValueError as e:
            raise RequestError(422, f"{at}: {e}") from None
        out[p.slice] = SlicePrompt(box=box, points=pts,
                                   labels=None if pts is None else np.asarray(labels, np.int32))
    return out


def segment_volume_record(model, data: bytes, series: str | None, prompts: list[VolumePrompt] | None,
                          where: str, *, max_bytes: int, max_voxels: int) -> dict[str, Any]:
    """One volume record → the fields of its ``ServeResult``: ``volume`` (base64 ``.nii.gz``), ``dicom_seg``
    (base64, DICOM input only), ``shape`` (the source's voxel shape), ``height``/``width`` (a slice's),
    ``foreground_slices``."""
    try:
        check_memory_model(model)
    except MedsamError as e:
        raise RequestError(422, f"{where}: volume: {e.message}") from None
    vol, datasets = read_volume_bytes(data, series, where, max_bytes=max_bytes, max_voxels=max_voxels)
    res = segment_volume(model, vol.slices, slice_prompts(prompts, vol, where))
    with tempfile.TemporaryDirectory(prefix="medsam2-serve-") as tmp:
        nifti = vol.write_nifti(res.masks, Path(tmp) / "seg.nii.gz").read_bytes()
        seg = None
        if datasets is not None:
            from medsam2.data.dicom_seg import write_dicom_seg

            seg = write_dicom_seg(datasets, list(res.masks), Path(tmp) / "seg.dcm").read_bytes()
    return {"height": int(vol.hw[0]), "width": int(vol.hw[1]), "shape": [int(s) for s in vol.shape],
            "foreground_slices": int(res.masks.any(axis=(1, 2)).sum()),
            "volume": base64.b64encode(nifti).decode("ascii"),
            "dicom_seg": None if seg is None else base64.b64encode(seg).decode("ascii")}
