"""The running record of one ingest (:class:`Ledger`) and its counts (:class:`IngestResult`).

The ledger starts from what the work dir holds and collects, unit by unit, the rows accepted and the quarantine
rows; :meth:`Ledger.checkpoint` writes manifest + quarantine (+ stat cache) atomically, with this dataset's
earlier rows standing in for the units not done yet, so that a killed ingest resumes where it was.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from medsam2.data import layouts as L
from medsam2.data.manifest import (
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    QUARANTINE_COLUMNS,
    QUARANTINE_NAME,
    dataset_version,
    index_volumes,
    read_manifest,
    read_quarantine,
    write_table,
)
from medsam2.data.source import Source
from medsam2.data.splits import DEFAULT_VAL_FRACTION, assign_splits

Row = dict[str, Any]

#: Row fields whose change makes an existing image_id count as ``updated``.
_CONTENT = (
    "sha256",
    "mask_sha256",
    "label_kind",
    "box",
    "pixel_sha256",
    "mask_pixel_sha256",
    "modality",
    "patient_id",
    "target",
    "width",
    "height",
)


@dataclass
class IngestResult:
    """Counts of one ingest. ``quarantined`` maps reason → count for this dataset (current state)."""

    dataset: str
    source: str
    workdir: str
    added: int = 0
    unchanged: int = 0
    updated: int = 0
    removed: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    rows: int = 0
    dataset_rows: int = 0
    inputs_seen: int = 0
    ignored: int = 0
    ignored_files: list[str] = field(default_factory=list)
    files_seen: int = 0
    """Files in the source listing: each is a manifest row, a quarantine row or ignored (checked)."""
    labelled: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    dataset_version: str = ""
    previous_version: str = ""
    labels_changed: bool = False
    decoded_units: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (what ``medsam2 ingest --json`` prints)."""
        d = asdict(self)
        d["quarantined_total"] = int(sum(self.quarantined.values()))
        return d


def _same(a: Row, b: Row) -> bool:
    def norm(v: Any) -> Any:
        if v is None or (isinstance(v, float) and pd.isna(v)) or v is pd.NA:
            return None
        return list(map(int, v)) if isinstance(v, (list, tuple)) or hasattr(v, "tolist") else v

    return all(norm(a.get(k)) == norm(b.get(k)) for k in _CONTENT)


def _by_unit(rows: Iterable[Row]) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {}
    for r in rows:
        out.setdefault(r["unit_key"], []).append(r)
    return out


def _not_in(by_unit: dict[str, list[Row]], done: set[str]) -> list[Row]:
    return [r for k, rs in by_unit.items() if k not in done for r in rs]


