"""``medsam2 predict``: files in, masks out — PNG masks for images, DICOM-SEG (highdicom) for DICOM inputs.

One output per input, each with its own prompt (:mod:`medsam2.engine.prompt_sources`: ``--box``/``--points``
for every input, a CSV/JSON prompt file, or a manifest's boxes). An input that fails (unreadable, no box, a box
outside the image) gets a ``failed`` entry with its reason, and the batch goes on.

A DICOM-SEG references its source instance (same Study, Frame of Reference, ReferencedSeriesSequence), has
the source's frame geometry, one binary segment per prediction, and is written next to a PNG preview. Patient
identity stays inside the DICOM-SEG (it is the clinical output that goes back to the PACS) and is never logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medsam2.data.dicom_seg import write_dicom_seg
from medsam2.data.images import read_image_any
from medsam2.data.readers import sniff_kind
from medsam2.engine.predict import predict
from medsam2.engine.prompt_sources import PromptItem, check_prompt, parse_box, parse_points
from medsam2.errors import InputDataError
from medsam2.eval.calibration import Calibrator

__all__ = ["PromptItem", "parse_box", "parse_points", "predict_files", "write_dicom_seg"]


def _frames(item: PromptItem) -> list[np.ndarray]:
    """The (H,W,3) uint8 frames of an input: a manifest row's cache, a DICOM's frames, or one image."""
    if item.cache is not None:
        if not item.cache.is_file():
            raise InputDataError(f"cache file {item.cache} is missing", "re-run medsam2 ingest on this work dir")
        return [np.load(item.cache)]
    path = item.path
    assert path is not None
    if not path.exists():
        raise InputDataError(f"input file not found: {path}", "check the path")
    if path.is_dir():
        raise InputDataError(f"input {path} is a folder, not an image", "give image files")
    if sniff_kind(path) == "dicom":
        from medsam2.data.dicom import decode_image

        return decode_image(path)[0]
    return [read_image_any(path)]


def _one(net, mode: str, item: PromptItem, out: Path, stem: str, cache=None, precision: str | None = None,
         agreement: bool = False) -> dict[str, Any]:
    """Segment one input and write its outputs (``agreement``: also its ``flip_agreement``); raises on a
    problem of this input."""
    if item.error:
        raise InputDataError(item.error)
    if mode == "box" and item.box is None:
        raise InputDataError("no box for this input, and the model is box-prompted",
                             "give a box (--box, a 'box' column / key, or a manifest row with a box)")
    if mode == "points" and item.points is None:
        raise InputDataError("no points for this input, and the model is point-prompted",
                             "give points (--points or a 'points' column / key)")
    frames = _frames(item)
    check_prompt(item.box if mode == "box" else None, item.points if mode == "points" else None,
                 frames[0].shape[:2])
    n = len(frames)
    preds = predict(net, frames, boxes=[item.box] * n, points=[item.points] * n, point_labels=[item.labels] * n,
                    cache=cache, precision=_torch_precision(precision), agreement=agreement)
    masks = [p.mask for p in preds]
    png = out / f"{stem}_mask.png"
    Image.fromarray((masks[0] * 255).astype(np.uint8)).save(png)
    entry = {"input": item.label, "status": "ok", "mask_png": str(png), "iou_pred": preds[0].iou_pred,
             "foreground_fraction": float(masks[0].mean()), "frames": n}
    if preds[0].flip_agreement is not None:
        entry["flip_agreement"] = preds[0].flip_agreement
    if preds[0].stability is not None:
        entry["stability"] = preds[0].stability
    if item.box is not None:
        entry["box"] = [float(v) for v in item.box]
    if item.path is not None and sniff_kind(item.path) == "dicom":
        entry["dicom_seg"] = str(write_dicom_seg(item.path, masks, out / f"{stem}_seg.dcm"))
    return entry


def _torch_precision(precision: str | None) -> str:
    """``--precision`` for the PyTorch engine (``auto`` when not given)."""
    return precision if precision in ("fp32", "bf16", "int8") else "auto"


def _stems(items: list[PromptItem]) -> list[str]:
    """One output stem per item, unique within the batch (``a``, ``a-2``, … for inputs that share a name)."""
    seen: dict[str, int] = {}
    out = []
    for it in items:
        k = seen[it.name] = seen.get(it.name, 0) + 1
        out.append(it.name if k == 1 else f"{it.name}-{k}")
    return out


def predict_files(model: str, items: list[PromptItem], out: Path, engine: str = "torch",
                  precision: str | None = None, calibration: Calibrator | None = None) -> dict[str, Any]:
    """Segment every item (one mask PNG each, plus a DICOM-SEG for a DICOM input) into ``out``.

    ``engine``: ``torch`` or ``onnx`` (:func:`medsam2.steps.load_engine`); ``precision``:
    ``auto``/``fp32``/``bf16``/``int8`` (with ``onnx``, ``int8`` runs the export's
    quantised graphs; with ``torch``, the encoder's Linears in int8 where faster,
    :func:`medsam2.engine.runtime.int8_twin`).

    Returns ``{"model", "outputs": [one entry per item, in order], "n_inputs", "n_ok", "n_failed"}``; an entry is
    ``{"input", "status": "ok", "mask_png", "iou_pred", "foreground_fraction", "frames"[, "box", "dicom_seg"]}``
    or ``{"input", "status": "failed", "error", "kind", "hint"}``: a failing input does not stop the batch.
    With a ``calibration`` (:mod:`medsam2.eval.calibration`) an ok entry also has ``confidence`` (the expected
    Dice of its mask, in [0, 1]) and ``needs_review`` (confidence below the calibration's threshold).
    """
    from medsam2.engine.predict import FeatureCache
    from medsam2.errors import describe
    from medsam2.steps import load_engine

    net, cleanup = load_engine(model, engine, precision)
    mode = net.cfg.prompt
    cache = FeatureCache(size=4)  # several prompts on one image (a prompts file's rows) encode it once
    out.mkdir(parents=True, exist_ok=True)
    outputs = []
    try:
        for item, stem in zip(items, _stems(items), strict=True):
            try:
                entry = _one(net, mode, item, out, stem, cache, precision,
                             agreement=calibration is not None and calibration.needs_flip)
                if calibration is not None:
                    entry["confidence"] = float(calibration.confidence(
                        [entry["iou_pred"]], entry.get("flip_agreement"), entry.get("stability"))[0])
                    entry["needs_review"] = bool(entry["confidence"] < calibration.flag_threshold)
                outputs.append(entry)
            except Exception as e:  # noqa: BLE001 - reported for this input; the batch goes on
                report = describe(e)
                if report.kind == "usage":  # a ValueError of a bad prompt is this input's data, not a wrong option
                    report = type(report)(report.error, "input", None)
                outputs.append({"input": item.label, "status": "failed", **report.to_dict()})
    finally:
        cleanup()
    n_ok = sum(o["status"] == "ok" for o in outputs)
    return {"model": model, "engine": engine, "outputs": outputs, "n_inputs": len(outputs), "n_ok": n_ok,
            "n_failed": len(outputs) - n_ok}
