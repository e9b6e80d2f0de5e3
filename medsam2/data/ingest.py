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
  none); no list at all, or one naming none of the source's images, is a ``layouts.TestListError`` (a
  ``FileNotFoundError``) saying which dataset and file and how to fix it — never a test split silently merged
  into train/val.

A dataset is one source: re-ingesting a dataset name replaces that dataset's rows with the source's current
state.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from medsam2.data import dicom as dcm
from medsam2.data import layouts as L
from medsam2.data.deid import load_salt, phi_values, pseudonymise, scrub
from medsam2.data.manifest import (
    CACHE_DIR,
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    QUARANTINE_COLUMNS,
    QUARANTINE_NAME,
    atomic_write_bytes,
    dataset_version,
    read_manifest,
    read_quarantine,
    workdir_lock,
    write_table,
)
from medsam2.data.process import INGEST_VERSION, UnitOutput, dataset_prefix, process_unit
from medsam2.data.readers import QuarantineError, read_nifti, sniff_kind, stem_of
from medsam2.data.splits import DEFAULT_VAL_FRACTION, assign_splits, split_bucket
from medsam2.data.storage import SourceFile, Storage, open_storage
from medsam2.errors import InternalError
from medsam2.hashing import file_sha256
from medsam2.services import check_s3

log = logging.getLogger(__name__)

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


class StatCache:
    """``key(uri) -> {"v": version, "sha": sha256, "dcm": {...}}``; reset when the de-identification salt
    changes. Keys are salted hashes of the source URIs: DICOM exports name files after their SOPInstanceUID and
    folders after patients, so no source path is written to the work dir."""

    def __init__(self, path: Path, salt: str) -> None:
        self.path = path
        self.salt_fp = hashlib.sha256(b"salt\0" + salt.encode()).hexdigest()[:16]
        self._salt = salt
        self.files: dict[str, dict[str, Any]] = {}
        if path.exists():
            try:
                data = json.loads(path.read_text())
                if data.get("salt_fp") == self.salt_fp and data.get("version") == INGEST_VERSION:
                    self.files = data.get("files", {})
            except (OSError, ValueError):
                pass

    def key(self, uri: str) -> str:
        return hmac.new(self._salt.encode(), b"statcache\0" + uri.encode(), hashlib.sha256).hexdigest()[:32]

    def get(self, uri: str, version: str) -> dict[str, Any] | None:
        e = self.files.get(self.key(uri))
        return e if e and e.get("v") == version else None

    def put(self, uri: str, version: str, **kv: Any) -> dict[str, Any]:
        key = self.key(uri)
        e = self.files.get(key)
        if not e or e.get("v") != version:
            e = {"v": version}
            self.files[key] = e
        e.update(kv)
        return e

    def save(self) -> None:
        blob = {"version": INGEST_VERSION, "salt_fp": self.salt_fp, "files": self.files}
        atomic_write_bytes(self.path, json.dumps(blob, separators=(",", ":")).encode())




class _Source:
    """Listing + stat cache + lazy local paths + hashes for one storage.

    :meth:`ref` is the URI that the manifest and quarantine record for a file: its real URI, except that in a
    DICOM file's path every PHI value of its own header (PACS exports name files after the SOPInstanceUID and
    folders after the patient) is replaced by its salted pseudonym (:func:`~medsam2.data.deid.scrub`), e.g.
    ``series/CT.p3f…`` for ``series/CT.1.3.12.2.1107.5…``; paths without PHI stay readable.
    """

    def __init__(self, storage: Storage, files: list[SourceFile], cache: StatCache) -> None:
        self.storage, self.cache = storage, cache
        self.info = {f.rel: f for f in files}
        self.public: dict[str, str] = {}  # rel -> its de-identified form, for DICOM files whose path holds PHI
        self._rel_of: dict[str, str] = {}

    def ref(self, rel: str) -> str:
        return self.storage.uri_of(self.public.get(rel, rel))

    def rel_of(self, ref: str) -> str:
        """The relative path of a file from its :meth:`ref`."""
        if len(self._rel_of) != len(self.info):
            self._rel_of = {self.ref(r): r for r in self.info}
        return self._rel_of[ref]

    def entry(self, rel: str) -> dict[str, Any]:
        f = self.info[rel]
        uri = self.storage.uri_of(rel)
        return self.cache.get(uri, f.version) or self.cache.put(uri, f.version)

    def sha(self, rel: str) -> str:
        e = self.entry(rel)
        if "sha" not in e:
            e["sha"] = file_sha256(self.storage.local_path(rel))
        return e["sha"]

    def path(self, rel: str) -> Path:
        return self.storage.local_path(rel)