class Ledger:
    """The running accepted / quarantined / checkpointed record of one dataset's ingest into a work dir.

    Before: ``others`` and ``others_q`` (the other datasets' manifest and quarantine rows, kept as they are),
    ``old_rows`` (this dataset's earlier rows by ``image_id``), ``old_by_unit`` and ``oldq_by_unit`` (its
    earlier rows and quarantine rows by unit key), ``previous_version`` (the work dir's dataset version).
    This run: ``rows_by_unit`` (accepted rows) and ``q_by_unit`` (quarantine rows) by unit key, ``reused``
    (units whose earlier rows are kept as they were, see ``check_accounting``), ``counts`` (rows added /
    unchanged / updated), ``now`` (the ``ingested_at`` / ``detected_at`` of what is new). The manifest is
    checkpointed every ``MEDSAM2_INGEST_CHECKPOINT_S`` seconds (default 15).
    """

    def __init__(self, src: Source, workdir: Path, dataset: str, opts: dict[str, Any], test_stems: set[str]) -> None:
        self.now = datetime.now(UTC).isoformat(timespec="seconds")
        self.src, self.workdir, self.dataset, self.opts, self.test_stems = src, workdir, dataset, opts, test_stems
        old, oldq = read_manifest(workdir), read_quarantine(workdir)
        self.previous_version = dataset_version(old)
        self.others, self.others_q = old[old["dataset"] != dataset], oldq[oldq["dataset"] != dataset]
        self.old_rows: dict[str, Row] = {r["image_id"]: r for r in old[old["dataset"] == dataset].to_dict("records")}
        self.old_by_unit = _by_unit(self.old_rows.values())
        self.oldq_by_unit = _by_unit(oldq[oldq["dataset"] == dataset].to_dict("records"))
        self.rows_by_unit: dict[str, list[Row]] = {}
        self.q_by_unit: dict[str, list[Row]] = {}
        self.reused: set[str] = set()
        self.counts: Counter[str] = Counter()
        self._every = float(os.environ.get("MEDSAM2_INGEST_CHECKPOINT_S", "15"))
        self._last_checkpoint = time.monotonic()

    def qrow(self, u: L.Unit, rel: str, reason: str, detail: str, fp: str) -> Row:
        """A quarantine row for file ``rel`` of unit ``u``; it keeps its ``detected_at`` if it was there before."""
        uri = self.src.ref(rel)
        prev = next(
            (p for p in self.oldq_by_unit.get(u.key, []) if p["source_uri"] == uri and p["reason"] == reason), None
        )
        return {
            "source_uri": uri,
            "reason": reason,
            "detail": detail,
            "dataset": self.dataset,
            "detected_at": prev["detected_at"] if prev else self.now,
            "unit_key": u.key,
            "unit_fingerprint": fp,
        }

    def quarantine(self, u: L.Unit, rel: str, reason: str, detail: str, fp: str = "") -> None:
        """Reject unit ``u`` as a whole, with one quarantine row for its file ``rel``."""
        self.q_by_unit[u.key] = [self.qrow(u, rel, reason, detail, fp)]

    def reuse(self, u: L.Unit, fp: str) -> tuple[list[Row], list[Row]] | None:
        """Copies of the earlier (rows, quarantine rows) of ``u`` when they can be kept as they are — there are
        some, all of fingerprint ``fp``, and their cache files exist — marking ``u`` as reused; else None."""
        prev, prevq = self.old_by_unit.get(u.key, []), self.oldq_by_unit.get(u.key, [])
        if not (prev or prevq) or any(r["unit_fingerprint"] != fp for r in prev + prevq):
            return None
        wd = self.workdir
        for r in prev:
            if not (wd / r["image_uri"]).exists():
                return None
            if not (r["mask_uri"] is None or pd.isna(r["mask_uri"]) or (wd / r["mask_uri"]).exists()):
                return None
        self.reused.add(u.key)
        return [dict(r) for r in prev], [dict(r) for r in prevq]

    def accept(self, row: Row, reused: bool) -> None:
        """Count an accepted row as added, unchanged or updated (the caller files it with :meth:`record`)."""
        before = self.old_rows.get(row["image_id"])
        self.counts["added" if before is None else ("unchanged" if reused or _same(before, row) else "updated")] += 1

    def record(self, u: L.Unit, rows: list[Row], qrows: list[Row]) -> None:
        """File the outcome of unit ``u``, then checkpoint if the last one is older than the interval."""
        self.rows_by_unit[u.key] = rows
        if qrows:
            self.q_by_unit[u.key] = qrows
        if time.monotonic() - self._last_checkpoint > self._every:
            self.checkpoint()
            self._last_checkpoint = time.monotonic()

    def checkpoint(self, final: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, list[Row]]:
        """Write manifest, quarantine and stat cache: the other datasets' rows, this run's rows and (unless
        ``final``) this dataset's earlier rows of the units not done yet. Returns (the manifest, this
        dataset's rows with their splits, this dataset's quarantine rows)."""
        done = set(self.rows_by_unit) | set(self.q_by_unit)
        new = [r for rs in self.rows_by_unit.values() for r in rs] + ([] if final else _not_in(self.old_by_unit, done))
        mdf = pd.DataFrame(new, columns=list(MANIFEST_COLUMNS)) if new else pd.DataFrame(columns=list(MANIFEST_COLUMNS))
        if len(mdf):
            mdf["split"] = assign_splits(
                mdf,
                test_stems=self.test_stems,
                dataset_split=self.opts.get("split"),
                val_fraction=float(self.opts.get("val_fraction", DEFAULT_VAL_FRACTION)),
            ).values
            mdf = index_volumes(mdf)  # a DICOM series' slice order; one split per volume
        full = pd.concat([self.others, mdf], ignore_index=True) if len(self.others) else mdf
        full = full.sort_values("image_id", kind="stable").reset_index(drop=True)
        qrows = [r for rs in self.q_by_unit.values() for r in rs] + ([] if final else _not_in(self.oldq_by_unit, done))
        qdf = pd.DataFrame(qrows, columns=list(QUARANTINE_COLUMNS))
        qfull = pd.concat([self.others_q, qdf], ignore_index=True) if len(self.others_q) else qdf
        qfull = qfull.sort_values(["dataset", "source_uri", "reason"], kind="stable").reset_index(drop=True)
        os.sync()  # cache files were written without fsync: make them durable before the manifest names them
        write_table(full, self.workdir / MANIFEST_NAME, MANIFEST_COLUMNS)
        write_table(qfull, self.workdir / QUARANTINE_NAME, QUARANTINE_COLUMNS)
        self.src.cache.save()
        return full, mdf, qrows

    def close(self, res: IngestResult) -> None:
        """The final checkpoint (this run's rows only), and its counts into ``res``."""
        full, mdf, qrows = self.checkpoint(final=True)
        res.previous_version = self.previous_version
        res.rows, res.dataset_rows = len(full), len(mdf)
        res.dataset_version = dataset_version(full)
        res.labels_changed = res.dataset_version != res.previous_version
        res.labelled = int((mdf["label_kind"] != "none").sum()) if len(mdf) else 0
        res.splits = {k: int(v) for k, v in mdf["split"].value_counts().items()} if len(mdf) else {}
        res.quarantined = dict(sorted(Counter(r["reason"] for r in qrows).items()))
        res.inputs_seen = len(mdf) + len(qrows)
        res.removed = len(set(self.old_rows) - set(mdf["image_id"])) if len(mdf) else len(self.old_rows)
        res.added, res.unchanged, res.updated = self.counts["added"], self.counts["unchanged"], self.counts["updated"]
