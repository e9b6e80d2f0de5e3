"""``medsam2 predict --volume``: a NIfTI file or a DICOM series, prompts on one or more slices, SAM2's memory
propagates them through the volume (:mod:`medsam2.engine.volume`).

Outputs in ``--out``: ``<name>_seg.nii.gz``, a uint8 {0,1} label volume with the source's shape and affine
(for a DICOM series: (Columns, Rows, Z) and the RAS affine of its geometry), and for a DICOM series also
``<name>_seg.dcm``, a multi-frame DICOM-SEG (highdicom) that references every slice of the source series.
Slice indices and prompt coordinates are those of the volume's slices (:mod:`medsam2.data.volumes`: RAS+
axial slices from inferior to superior, anterior up, for NIfTI; position order for DICOM).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from medsam2.data.images import read_image_any
from medsam2.data.readers import QuarantineError, binarise_mask, stem_of
from medsam2.data.volumes import Volume, read_volume, source_datasets
from medsam2.engine.prompt_sources import check_prompt, parse_box, parse_points
from medsam2.engine.volume import SlicePrompt, check_memory_model, segment_volume
from medsam2.errors import InputDataError, UsageError


def _per_slice(values: list[str] | None, n: int, option: str) -> list[str | None]:
    """An option given once (every prompted slice) or once per ``--slice``, in order."""
    if not values:
        return [None] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise UsageError(f"{option} is given {len(values)} times for {n} --slice values",
                         f"give {option} once (for every slice) or once per --slice, in the same order")
    return list(values)


def _mask_prompt(path: str, hw: tuple[int, int]) -> np.ndarray:
    try:
        m, _ = binarise_mask(read_image_any(Path(path)))
    except QuarantineError as e:
        raise InputDataError(f"--mask {path}: {e.reason}: {e.detail}", "give a binary PNG of the key slice") from None
    if m.shape != hw:
        raise UsageError(f"--mask {path} is {m.shape[1]}×{m.shape[0]}, the slices are {hw[1]}×{hw[0]}",
                         "give a mask of the slice's size")
    if not m.any():
        raise UsageError(f"--mask {path} is empty", "give a mask with the object on the key slice")
    return m.astype(bool)


def volume_prompts(vol: Volume, slices: list[int], boxes: list[str] | None = None, points: list[str] | None = None,
                   masks: list[str] | None = None) -> dict[int, SlicePrompt]:
    """``--slice``/``--box``/``--points``/``--mask`` → {slice: :class:`SlicePrompt` in slice pixels}, checked
    against the volume (a slice outside it, a box or point outside the slice: UsageError)."""
    if not slices:
        raise UsageError("--volume needs --slice Z (the prompted slice; repeatable)")
    if len(set(slices)) != len(slices):
        raise UsageError(f"--slice repeats a slice: {slices}")
    out_of = [z for z in slices if not 0 <= z < len(vol)]
    if out_of:
        raise UsageError(f"--slice {out_of[0]} is outside the volume: it has {len(vol)} slices (0..{len(vol) - 1})")
    if masks and (boxes or points):
        raise UsageError("--mask is a slice's whole prompt", "give --mask, or --box and/or --points")
    if not (masks or boxes or points):
        raise UsageError("--volume needs a prompt on each --slice: --box, --points or --mask")
    n = len(slices)
    out = {}
    for z, b, p, m in zip(slices, _per_slice(boxes, n, "--box"), _per_slice(points, n, "--points"),
                          _per_slice(masks, n, "--mask"), strict=True):
        if m is not None:
            out[z] = SlicePrompt(mask=_mask_prompt(m, vol.hw))
            continue
        try:
            box = parse_box(b)
            pts, labels = parse_points(p)
            check_prompt(box, pts, vol.hw)
        except ValueError as e:
            raise UsageError(f"slice {z}: {e}", "coordinates are pixels of the slice (x to the right, y down)"
                             ) from None
        out[z] = SlicePrompt(box=box, points=pts, labels=labels)
    return out


def _name(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem_of(path.name) if path.is_file() else path.name) or "volume"


def predict_volume(model: str, volume: Path, slices: list[int], out: Path, *, boxes: list[str] | None = None,
                   points: list[str] | None = None, masks: list[str] | None = None, series: str | None = None,
                   precision: str = "fp32") -> dict[str, Any]:
    """Segment ``volume`` from prompts on ``slices`` with ``model`` (checkpoint or MLflow URI); write the NIfTI
    label volume (and a DICOM-SEG for a DICOM series) into ``out``. Returns the JSON summary: paths, shape,
    spacing, per-slice foreground, the segmented volume in mL, and ``random_init`` (the model's weights)."""
    from medsam2.data.dicom_seg import write_dicom_seg
    from medsam2.steps import load_for_eval

    vol = read_volume(volume, series)
    prompts = volume_prompts(vol, slices, boxes, points, masks)  # before the model: bad prompts fail fast
    net, cfg = load_for_eval(model)
    check_memory_model(net)
    res = segment_volume(net, vol.slices, prompts, precision=precision)
    out.mkdir(parents=True, exist_ok=True)
    name = _name(Path(volume))
    nifti = vol.write_nifti(res.masks, out / f"{name}_seg.nii.gz")
    voxel_ml = float(np.prod(vol.spacing)) / 1000.0
    summary: dict[str, Any] = {
        "model": model, "volume": str(volume), "kind": vol.kind, "shape": list(vol.shape),
        "slices": len(vol), "spacing_mm": [round(s, 4) for s in vol.spacing], "prompted_slices": sorted(prompts),
        "nifti": str(nifti), "foreground_slices": int(res.masks.any(axis=(1, 2)).sum()),
        "volume_ml": round(float(res.masks.sum()) * voxel_ml, 3),
        "random_init": str(cfg.model.checkpoint).lower() in ("none", ""),
    }
    if vol.kind == "dicom":
        summary["dicom_seg"] = str(write_dicom_seg(source_datasets(vol), list(res.masks), out / f"{name}_seg.dcm"))
    return summary
