"""Labels coming back: a folder of masks, or a Label Studio export JSON, ingested as labels of images already in
the work dir (``medsam2 ingest SRC --labels``; a ``.json`` source is a Label Studio export).

**Matching.** A mask file's stem (less a ``_mask`` suffix) or a task's ``data.medsam2_id`` (written by
``medsam2 suggest``; else the stem of ``data.image``) names its image: the ``image_id`` itself, a queue stem
``<rank>_<image_id>``, or the stem of one row's source file.

**Checks** (a failing label goes to the quarantine table with its reason, under dataset ``labels:<source
name>``; the others are kept): the file decodes to a binary mask (the ingest's own readers and
``binarise_mask``: ``non_binary_mask``, ``unreadable``, …); ``unknown_image`` (no row matches);
``label_for_test_row`` (the frozen test split never changes); ``already_labelled`` (the row has a mask from
its own source, which is not overwritten); ``label_shape_mismatch`` (not the image's H×W); ``duplicate_label``
(a second label for one image in one source); ``no_annotation`` (a task without a submitted annotation).

**Storage.** An accepted mask is ``labels/<image_id>.mask.npy`` (uint8 (H,W) {0,1}) and a row of
``labels.parquet`` (image id, the ``pixel_sha256`` of the image it was drawn on, mask hash, source). The
manifest row becomes ``label_kind`` mask with ``flags`` + ``returned_label``, so the dataset version — and with
it ``retrain-check`` and the ``ingest-data`` flow's ``medsam2.labels.arrived`` event — sees the new labels. Every
ingest re-applies the table (:func:`reapply_labels`), so re-ingesting the image source keeps them; a label whose
image's pixels changed since is stale and no longer applies.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from medsam2.data.labelstudio import rle_to_mask
from medsam2.data.ledger import IngestResult
from medsam2.data.manifest import (
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    QUARANTINE_COLUMNS,
    QUARANTINE_NAME,
    _read,
    atomic_save_npy,
    dataset_version,
    read_manifest,
    read_quarantine,
    workdir_lock,
    write_table,
)
from medsam2.data.process import _sha_arr
from medsam2.data.readers import QuarantineError, binarise_mask, ext_of, read_npy, read_raster, stem_of
from medsam2.errors import InputDataError

LABELS_DIR = "labels"
LABELS_TABLE = "labels.parquet"
RETURNED_FLAG = "returned_label"
LABEL_COLUMNS: dict[str, str] = {"image_id": "string", "pixel_sha256": "string", "mask_uri": "string",
                                 "mask_sha256": "string", "mask_pixel_sha256": "string", "source_uri": "string",
                                 "received_at": "string"}
_MASK_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy")
_QUEUE_STEM = re.compile(r"^\d{3}_(.+)$")


@dataclass
class Candidate:
    """One label read from the source: where it came from, which image it names, the mask or why not."""

    uri: str
    ref: str
    mask: np.ndarray | None = None
    reason: str | None = None
    detail: str = ""
    flags: list[str] = field(default_factory=list)


def read_mask_folder(root: Path) -> list[Candidate]:
    out = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name.startswith(".") or ext_of(p.name) not in _MASK_EXTS:
            continue
        ref = re.sub(r"_mask$", "", stem_of(p.name))
        try:
            arr = read_npy(p) if ext_of(p.name) == ".npy" else read_raster(p, as_mask=True)
            mask, flags = binarise_mask(arr)
            out.append(Candidate(str(p), ref, mask, flags=flags))
        except QuarantineError as e:
            out.append(Candidate(str(p), ref, reason=e.reason, detail=e.detail))
    return out


def _annotation_mask(result: list[dict[str, Any]]) -> tuple[np.ndarray | None, tuple[int, int] | None]:
    """Union of a Label Studio annotation's brush and polygon regions → ((H,W) bool or None, (H,W) or None)."""
    mask, hw = None, None
    for r in result:
        kind = str(r.get("type", "")).lower()
        if kind not in ("brushlabels", "polygonlabels"):
            continue
        h, w = int(r["original_height"]), int(r["original_width"])
        hw = (h, w)
        mask = np.zeros((h, w), bool) if mask is None else mask
        if mask.shape != (h, w):
            raise ValueError(f"regions of one annotation disagree on the image size ({mask.shape} vs {(h, w)})")
        value = r.get("value", {})
        if kind == "brushlabels":
            mask |= rle_to_mask(value["rle"], h, w)
        else:  # polygon points in percent of the image
            pts = np.array([[x * w / 100.0, y * h / 100.0] for x, y in value["points"]], np.float64)
            poly = np.zeros((h, w), np.uint8)
            cv2.fillPoly(poly, [np.round(pts).astype(np.int32)], 1)
            mask |= poly.astype(bool)
    return mask, hw


