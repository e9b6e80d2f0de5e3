"""The labelling queue ``medsam2 suggest`` writes: what to label next, with the model's masks to start from.

Layout of ``out/``::

    queue.csv          rank, image_id, dataset, source, score, iou_pred, foreground_fraction (one row per image)
    labelstudio.json   Label Studio import: one task per image, the model's mask as a brush pre-annotation
    labelstudio_config.xml  the labelling config the tasks' results refer to (``tag`` → ``image``)
    images/<stem>.png  the image as ingested (windowed, RGB): what the task shows
    overlays/<stem>.png  the image with the predicted mask tinted red and outlined
    dicom_seg/<stem>.dcm  a draft DICOM-SEG (DICOM items whose source file is readable here)
    queue.json         the score, model, counts and each item's files

``<stem>`` is ``<rank, 3 digits>_<image_id>``. A task's image URL is Label Studio's local-files form,
``/data/local-files/?d=<out's folder name>/images/<stem>.png``: serve it by starting Label Studio with
``LOCAL_FILES_SERVING_ENABLED=true`` and ``LOCAL_FILES_DOCUMENT_ROOT`` = the folder above ``out`` (or pass
``image_url_prefix``). ``data.medsam2_id`` keeps the manifest id, so an export maps back to its row.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from medsam2.data.dataset import load_cached
from medsam2.data.dicom_seg import write_dicom_seg
from medsam2.data.labelstudio import LABEL_CONFIG, task
from medsam2.data.readers import sniff_kind

from .pool import Suggested


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """(H,W,3) uint8 image with the (H,W) bool mask tinted red (``alpha`` opacity) and its outline drawn."""
    out = image.astype(np.float32).copy()
    red = np.array([255, 0, 0], np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * red
    out = out.clip(0, 255).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, (255, 255, 0), max(1, round(min(mask.shape) / 200)))
    return out


def _stem(rank: int, image_id: str) -> str:
    return f"{rank:03d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', str(image_id))}"


def is_dicom_row(row: pd.Series) -> bool:
    """A row read from a DICOM instance (its ``meta`` holds the SOP class, which only DICOM headers give)."""
    meta = row.get("meta")
    return isinstance(meta, str) and '"SOPClassUID"' in meta


def _dicom_seg(row: pd.Series, mask: np.ndarray, path: Path) -> tuple[str | None, str | None]:
    """A draft SEG for a DICOM row whose source file is readable here: (path, None), or (None, why not)."""
    src = str(row.get("source_uri") or "")
    src_path = Path(src[7:] if src.startswith("file://") else src)
    if not src_path.is_file() or sniff_kind(src_path) != "dicom":
        return None, "the source DICOM is not readable here (remote, or its path was de-identified)"
    import pydicom

    n = int(getattr(pydicom.dcmread(src_path, stop_before_pixels=True), "NumberOfFrames", 1) or 1)
    frame = max(0, int(row.get("frame", -1)))
    frames = [mask if k == frame else np.zeros_like(mask) for k in range(n)]
    return str(write_dicom_seg(src_path, frames, path)), None


def write_queue(items: list[Suggested], workdir: str | Path, out: str | Path, *, score: str, model: str,
                label: str = "lesion", image_url_prefix: str | None = None) -> dict[str, Any]:
    """Write the queue of ``items`` (ranked, from :func:`~medsam2.active.pool.rank_pool`) into ``out``; returns
    ``queue.json``'s content (``score``, ``model``, ``n``, ``files`` and ``items``, one dict per image)."""
    workdir, out = Path(workdir), Path(out)
    for sub in ("images", "overlays"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    prefix = image_url_prefix if image_url_prefix is not None else f"/data/local-files/?d={out.name}/images/"
    rows, tasks, entries = [], [], []
    for it in items:
        image = np.asarray(load_cached(workdir, it.row)[0])
        image_id = str(it.row["image_id"])
        stem = _stem(it.rank, image_id)
        Image.fromarray(image).save(out / "images" / f"{stem}.png")
        Image.fromarray(overlay(image, it.pred.mask)).save(out / "overlays" / f"{stem}.png")
        entry = {"rank": it.rank, "image_id": image_id, "dataset": str(it.row["dataset"]),
                 "source": str(it.row["source_uri"]), "score": it.score, "iou_pred": it.pred.iou_pred,
                 "foreground_fraction": float(it.pred.mask.mean())}
        rows.append(dict(entry))
        files = {"image": f"images/{stem}.png", "overlay": f"overlays/{stem}.png"}
        if is_dicom_row(it.row):
            seg, why = _dicom_seg(it.row, it.pred.mask, out / "dicom_seg" / f"{stem}.dcm")
            if seg is not None:
                files["dicom_seg"] = str(Path(seg).relative_to(out))
            else:
                entry["dicom_seg_skipped"] = why
        tasks.append(task(prefix + f"{stem}.png", it.pred.mask, image_id=image_id, label=label,
                          model_version=model, score=it.score, extra={"rank": it.rank}))
        entries.append({**entry, "files": files})
    pd.DataFrame(rows, columns=["rank", "image_id", "dataset", "source", "score", "iou_pred",
                                "foreground_fraction"]).to_csv(out / "queue.csv", index=False)
    (out / "labelstudio.json").write_text(json.dumps(tasks))
    (out / "labelstudio_config.xml").write_text(LABEL_CONFIG.format(label=label))
    summary = {"score": score, "model": model, "n": len(items), "out": str(out),
               "files": {"csv": "queue.csv", "labelstudio": "labelstudio.json",
                         "labelstudio_config": "labelstudio_config.xml"},
               "items": entries}
    (out / "queue.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