def _dicom_info(src: _Source, rel: str, dataset: str, salt: str) -> dict[str, Any]:
    """Cached header facts of a DICOM file; UIDs hashed, patient pseudonymised (no PHI in the stat cache)."""
    e = src.entry(rel)
    if "dcm" in e:
        return e["dcm"]
    try:
        ds = dcm.read_header(src.path(rel))
    except QuarantineError as q:
        e["dcm"] = {"error": [q.reason, q.detail]}
        return e["dcm"]

    def h(uid: Any) -> str:
        return hashlib.sha256(str(uid).encode()).hexdigest()

    refs: set[str] = set()
    for item in ds.get("PerFrameFunctionalGroupsSequence", []):
        for d in item.get("DerivationImageSequence", []):
            for s in d.get("SourceImageSequence", []):
                refs.add(h(s.ReferencedSOPInstanceUID))
    for series in ds.get("ReferencedSeriesSequence", []):
        for inst in series.get("ReferencedInstanceSequence", []):
            refs.add(h(inst.ReferencedSOPInstanceUID))
    # patient group: PatientID, else the study, else the series, else the folder (an anonymised series export)
    raw = f"{dataset}:folder:{PurePosixPath(rel).parent.as_posix()}"
    for kw, tag in (("SeriesInstanceUID", "series"), ("StudyInstanceUID", "study"), ("PatientID", "dicom")):
        v = str(ds.get(kw, "") or "").strip()
        raw = f"{tag}:{v}" if v else raw
    sop_uid = str(ds.get("SOPInstanceUID", "") or "").strip() or f"file:{rel}"  # anonymisers may blank it
    e["dcm"] = {
        "sop": h(sop_uid),
        "refs": sorted(refs),
        "seg": dcm.is_seg(ds),
        "patient": pseudonymise(raw, salt),
        "bucket": split_bucket(raw),
        "modality": dcm.modality_of(ds),
        "path": scrub(rel, phi_values(ds), salt),  # the path as recorded: PHI values of the header pseudonymised
    }
    return e["dcm"]