def read_labelstudio_export(path: Path) -> list[Candidate]:
    """Candidates from a Label Studio JSON export: per task its last submitted (not cancelled) annotation."""
    try:
        tasks = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputDataError(f"{path} is not a readable Label Studio export: {e}",
                             "export the project as JSON") from None
    if not isinstance(tasks, list):
        raise InputDataError(f"{path} is not a Label Studio export (a JSON list of tasks)", "export as JSON")
    out = []
    for k, t in enumerate(tasks):
        data = t.get("data", {}) if isinstance(t, dict) else {}
        ref = str(data.get("medsam2_id") or stem_of(str(data.get("image", "")).rsplit("/", 1)[-1].split("?")[0]))
        uri = f"{path}#task={t.get('id', k) if isinstance(t, dict) else k}"
        done = [a for a in (t.get("annotations") or []) if not a.get("was_cancelled")] if isinstance(t, dict) else []
        if not done:
            out.append(Candidate(uri, ref, reason="no_annotation", detail="no submitted annotation"))
            continue
        try:
            mask, _ = _annotation_mask(done[-1].get("result") or [])
        except (KeyError, ValueError, TypeError) as e:
            out.append(Candidate(uri, ref, reason="unreadable", detail=f"{type(e).__name__}: {e}"[:200]))
            continue
        # no region drawn: the annotator says there is nothing to segment; the image's size is checked later
        out.append(Candidate(uri, ref, mask, flags=[] if mask is not None else ["no_region"]))
    return out


def _match(ref: str, df: pd.DataFrame, by_stem: dict[str, list[int]]) -> int | None:
    ids = {v: i for i, v in enumerate(df["image_id"])}
    for key in (ref, m.group(1) if (m := _QUEUE_STEM.match(ref)) else None):
        if key is not None and key in ids:
            return ids[key]
    hits = by_stem.get(ref, [])
    return hits[0] if len(hits) == 1 else None


def _has_own_mask(row: pd.Series) -> bool:
    own = isinstance(row["mask_uri"], str) and bool(row["mask_uri"])
    return own and RETURNED_FLAG not in str(row.get("flags") or "").split(",")


def apply_labels(df: pd.DataFrame, table: pd.DataFrame, workdir: Path) -> pd.DataFrame:
    """The manifest ``df`` with every label of ``table`` applied to its row (same image id and pixels, no mask
    of its own); returns a new frame."""
    df = df.copy()
    pos = {v: i for i, v in enumerate(df["image_id"])}
    for lab in table.to_dict("records"):
        i = pos.get(lab["image_id"])
        if i is None or df.at[i, "pixel_sha256"] != lab["pixel_sha256"] or _has_own_mask(df.iloc[i]):
            continue
        if not (workdir / lab["mask_uri"]).is_file():
            continue
        mask = np.load(workdir / lab["mask_uri"])
        flags = {f for f in str(df.at[i, "flags"] or "").split(",") if f and f != "empty_mask"} | {RETURNED_FLAG}
        if not mask.any():
            flags.add("empty_mask")
        df.loc[i, ["mask_uri", "label_kind", "mask_sha256", "mask_pixel_sha256", "mask_source_uri", "flags"]] = [
            lab["mask_uri"], "mask", lab["mask_sha256"], lab["mask_pixel_sha256"], lab["source_uri"],
            ",".join(sorted(flags))]
        df.loc[i, "mask_fraction"] = float(mask.mean())
    return df


def read_labels_table(workdir: Path) -> pd.DataFrame:
    return _read(Path(workdir) / LABELS_TABLE, LABEL_COLUMNS)


def reapply_labels(workdir: str | Path) -> bool:
    """Apply ``labels.parquet`` to the manifest again (after an ingest rebuilt rows); True if it changed it.
    The caller holds the work-dir lock."""
    workdir = Path(workdir)
    table = read_labels_table(workdir)
    if table.empty:
        return False
    df = read_manifest(workdir)
    new = apply_labels(df, table, workdir)
    if dataset_version(new) == dataset_version(df):
        return False
    write_table(new, workdir / MANIFEST_NAME, MANIFEST_COLUMNS)
    return True


