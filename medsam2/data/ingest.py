"""Ingest a source folder or ``s3://`` prefix into the work dir: manifest + uint8 cache + quarantine.

``ingest(source, workdir)`` is incremental, crash-safe and serialised:

* **Incremental.** Files are identified by ``(path, size, mtime)`` (S3: ``(key, size, ETag)``) through
  ``workdir/.statcache.json``; an unchanged file costs one ``stat`` (no read, no hash). A unit (an image with
  its labels, see layouts.py) whose fingerprint — sha256 of its files + options + :data:`INGEST_VERSION` — is
  unchanged keeps its rows and cache files; changed units are re-decoded (``updated``), new ones ``added``,
  vanished ones ``removed``. Splits are recomputed for the whole dataset every time (a pure function of the
  data).
* **Crash-safe.** Cache files and tables are written atomically; the manifest is checkpointed every
  ``MEDSAM2_INGEST_CHECKPOINT_S`` seconds (default 15). After ``kill -9`` the next run re-decodes only what
  was not checkpointed and yields the same manifest as an uninterrupted run (``ingested_at`` aside); orphan
  cache and temp files are removed.
* **Serialised.** An exclusive ``fcntl`` lock on ``workdir/.lock`` is held for the whole ingest.
* **Accounted.** Every input ends up as a manifest row or a quarantine row: ``inputs_seen = dataset rows +
  dataset quarantine rows``. Sidecar files (README, split lists, JSON maps) are not inputs; they are counted
  in ``ignored``. Duplicate content — the same file bytes at another path, or the same decoded image + mask as
  a row already accepted — is quarantined as ``duplicate_content`` (first path in sorted order wins); a second
  DICOM file with an already-seen SOPInstanceUID as ``duplicate_instance``, naming the first. At the end of
  every ingest :func:`check_accounting` checks, file by file, that each file listed is a row, a quarantine
  row or ignored, and raises :class:`~medsam2.errors.InternalError` otherwise.

* **No lost test split.** A dataset whose profile (or layout) names a frozen test list gets it from the source,
  else from the list shipped with the package (Kvasir-SEG: the PraNet list, as the official download has
  none); no list at all, or one naming none of the source's images, is a ``sidecars.TestListError`` (a
  ``FileNotFoundError``) saying which dataset and file and how to fix it — never a test split silently merged
  into train/val.

A dataset is one source: re-ingesting a dataset name replaces that dataset's rows with the source's current
state. Labels that came back from labelling (:mod:`medsam2.data.returned_labels`) are re-applied at the end.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from medsam2.data import layouts as L
from medsam2.data.dedup import Deduper, fingerprint
from medsam2.data.deid import load_salt
from medsam2.data.discover import Discovery, discover
from medsam2.data.ledger import IngestResult, Ledger
from medsam2.data.manifest import CACHE_DIR, dataset_version, read_manifest, workdir_lock
from medsam2.data.process import INGEST_VERSION, UnitOutput, dataset_prefix, process_unit
from medsam2.data.returned_labels import reapply_labels
from medsam2.data.source import Source, StatCache
from medsam2.data.storage import open_storage
from medsam2.errors import InternalError
from medsam2.services import check_s3

__all__ = [
    "INGEST_VERSION",
    "Discovery",
    "IngestResult",
    "Source",
    "StatCache",
    "check_accounting",
    "discover",
    "ingest",
]

log = logging.getLogger(__name__)


def ingest(
    source: str,
    workdir: str | Path,
    *,
    dataset: str | None = None,
    layout: str | dict | None = None,
    s3_endpoint_url: str | None = None,
    salt: str | None = None,
) -> IngestResult:
    """Ingest ``source`` (local folder or ``s3://bucket/prefix``) into ``workdir``; see the module docstring.

    dataset: manifest ``dataset`` value (default: the source folder's name, e.g. ``kvasir-seg``). layout: None
    (automatic pairing + the dataset's built-in profile), a profile name, a dict or a YAML path (see
    layouts.py). salt: de-identification salt (default ``$MEDSAM2_DEID_SALT`` or ``workdir/.salt``).
    """
    t0 = time.monotonic()
    if str(source).startswith("s3://"):  # a stopped MinIO is an answer in seconds, not after boto3's retries
        check_s3(s3_endpoint_url)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with workdir_lock(workdir), open_storage(source, s3_endpoint_url=s3_endpoint_url) as storage:
        dataset = dataset or storage.name
        opts = L.resolve_layout(dataset, layout)
        salt_value = load_salt(workdir, salt)
        _clean_temp(workdir)
        cache = StatCache(workdir / ".statcache.json", salt_value)
        src = Source(storage, storage.list(), cache)
        units, ignored, test_stems = discover(src, dataset, opts, salt_value)
        res = IngestResult(
            dataset=dataset,
            source=storage.uri,
            workdir=str(workdir),
            ignored=len(ignored),
            ignored_files=ignored[:50],
        )
        _run(src, workdir, dataset, units, opts, test_stems, res, ignored)
        cache.save()
    res.seconds = round(time.monotonic() - t0, 3)
    log.info(
        "ingest %s: %s", dataset, json.dumps({k: v for k, v in res.to_dict().items() if k != "ignored_files"})
    )
    return res


def _clean_temp(workdir: Path) -> None:
    for d in (workdir, workdir / CACHE_DIR):
        if d.is_dir():
            for p in d.glob(".*.tmp"):
                p.unlink(missing_ok=True)


def _run(
    src: Source,
    workdir: Path,
    dataset: str,
    units: list[L.Unit],
    opts: dict[str, Any],
    test_stems: set[str],
    res: IngestResult,
    ignored: list[str] | None = None,
) -> None:
    """Every unit into the ledger (checkpointed as it goes), the accounting checked, the final tables written,
    the counts into ``res``, and the cache files no row names removed."""
    ledger = Ledger(src, workdir, dataset, opts, test_stems)
    deduper = Deduper(ledger.others)
    for u in units:
        _ingest_unit(u, src, ledger, deduper, res)
    res.files_seen = check_accounting(src, units, ledger.rows_by_unit, ledger.q_by_unit, ignored or [], ledger.reused)
    ledger.close(res)
    if reapply_labels(workdir):  # a rebuilt row had lost its returned label (medsam2.data.returned_labels)
        res.dataset_version = dataset_version(read_manifest(workdir))
        res.labels_changed = res.dataset_version != res.previous_version
    _remove_orphans(workdir, dataset)


def _ingest_unit(u: L.Unit, src: Source, ledger: Ledger, deduper: Deduper, res: IngestResult) -> None:
    """One unit into the ledger: a reject as its quarantine row; else its earlier rows when its fingerprint is
    unchanged (and their cache files are there), else its rows decoded now — unless its image's bytes, or a
    row's decoded image and mask, were accepted already (``duplicate_content``)."""
    if u.kind == "reject":
        ledger.quarantine(u, u.image or u.key, u.reject[0], u.reject[1])
        return
    try:
        shas = {f: src.sha(f) for f in u.files if not f.startswith("\0")}
    except OSError as e:
        ledger.quarantine(u, u.image, "unreadable", type(e).__name__)
        return
    fp = fingerprint(u, shas)
    earlier = ledger.reuse(u, fp)
    if earlier is not None:
        rows, qrows = earlier
    else:
        first = deduper.same_bytes(shas[u.image], src.ref(u.image))
        if first is not None:
            ledger.quarantine(u, u.image, "duplicate_content", f"same bytes as {first}", fp)
            return
        out = _decode(u, src, ledger, shas, fp)
        res.decoded_units += 1
        rows = out.rows
        qrows = [ledger.qrow(u, rel, reason, detail, fp) for rel, reason, detail in out.rejects]
    kept: list[dict[str, Any]] = []
    for r in rows:
        first = deduper.claim(r)
        if first is None:
            kept.append(r)
            ledger.accept(r, reused=earlier is not None)
            continue
        where = r["mask_source_uri"] if first == r["source_uri"] and r["mask_source_uri"] else r["source_uri"]
        qrows.append(ledger.qrow(u, src.rel_of(where), "duplicate_content", f"same image and mask as {first}", fp))
        if earlier is None:  # decoded just now: its cache files are nobody's
            for k in ("image_uri", "mask_uri"):
                if r[k]:
                    (ledger.workdir / r[k]).unlink(missing_ok=True)
    ledger.record(u, kept, qrows)


def _decode(u: L.Unit, src: Source, ledger: Ledger, shas: dict[str, str], fp: str) -> UnitOutput:
    """Decode unit ``u`` into rows + cache files (:func:`~medsam2.data.process.process_unit`)."""
    files = [f for f in u.files if not f.startswith("\0")]
    ctx = {
        "workdir": str(ledger.workdir),
        "dataset": ledger.dataset,
        "base_uri": src.storage.uri,
        "refs": {f: src.ref(f) for f in files},
        "shas": shas,
        "now": ledger.now,
        "fingerprint": fp,
    }
    return process_unit(u, {f: str(src.path(f)) for f in files}, ctx)


_PART = re.compile(r"#(?:slice|frame|seg)=[^/]*$")  # "a.dcm#frame=2": a part of a file (quarantine rows)


def check_accounting(
    src: Source,
    units: list[L.Unit],
    rows_by_unit: dict[str, list[dict[str, Any]]],
    q_by_unit: dict[str, list[dict[str, Any]]],
    ignored: list[str],
    reused: set[str] = frozenset(),
) -> int:
    """Every file of the listing is a manifest row's image or mask, a quarantine row, or ignored (a sidecar,
    outside a declarative layout); the files of a unit rejected as a whole (no row, a quarantine row: e.g. the
    mask of a duplicate image) go with its quarantine row. A ``reused`` unit (same key and fingerprint as an
    earlier ingest of the dataset, its rows kept as they were, e.g. the same files under a new folder) goes with
    those rows, whose ``source_uri`` still names where they were first read. Returns the number of files seen.

    Raises:
        InternalError: some file is none of these — ingest would have dropped it silently (a bug).
    """
    used: set[str] = set()
    for rows in rows_by_unit.values():
        for r in rows:
            used.update(u for u in (r.get("source_uri"), r.get("mask_source_uri")) if isinstance(u, str))
    for qs in q_by_unit.values():
        used.update(_PART.sub("", q["source_uri"]) for q in qs)
    for u in units:
        if u.key in reused or (q_by_unit.get(u.key) and not rows_by_unit.get(u.key)):
            used.update(src.ref(f) for f in u.files if not f.startswith("\0"))
    skipped = set(ignored)
    lost = sorted(rel for rel in src.info if rel not in skipped and src.ref(rel) not in used)
    if lost:
        raise InternalError(
            f"ingest lost track of {len(lost)} of {len(src.info)} files in {src.storage.uri} (neither a manifest "
            f"row, a quarantine row nor ignored): {', '.join(lost[:5])}{' …' if len(lost) > 5 else ''}",
            "this is a bug in medsam2's ingest: please report it with these file names",
        )
    return len(src.info)


def _remove_orphans(workdir: Path, dataset: str) -> None:
    """Delete this dataset's cache files that no manifest row references (crash leftovers, removed rows)."""
    df = read_manifest(workdir)
    keep = set(df["image_uri"].dropna()) | set(df["mask_uri"].dropna())
    prefix = dataset_prefix(dataset)
    cache = workdir / CACHE_DIR
    if not cache.is_dir():
        return
    for p in cache.glob(f"{prefix}*"):
        if f"{CACHE_DIR}/{p.name}" not in keep:
            p.unlink(missing_ok=True)
