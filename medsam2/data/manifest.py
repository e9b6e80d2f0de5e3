"""Manifest and quarantine tables: schema, atomic Parquet I/O, dataset versioning, the work-dir lock.

Work dir layout (the contract the trainer, the validator and the CLI rely on)::

    workdir/manifest.parquet         one row per image (or per frame / slice / structure), MANIFEST_COLUMNS
    workdir/quarantine.parquet       one row per rejected input, QUARANTINE_COLUMNS
    workdir/cache/<image_id>.npy     uint8 (H, W, 3) RGB, windowed once at ingest (grey replicated to 3
    channels)
    workdir/cache/<image_id>.mask.npy  uint8 (H, W) in {0, 1}; only when label_kind == "mask"
    workdir/.salt                    de-identification salt (created once, mode 0600)
    workdir/.statcache.json          (path, size, mtime) -> sha256, so unchanged files are not re-hashed
    workdir/.lock                    fcntl lock serialising concurrent ingests

Every write is atomic: a temp file in the same directory, fsync, ``os.replace``. Readers never see a
half-written file, and a process killed mid-ingest leaves the previous consistent state (plus orphan cache
files that the next ingest removes).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

MANIFEST_NAME = "manifest.parquet"
QUARANTINE_NAME = "quarantine.parquet"
CACHE_DIR = "cache"

#: Column -> pandas dtype. ``box`` holds a list of 4 ints ``[x0, y0, x1, y1]`` in pixel coords of the cached
#: image, x1/y1 exclusive (``0 <= x0 < x1 <= width``, as in Kvasir's bbox JSON), or None. ``flags`` is a
# comma-separated sorted string
#: (e.g. ``"binarised,empty_mask"``; "" when none). ``meta`` is a JSON string of safe technical header fields
#: (never PHI). ``frame`` is the frame / slice index inside the source file, -1 for 2D files. ``target``
# names the
#: structure a mask shows (SAM-Med2D structure, DICOM-SEG segment label, NIfTI label) or is None.
#: ``pixel_sha256`` / ``mask_pixel_sha256`` hash the decoded cache arrays (content identity independent of the
#: file encoding). ``split_bucket`` (0-999) is the patient's val bucket (see splits.py). ``unit_key`` /
#: ``unit_fingerprint`` identify the source files a row came from and their content (incremental ingest).
#: Volume rows (NIfTI slices, the frames of a multi-frame DICOM, the files of one DICOM series) share a
#: ``volume_id`` (a hash: never a UID) and carry their ``slice_index`` (0-based, in position order), the
#: ``spacing_mm`` [between slices, between rows, between columns] and the ``orientation`` of the stored slices'
#: (column, row, slice) axes in patient space (``RAS`` for NIfTI slices as ingest stores them, ``LPS``-based
#: DICOM geometry as ``dicom``); 2-D rows have None / NA there. :func:`index_volumes` orders a DICOM series.
MANIFEST_COLUMNS: dict[str, str] = {
    "image_id": "string",
    "dataset": "string",
    "patient_id": "string",
    "modality": "string",
    "image_uri": "string",
    "mask_uri": "string",
    "label_kind": "string",
    "box": "object",
    "split": "string",
    "width": "int64",
    "height": "int64",
    "sha256": "string",
    "mask_sha256": "string",
    "source_uri": "string",
    "mask_source_uri": "string",
    "frame": "int64",
    "target": "string",
    "mask_fraction": "float64",
    "intensity_mean": "float64",
    "intensity_std": "float64",
    "pixel_sha256": "string",
    "mask_pixel_sha256": "string",
    "split_bucket": "int64",
    "flags": "string",
    "meta": "string",
    "unit_key": "string",
    "unit_fingerprint": "string",
    "ingested_at": "string",
    "volume_id": "string",
    "slice_index": "Int64",
    "spacing_mm": "object",
    "orientation": "string",
}

QUARANTINE_COLUMNS: dict[str, str] = {
    "source_uri": "string",
    "reason": "string",
    "detail": "string",
    "dataset": "string",
    "detected_at": "string",
    "unit_key": "string",
    "unit_fingerprint": "string",
}

LABEL_KINDS = ("mask", "box", "image", "none")
SPLITS = ("train", "val", "test")
MODALITIES = (
    "endoscopy",
    "ultrasound",
    "CT",
    "MR",
    "MG",
    "DX",
    "CR",
    "RG",
    "XA",
    "PT",
    "NM",
    "OT",
    "US",
    "SM",
    "OCT",
    "fundus",
    "dermoscopy",
    "microscopy",
    "other",
)


def _empty(columns: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in columns.items()})


def _conform(df: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """Column order and dtypes of the schema; extra columns are kept at the end."""
    df = df.copy()
    for c, t in columns.items():
        if c not in df.columns:
            df[c] = pd.Series([None] * len(df), dtype=t if t != "object" else "object")
    for c, t in columns.items():
        if t == "object":
            continue
        df[c] = df[c].astype(t)
    extra = [c for c in df.columns if c not in columns]
    return df[list(columns) + extra].reset_index(drop=True)


def _read(path: Path, columns: dict[str, str]) -> pd.DataFrame:
    if not path.exists():
        return _empty(columns)
    # one read of the bytes: a concurrent os.replace can never mix two versions of the file
    df = pd.read_parquet(io.BytesIO(path.read_bytes()))
    if "box" in df.columns:
        df["box"] = df["box"].map(lambda b: None if b is None else [int(v) for v in b])
    if "spacing_mm" in df.columns:  # Parquet gives arrays back: lists, as the rows were written
        df["spacing_mm"] = df["spacing_mm"].map(
            lambda s: None if s is None else [None if v is None or v != v else float(v) for v in s])
    return _conform(df, columns)


def read_manifest(workdir: str | Path) -> pd.DataFrame:
    """The manifest as a DataFrame with MANIFEST_COLUMNS (empty, right columns, if there is none yet)."""
    return _read(Path(workdir) / MANIFEST_NAME, MANIFEST_COLUMNS)


def read_quarantine(workdir: str | Path) -> pd.DataFrame:
    """The quarantine table (QUARANTINE_COLUMNS); empty if nothing was ever rejected."""
    return _read(Path(workdir) / QUARANTINE_NAME, QUARANTINE_COLUMNS)


def write_table(df: pd.DataFrame, path: Path, columns: dict[str, str]) -> None:
    """Atomically write ``df`` (conformed to ``columns``) as Parquet."""
    df = _conform(df, columns)
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + ``os.replace`` (readers see old or new, never half).

    ``fsync=False`` (cache files) skips the per-file fsync; the ingest calls ``os.sync()`` once before it
    writes a manifest that references them, so durability ordering is kept at a fraction of the cost.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)  # the rename itself must survive a power loss too
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save_npy(path: str | Path, arr: np.ndarray, *, fsync: bool = True) -> None:
    """``np.save`` atomically; the result is memory-mappable with ``np.load(path, mmap_mode="r")``."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue(), fsync=fsync)


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so that renames inside it are durable."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def box_key(box: Any) -> list[int] | None:
    if box is None or (isinstance(box, float) and np.isnan(box)):
        return None
    return [int(v) for v in box]