def ingest_labels(source: str | Path, workdir: str | Path) -> IngestResult:
    """Ingest the labels of ``source`` (a folder of masks, or a Label Studio export ``.json``) into ``workdir``
    (see the module docstring). Returns the ingest's counts: ``added`` (new labels), ``updated`` (a returned
    label replaced), ``quarantined`` by reason, ``dataset_version`` and ``labels_changed``."""
    src, workdir = Path(source), Path(workdir)
    if not (workdir / MANIFEST_NAME).is_file():
        raise InputDataError(f"no manifest in {workdir}: labels need the images ingested first",
                             f"medsam2 ingest IMAGES --workdir {workdir}, then the labels")
    if src.is_file() and src.suffix.lower() == ".json":
        candidates = read_labelstudio_export(src)
    elif src.is_dir():
        candidates = read_mask_folder(src)
    else:
        raise InputDataError(f"label source {src} is neither a folder of masks nor a Label Studio export .json",
                             "give a folder of mask files or the project's JSON export")
    name = f"labels:{src.stem if src.is_file() else src.name}"
    now = datetime.now(UTC).isoformat(timespec="seconds")
    with workdir_lock(workdir):
        df, table = read_manifest(workdir), read_labels_table(workdir)
        previous = dataset_version(df)
        stems: dict[str, list[int]] = {}
        for i, uri in enumerate(df["source_uri"]):
            stems.setdefault(stem_of(str(uri).rsplit("/", 1)[-1]), []).append(i)
        kept: dict[str, dict[str, Any]] = {}
        qrows: list[dict[str, Any]] = []

        def reject(c: Candidate, reason: str, detail: str) -> None:
            qrows.append({"source_uri": c.uri, "reason": reason, "detail": detail, "dataset": name,
                          "detected_at": now, "unit_key": c.uri, "unit_fingerprint": ""})

        for c in candidates:
            if c.reason is not None:
                reject(c, c.reason, c.detail)
                continue
            i = _match(c.ref, df, stems)
            if i is None:
                reject(c, "unknown_image", f"no image {c.ref!r} in the work dir")
                continue
            row = df.iloc[i]
            h, w = int(row["height"]), int(row["width"])
            mask = np.zeros((h, w), bool) if c.mask is None else c.mask.astype(bool)
            if row["split"] == "test":
                reject(c, "label_for_test_row", f"{row['image_id']} is in the frozen test split")
            elif _has_own_mask(row):
                reject(c, "already_labelled", f"{row['image_id']} has a mask from its source")
            elif mask.shape != (h, w):
                reject(c, "label_shape_mismatch", f"mask {mask.shape[0]}x{mask.shape[1]}, image {h}x{w}")
            elif row["image_id"] in kept:
                first = kept[row["image_id"]]["source_uri"]
                reject(c, "duplicate_label", f"a second label for {row['image_id']} (first: {first})")
            else:
                u8 = mask.astype(np.uint8)
                uri = f"{LABELS_DIR}/{row['image_id']}.mask.npy"
                atomic_save_npy(workdir / uri, u8)
                kept[row["image_id"]] = {"image_id": row["image_id"], "pixel_sha256": row["pixel_sha256"],
                                         "mask_uri": uri, "mask_sha256": _sha_arr(u8),
                                         "mask_pixel_sha256": _sha_arr(u8), "source_uri": c.uri, "received_at": now}
        before = set(table["image_id"])
        table = pd.concat([table[~table["image_id"].isin(kept)], pd.DataFrame(list(kept.values()))],
                          ignore_index=True).sort_values("image_id") if kept else table
        write_table(table, workdir / LABELS_TABLE, LABEL_COLUMNS)
        new = apply_labels(df, table, workdir)
        write_table(new, workdir / MANIFEST_NAME, MANIFEST_COLUMNS)
        q = read_quarantine(workdir)
        q = pd.concat([q[q["dataset"] != name], pd.DataFrame(qrows, columns=list(QUARANTINE_COLUMNS))],
                      ignore_index=True)
        write_table(q, workdir / QUARANTINE_NAME, QUARANTINE_COLUMNS)
    res = IngestResult(dataset=name, source=str(src), workdir=str(workdir))
    res.added = len(set(kept) - before)
    res.updated = len(set(kept) & before)
    res.quarantined = dict(sorted(Counter(r["reason"] for r in qrows).items()))
    res.inputs_seen = res.files_seen = len(candidates)
    res.rows, res.labelled = len(new), int((new["label_kind"] == "mask").sum())
    res.previous_version, res.dataset_version = previous, dataset_version(new)
    res.labels_changed = res.dataset_version != res.previous_version
    return res