def discover(
    src: _Source, dataset: str, opts: dict[str, Any], salt: str
) -> tuple[list[L.Unit], list[str], set[str]]:
    """Listing → (units sorted by key, ignored sidecar files, frozen test stems)."""
    units: list[L.Unit] = []
    ignored: list[str] = []
    kinds: dict[str, str] = {}
    rels = sorted(src.info)

    def key_of(rel: str) -> str:  # the unit key is written to the manifest: a DICOM path without its PHI
        return src.public.get(rel, rel)

    for rel in rels:
        f = src.info[rel]
        if f.problem:
            units.append(L.Unit(key=key_of(rel), kind="reject", image=rel, reject=(f.problem, f.detail)))
            continue
        k = L.classify(rel)
        if k == "sidecar":
            ignored.append(rel)
            continue
        if f.size == 0:
            units.append(L.Unit(key=key_of(rel), kind="reject", image=rel, reject=("zero_byte", "empty file")))
            continue
        if k == "maybe":
            k = {"dicom": "dicom", "raster": "raster"}.get(sniff_kind(src.path(rel)), "unknown")
        if k == "unknown":
            units.append(
                L.Unit(
                    key=rel,
                    kind="reject",
                    image=rel,
                    reject=("unsupported_format", f"unknown file type {PurePosixPath(rel).suffix!r}"),
                )
            )
            continue
        kinds[rel] = k
    source = src.storage.uri
    test_stems, test_origin = L.resolve_test_stems(rels, opts, dataset, lambda rel: src.path(rel).read_text(), source)
    if test_origin and test_origin.startswith("shipped:"):
        log.info("%s: no test list in %s; frozen test split from the packaged %s", dataset, source, test_origin[8:])
    boxes = L.load_boxes(src.path(opts["boxes"])) if opts.get("boxes") in src.info else {}
    pkey, mfn = L.patient_key_fn(opts), L.modality_fn(opts)
    unit_opts = {k: opts[k] for k in ("label_mode", "skip_empty_slices") if k in opts}

    def make(kind: str, image: str, mask: str | None, target: str | None = None) -> L.Unit:
        stem = L._stem(image)
        m = L.IMAGE_SUFFIX.match(stem)
        core = m.group("core") if m else stem
        raw = f"{dataset}:{pkey(core)}"
        key = image if mask is None else f"{image}|{mask}"
        return L.Unit(
            key=key,
            kind=kind,
            image=image,
            mask=mask,
            target=target,
            stem=core,
            box=boxes.get(core),
            modality=mfn(core),
            patient_id=pseudonymise(raw, salt),
            split_bucket=split_bucket(raw),
            options=unit_opts,
        )

    two_d = [r for r, k in kinds.items() if k in ("raster", "npy")]
    if opts.get("images"):
        pairs, orphans, outside = L.pair_declarative(two_d, opts)
        ignored += outside
    else:
        pairs, orphans = L.pair_2d(two_d, kinds)
    units += [make("2d", im, mk, tg) for im, mk, tg in pairs]
    units += [
        L.Unit(key=o, kind="reject", image=o, reject=("mask_without_image", "no image pairs with this mask"))
        for o in orphans
    ]

    nifti: dict[str, tuple[int, ...]] = {}
    for rel in (r for r, k in kinds.items() if k == "nifti"):
        try:
            nifti[rel] = read_nifti(src.path(rel))[1]
        except QuarantineError as q:
            units.append(L.Unit(key=rel, kind="reject", image=rel, reject=(q.reason, q.detail)))
    npairs, norphans = L.pair_nifti(nifti)
    units += [make("nifti", im, lab) for im, lab in npairs]
    units += [
        L.Unit(key=o, kind="reject", image=o, reject=("mask_without_image", "no image volume of this shape"))
        for o in norphans
    ]

    dicoms = {rel: _dicom_info(src, rel, dataset, salt) for rel, k in kinds.items() if k == "dicom"}
    src.public.update((rel, i["path"]) for rel, i in dicoms.items() if i.get("path", rel) != rel)
    first_of: dict[str, str] = {}  # SOPInstanceUID hash → first file (sorted order) carrying it
    for rel, i in sorted(dicoms.items()):
        if "error" in i:
            continue
        first = first_of.setdefault(i["sop"], rel)
        if first != rel:  # the same DICOM instance twice (a copy, a re-export): keep the first, say so
            detail = f"same SOPInstanceUID as {src.ref(first)}"
            dicoms[rel] = {"error": ["duplicate_instance", detail]}  # a new dict: the stat cache keeps its facts
    by_sop = {i["sop"]: rel for rel, i in dicoms.items() if "error" not in i and not i["seg"]}
    segs_of: dict[str, list[str]] = {}
    for rel, i in sorted(dicoms.items()):
        if "error" in i:
            units.append(L.Unit(key=key_of(rel), kind="reject", image=rel, reject=tuple(i["error"])))
        elif i["seg"]:
            hits = sorted({by_sop[r] for r in i["refs"] if r in by_sop})
            if not hits:
                units.append(
                    L.Unit(
                        key=key_of(rel),
                        kind="reject",
                        image=rel,
                        reject=("mask_without_image", "DICOM-SEG references no image in the source"),
                    )
                )
            for im in hits:
                segs_of.setdefault(im, []).append(rel)
    for rel in sorted(by_sop.values()):
        i = dicoms[rel]
        units.append(
            L.Unit(
                key=key_of(rel),
                kind="dicom",
                image=rel,
                segs=tuple(segs_of.get(rel, [])),
                stem=L._stem(rel),
                modality=opts.get("modality") or i["modality"],
                patient_id=i["patient"],
                split_bucket=i["bucket"],
                options=unit_opts,
            )
        )
    image_stems = {stem_of(PurePosixPath(u.image).name) for u in units if u.kind != "reject" and u.image}
    L.check_test_stems(test_stems, test_origin, image_stems, dataset, opts, source)
    return sorted(units, key=lambda u: u.key), ignored, test_stems