def _opt(v: Any) -> Any:
    return None if v is None or (not isinstance(v, (list, np.ndarray)) and pd.isna(v)) else v


SPLIT_PRECEDENCE = ("test", "val", "train")


def index_volumes(df: pd.DataFrame) -> pd.DataFrame:
    """Volume rows made whole: a DICOM series' slices (rows with a ``volume_id``, no ``slice_index`` and a
    ``slice_position_mm`` in ``meta``) get their index in position order and the spacing between slices; and
    every volume gets one split (the first of test, val, train among its slices: a volume never straddles
    splits, and a test slice never lets its neighbours train). Returns a copy."""
    df = df.copy()
    if "volume_id" not in df.columns or not df["volume_id"].notna().any():
        return df
    for _, idx in df[df["volume_id"].notna()].groupby("volume_id").groups.items():
        part = df.loc[idx]
        splits = set(part["split"].dropna())
        if len(splits) > 1:
            df.loc[idx, "split"] = next(s for s in SPLIT_PRECEDENCE if s in splits)
        if part["slice_index"].notna().all():
            continue
        pos = part["meta"].map(lambda m: json.loads(m or "{}").get("slice_position_mm"))
        if pos.isna().any():
            continue
        ranks = pos.rank(method="dense").astype(int) - 1
        df.loc[idx, "slice_index"] = ranks.to_numpy()
        gaps = np.diff(np.unique(pos.to_numpy(dtype=float)))
        step = float(np.median(gaps)) if len(gaps) else None
        df.loc[idx, "spacing_mm"] = pd.Series([[step, *(sp or [None, None, None])[1:]] for sp in part["spacing_mm"]],
                                              index=idx, dtype=object)
    return df


def dataset_version(df: pd.DataFrame) -> str:
    """Short hex identity of the labelled set.

    sha256 over the sorted ``(image_id, sha256, mask_sha256, label_kind, box, split)`` tuples of the rows with
    ``label_kind != "none"``; 16 hex chars. Unlabelled rows, timestamps and statistics do not count, so a
    re-ingest of unchanged data keeps the version, while a new/changed mask, box or split changes it.
    """
    if df is None or len(df) == 0:
        rows: list[list[Any]] = []
    else:
        lab = df[df["label_kind"] != "none"]
        rows = sorted(
            [
                str(r.image_id),
                str(r.sha256),
                _opt(r.mask_sha256),
                str(r.label_kind),
                box_key(_opt(r.box)),
                str(r.split),
            ]
            for r in lab.itertuples(index=False)
        )
    blob = json.dumps(rows, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@contextlib.contextmanager
def workdir_lock(workdir: str | Path, *, timeout_s: float | None = None) -> Iterator[None]:
    """Exclusive ``fcntl`` lock on ``workdir/.lock``; concurrent ingests into one work dir run one after
    another.

    The lock is released by the kernel if the holder dies (kill -9 included), so a crash never leaves it
    stuck.
    """
    import time

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(workdir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if timeout_s is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"work dir {workdir} is locked by another ingest") from None
                    time.sleep(0.1)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
