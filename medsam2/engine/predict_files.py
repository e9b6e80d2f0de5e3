"""``medsam2 predict``: files in, masks out — PNG masks for images, DICOM-SEG (highdicom) for DICOM inputs.

A DICOM-SEG references its source instance (same Study, Frame of Reference, ReferencedSeriesSequence), has
the source's frame geometry, one binary segment per prediction, and is written next to a PNG preview. Patient
identity stays inside the DICOM-SEG (it is the clinical output that goes back to the PACS) and is never logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medsam2.data.readers import read_image_any, sniff_kind
from medsam2.engine.predict import predict


def parse_box(text: str | None) -> np.ndarray | None:
    if not text:
        return None
    vals = [float(v) for v in text.replace(" ", "").split(",")]
    if len(vals) != 4:
        raise ValueError(f"--box needs x0,y0,x1,y1, got {text!r}")
    return np.array(vals, np.float32)


def parse_points(text: str | None) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """``"x,y[,label];x,y[,label]"`` → ((N,2) float32, (N,) int32); label defaults to 1 (foreground)."""
    if not text:
        return None, None
    pts, labels = [], []
    for item in text.split(";"):
        vals = [float(v) for v in item.split(",")]
        if len(vals) not in (2, 3):
            raise ValueError(f"point {item!r} is not x,y or x,y,label")
        pts.append(vals[:2])
        labels.append(int(vals[2]) if len(vals) == 3 else 1)
    return np.array(pts, np.float32), np.array(labels, np.int32)


def write_dicom_seg(source: Path, masks: list[np.ndarray], out_path: Path, label: str = "lesion") -> Path:
    """DICOM-SEG for ``source`` with one binary frame per source frame; returns the written path."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    import medsam2

    ds = pydicom.dcmread(source)
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="MedSAM2", version=medsam2.__version__, family=codes.cid7162.ArtificialIntelligence),
    )
    seg = hd.seg.Segmentation(
        source_images=[ds], pixel_array=np.stack(masks).astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[desc],
        series_instance_uid=hd.UID(), series_number=900, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="MedSAM2", manufacturer_model_name="MedSAM2", software_versions=medsam2.__version__,
        device_serial_number="medsam2",
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out_path)
    return out_path


def predict_files(model: str, inputs: list[Path], out: Path, *, box: str | None = None,
                  points: str | None = None) -> dict[str, Any]:
    from medsam2.steps import load_for_eval

    net, _ = load_for_eval(model)
    out.mkdir(parents=True, exist_ok=True)
    b = parse_box(box)
    pts, labels = parse_points(points)
    outputs = []
    for path in inputs:
        frames = _frames(path)
        preds = predict(net, frames, boxes=[b] * len(frames), points=[pts] * len(frames),
                        point_labels=[labels] * len(frames))
        masks = [p.mask for p in preds]
        png = out / f"{path.stem}_mask.png"
        Image.fromarray((masks[0] * 255).astype(np.uint8)).save(png)
        entry = {"input": str(path), "mask_png": str(png), "iou_pred": preds[0].iou_pred,
                 "foreground_fraction": float(masks[0].mean())}
        if sniff_kind(path) == "dicom":
            entry["dicom_seg"] = str(write_dicom_seg(path, masks, out / f"{path.stem}_seg.dcm"))
        outputs.append(entry)
    return {"model": model, "outputs": outputs}


def _frames(path: Path) -> list[np.ndarray]:
    if sniff_kind(path) == "dicom":
        from medsam2.data.dicom import decode_image

        return decode_image(path)[0]
    return [read_image_any(path)]