def _fingerprint(u: L.Unit, shas: dict[str, str]) -> str:
    blob = json.dumps(
        [
            INGEST_VERSION,
            u.kind,
            [(f, shas.get(f)) for f in u.files],
            u.target,
            u.box,
            u.modality,
            u.patient_id,
            u.split_bucket,
            sorted(u.options.items()),
        ],
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def norm(v: Any) -> Any:
        if v is None or (isinstance(v, float) and pd.isna(v)) or v is pd.NA:
            return None
        return list(map(int, v)) if isinstance(v, (list, tuple)) or hasattr(v, "tolist") else v

    return all(norm(a.get(k)) == norm(b.get(k)) for k in _CONTENT)


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
        src = _Source(storage, storage.list(), cache)
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
    src: _Source,
    workdir: Path,
    dataset: str,
    units: list[L.Unit],
    opts: dict[str, Any],
    test_stems: set[str],
    res: IngestResult,
    ignored: list[str] | None = None,
) -> None:
    now = datetime.now(UTC).isoformat(timespec="seconds")
    old, oldq = read_manifest(workdir), read_quarantine(workdir)
    res.previous_version = dataset_version(old)
    others, mine = old[old["dataset"] != dataset], old[old["dataset"] == dataset]
    othersq, mineq = oldq[oldq["dataset"] != dataset], oldq[oldq["dataset"] == dataset]
    old_rows = {r["image_id"]: r for r in mine.to_dict("records")}
    old_by_unit: dict[str, list[dict[str, Any]]] = {}
    for r in old_rows.values():
        old_by_unit.setdefault(r["unit_key"], []).append(r)
    oldq_by_unit: dict[str, list[dict[str, Any]]] = {}
    for r in mineq.to_dict("records"):
        oldq_by_unit.setdefault(r["unit_key"], []).append(r)
    seen_sha = {r.sha256: r.source_uri for r in others.itertuples()}
    seen_pix = {
        (r.pixel_sha256, r.mask_pixel_sha256 if isinstance(r.mask_pixel_sha256, str) else None): (
            r.image_id,
            r.source_uri,
        )
        for r in others.itertuples()
    }
    rows_by_unit: dict[str, list[dict[str, Any]]] = {}
    q_by_unit: dict[str, list[dict[str, Any]]] = {}
    reused: set[str] = set()  # units whose earlier rows are kept as they were (see check_accounting)
    counts: Counter[str] = Counter()
    every = float(os.environ.get("MEDSAM2_INGEST_CHECKPOINT_S", "15"))
    last_ckpt = time.monotonic()

    def qrow(u: L.Unit, rel: str, reason: str, detail: str, fp: str) -> dict[str, Any]:
        uri = src.ref(rel)
        prev = next(
            (p for p in oldq_by_unit.get(u.key, []) if p["source_uri"] == uri and p["reason"] == reason), None
        )
        return {
            "source_uri": uri,
            "reason": reason,
            "detail": detail,
            "dataset": dataset,
            "detected_at": prev["detected_at"] if prev else now,
            "unit_key": u.key,
            "unit_fingerprint": fp,
        }

    def checkpoint(final: bool) -> None:
        done = set(rows_by_unit) | set(q_by_unit)
        keep_old = [] if final else [r for k, rs in old_by_unit.items() if k not in done for r in rs]
        keep_oldq = [] if final else [r for k, rs in oldq_by_unit.items() if k not in done for r in rs]
        new = [r for rs in rows_by_unit.values() for r in rs] + keep_old
        mdf = (
            pd.DataFrame(new, columns=list(MANIFEST_COLUMNS))
            if new
            else pd.DataFrame(columns=list(MANIFEST_COLUMNS))
        )
        if len(mdf):
            mdf["split"] = assign_splits(
                mdf,
                test_stems=test_stems,
                dataset_split=opts.get("split"),
                val_fraction=float(opts.get("val_fraction", DEFAULT_VAL_FRACTION)),
            ).values
        full = pd.concat([others, mdf], ignore_index=True) if len(others) else mdf
        full = full.sort_values("image_id", kind="stable").reset_index(drop=True)
        qrows = [r for rs in q_by_unit.values() for r in rs] + keep_oldq
        qdf = pd.DataFrame(qrows, columns=list(QUARANTINE_COLUMNS))
        qfull = pd.concat([othersq, qdf], ignore_index=True) if len(othersq) else qdf
        qfull = qfull.sort_values(["dataset", "source_uri", "reason"], kind="stable").reset_index(drop=True)
        os.sync()  # cache files were written without fsync: make them durable before the manifest names them
        write_table(full, workdir / MANIFEST_NAME, MANIFEST_COLUMNS)
        write_table(qfull, workdir / QUARANTINE_NAME, QUARANTINE_COLUMNS)
        src.cache.save()
        if final:
            res.rows, res.dataset_rows = len(full), len(mdf)
            res.dataset_version = dataset_version(full)
            res.labels_changed = res.dataset_version != res.previous_version
            res.labelled = int((mdf["label_kind"] != "none").sum()) if len(mdf) else 0
            res.splits = {k: int(v) for k, v in mdf["split"].value_counts().items()} if len(mdf) else {}
            res.quarantined = dict(sorted(Counter(r["reason"] for r in qrows).items()))
            res.inputs_seen = len(mdf) + len(qrows)
            res.removed = len(set(old_rows) - set(mdf["image_id"])) if len(mdf) else len(old_rows)

    for u in units:
        if u.kind == "reject":
            q_by_unit[u.key] = [qrow(u, u.image or u.key, u.reject[0], u.reject[1], "")]
            continue
        try:
            shas = {f: src.sha(f) for f in u.files if not f.startswith("\0")}
        except OSError as e:
            q_by_unit[u.key] = [qrow(u, u.image, "unreadable", type(e).__name__, "")]
            continue
        fp = _fingerprint(u, shas)
        prev, prevq = old_by_unit.get(u.key, []), oldq_by_unit.get(u.key, [])
        reuse = (
            (prev or prevq)
            and all(r["unit_fingerprint"] == fp for r in prev + prevq)
            and all(
                (workdir / r["image_uri"]).exists()
                and (r["mask_uri"] is None or pd.isna(r["mask_uri"]) or (workdir / r["mask_uri"]).exists())
                for r in prev
            )
        )
        if reuse:
            out = UnitOutput(rows=[dict(r) for r in prev])
            qprev = [dict(r) for r in prevq]
            reused.add(u.key)
        else:
            dup = seen_sha.get(shas[u.image])
            if dup is not None and dup != src.ref(u.image):
                q_by_unit[u.key] = [qrow(u, u.image, "duplicate_content", f"same bytes as {dup}", fp)]
                continue
            paths = {f: str(src.path(f)) for f in u.files if not f.startswith("\0")}
            ctx = {
                "workdir": str(workdir),
                "dataset": dataset,
                "base_uri": src.storage.uri,
                "refs": {f: src.ref(f) for f in u.files if not f.startswith("\0")},
                "shas": shas,
                "now": now,
                "fingerprint": fp,
            }
            out = process_unit(u, paths, ctx)
            res.decoded_units += 1
            qprev = [qrow(u, rel, reason, detail, fp) for rel, reason, detail in out.rejects]
        kept: list[dict[str, Any]] = []
        for r in out.rows:
            key = (
                r["pixel_sha256"],
                r["mask_pixel_sha256"] if isinstance(r["mask_pixel_sha256"], str) else None,
            )
            dup = seen_pix.get(key)
            if dup is not None and dup[0] != r["image_id"]:
                where = (
                    r["mask_source_uri"]
                    if dup[1] == r["source_uri"] and r["mask_source_uri"]
                    else r["source_uri"]
                )
                rel = src.rel_of(where)
                qprev.append(qrow(u, rel, "duplicate_content", f"same image and mask as {dup[1]}", fp))
                if not reuse:
                    for k in ("image_uri", "mask_uri"):
                        if r[k]:
                            (workdir / r[k]).unlink(missing_ok=True)
                continue
            seen_pix[key] = (r["image_id"], r["source_uri"])
            seen_sha.setdefault(r["sha256"], r["source_uri"])
            kept.append(r)
            before = old_rows.get(r["image_id"])
            counts[
                "added" if before is None else ("unchanged" if reuse or _same(before, r) else "updated")
            ] += 1
        rows_by_unit[u.key] = kept
        if qprev:
            q_by_unit[u.key] = qprev
        if time.monotonic() - last_ckpt > every:
            checkpoint(final=False)
            last_ckpt = time.monotonic()
    res.files_seen = check_accounting(src, units, rows_by_unit, q_by_unit, ignored or [], reused)
    checkpoint(final=True)
    res.added, res.unchanged, res.updated = counts["added"], counts["unchanged"], counts["updated"]
    _remove_orphans(workdir, dataset)


_PART = re.compile(r"#(?:slice|frame|seg)=[^/]*$")  # "a.dcm#frame=2": a part of a file (quarantine rows)


def check_accounting(
    src: _Source,
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
