"""Discovery: a source's listing → the units to ingest (an image with its labels, see layouts.py) and the rejects.

:func:`discover` sorts the listing by kind of file (:func:`_kinds_of`: broken, empty, unknown files are rejects,
sidecars are ignored) and hands each kind to its own function: 2D rasters and ``.npy`` arrays
(:func:`_discover_2d`), NIfTI volumes (:func:`_discover_nifti`), DICOM files (:func:`_discover_dicom`). Every file
of the listing ends up in a unit (as its image, mask or SEG), in a reject unit, or in the ignored list.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, NamedTuple

from medsam2.data import dicom as dcm
from medsam2.data import layouts as L
from medsam2.data import sidecars
from medsam2.data.deid import phi_values, pseudonymise, scrub
from medsam2.data.readers import QuarantineError, read_nifti, sniff_kind, stem_of
from medsam2.data.source import Source
from medsam2.data.splits import split_bucket

log = logging.getLogger("medsam2.data.ingest")  # the name its messages have always had


class Discovery(NamedTuple):
    """What discovery found in a listing: ``units`` sorted by key (reject units included), the ``ignored``
    sidecar files (and files outside a declarative layout), and the frozen ``test_stems``."""

    units: list[L.Unit]
    ignored: list[str]
    test_stems: set[str]


def discover(src: Source, dataset: str, opts: dict[str, Any], salt: str) -> Discovery:
    """Listing → (units sorted by key, ignored sidecar files, frozen test stems)."""
    kinds, units, ignored = _kinds_of(src)
    source = src.storage.uri
    rels = sorted(src.info)
    test_stems, test_origin = sidecars.resolve_test_stems(rels, opts, dataset,
                                                          lambda rel: src.path(rel).read_text(), source)
    if test_origin and test_origin.startswith("shipped:"):
        log.info("%s: no test list in %s; frozen test split from the packaged %s", dataset, source, test_origin[8:])
    paired = _PairedUnits.of(src, dataset, opts, salt)
    units_2d, outside = _discover_2d(kinds, opts, paired)
    ignored += outside
    units += units_2d
    units += _discover_nifti(src, kinds, paired)
    units += _discover_dicom(src, kinds, dataset, opts, salt)
    image_stems = {stem_of(PurePosixPath(u.image).name) for u in units if u.kind != "reject" and u.image}
    sidecars.check_test_stems(test_stems, test_origin, image_stems, dataset, opts, source)
    return Discovery(sorted(units, key=lambda u: u.key), ignored, test_stems)


def _reject(key: str, image: str, reason: str, detail: str) -> L.Unit:
    return L.Unit(key=key, kind="reject", image=image, reject=(reason, detail))


def _unit_options(opts: dict[str, Any]) -> dict[str, Any]:
    """The layout options that change how a unit decodes (part of its fingerprint)."""
    return {k: opts[k] for k in ("label_mode", "skip_empty_slices") if k in opts}


def _kinds_of(src: Source) -> tuple[dict[str, str], list[L.Unit], list[str]]:
    """The listing sorted by kind: (relative path → kind of the files to pair, reject units of the broken, empty
    and unknown files, ignored sidecars)."""
    kinds: dict[str, str] = {}
    rejects: list[L.Unit] = []
    ignored: list[str] = []
    for rel in sorted(src.info):
        f = src.info[rel]
        if f.problem:
            rejects.append(_reject(src.public_rel(rel), rel, f.problem, f.detail))
            continue
        k = L.classify(rel)
        if k == "sidecar":
            ignored.append(rel)
            continue
        if f.size == 0:
            rejects.append(_reject(src.public_rel(rel), rel, "zero_byte", "empty file"))
            continue
        if k == "maybe":
            k = {"dicom": "dicom", "raster": "raster"}.get(sniff_kind(src.path(rel)), "unknown")
        if k == "unknown":
            detail = f"unknown file type {PurePosixPath(rel).suffix!r}"
            rejects.append(_reject(rel, rel, "unsupported_format", detail))
            continue
        kinds[rel] = k
    return kinds, rejects, ignored


@dataclass(frozen=True)
class _PairedUnits:
    """How a paired image (2D or NIfTI, its mask found by file name) becomes a unit: the dataset, the salt of
    its patient pseudonyms, the layout's boxes by stem, patient-key and modality rules, and the unit options."""

    dataset: str
    salt: str
    boxes: dict[str, list[int]]
    patient_key: Callable[[str], str]
    modality: Callable[[str], str]
    options: dict[str, Any]

    @classmethod
    def of(cls, src: Source, dataset: str, opts: dict[str, Any], salt: str) -> _PairedUnits:
        boxes = sidecars.load_boxes(src.path(opts["boxes"])) if opts.get("boxes") in src.info else {}
        return cls(dataset, salt, boxes, sidecars.patient_key_fn(opts), sidecars.modality_fn(opts), _unit_options(opts))

    def unit(self, kind: str, image: str, mask: str | None, target: str | None = None) -> L.Unit:
        stem = L._stem(image)
        m = L.IMAGE_SUFFIX.match(stem)
        core = m.group("core") if m else stem
        raw = f"{self.dataset}:{self.patient_key(core)}"
        key = image if mask is None else f"{image}|{mask}"
        return L.Unit(
            key=key,
            kind=kind,
            image=image,
            mask=mask,
            target=target,
            stem=core,
            box=self.boxes.get(core),
            modality=self.modality(core),
            patient_id=pseudonymise(raw, self.salt),
            split_bucket=split_bucket(raw),
            options=self.options,
        )


def _discover_2d(kinds: dict[str, str], opts: dict[str, Any], paired: _PairedUnits) -> tuple[list[L.Unit], list[str]]:
    """Rasters and ``.npy`` arrays → (image + mask units and reject units of orphan masks, files outside a
    declarative layout)."""
    two_d = [r for r, k in kinds.items() if k in ("raster", "npy")]
    outside: list[str] = []
    if opts.get("images"):
        pairs, orphans, outside = L.pair_declarative(two_d, opts)
    else:
        pairs, orphans = L.pair_2d(two_d, kinds)
    units = [paired.unit("2d", im, mk, tg) for im, mk, tg in pairs]
    units += [_reject(o, o, "mask_without_image", "no image pairs with this mask") for o in orphans]
    return units, outside


def _discover_nifti(src: Source, kinds: dict[str, str], paired: _PairedUnits) -> list[L.Unit]:
    """NIfTI volumes → volume + label-volume units (paired by shape), rejects of unreadable and orphan labels."""
    units: list[L.Unit] = []
    shapes: dict[str, tuple[int, ...]] = {}
    for rel in (r for r, k in kinds.items() if k == "nifti"):
        try:
            shapes[rel] = read_nifti(src.path(rel))[1]
        except QuarantineError as q:
            units.append(_reject(rel, rel, q.reason, q.detail))
    pairs, orphans = L.pair_nifti(shapes)
    units += [paired.unit("nifti", im, lab) for im, lab in pairs]
    units += [_reject(o, o, "mask_without_image", "no image volume of this shape") for o in orphans]
    return units


def _discover_dicom(src: Source, kinds: dict[str, str], dataset: str, opts: dict[str, Any], salt: str) -> list[L.Unit]:
    """DICOM files → one unit per image instance with the SEG objects that reference it; rejects of unreadable
    files, repeated instances and SEGs that reference no image of the source."""
    dicoms = _dicom_headers(src, [rel for rel, k in kinds.items() if k == "dicom"], dataset, salt)
    by_sop = {i["sop"]: rel for rel, i in dicoms.items() if "error" not in i and not i["seg"]}
    units: list[L.Unit] = []
    segs_of: dict[str, list[str]] = {}  # image → the SEG files referencing it
    options = _unit_options(opts)
    for rel, i in sorted(dicoms.items()):
        if "error" in i:
            units.append(_reject(src.public_rel(rel), rel, *i["error"]))
        elif i["seg"]:
            hits = sorted({by_sop[r] for r in i["refs"] if r in by_sop})
            if not hits:
                detail = "DICOM-SEG references no image in the source"
                units.append(_reject(src.public_rel(rel), rel, "mask_without_image", detail))
            for im in hits:
                segs_of.setdefault(im, []).append(rel)
    for rel in sorted(by_sop.values()):
        i = dicoms[rel]
        units.append(
            L.Unit(
                key=src.public_rel(rel),
                kind="dicom",
                image=rel,
                segs=tuple(segs_of.get(rel, [])),
                stem=L._stem(rel),
                modality=opts.get("modality") or i["modality"],
                patient_id=i["patient"],
                split_bucket=i["bucket"],
                options=options,
            )
        )
    return units


def _dicom_headers(src: Source, rels: list[str], dataset: str, salt: str) -> dict[str, dict[str, Any]]:
    """Header facts of each DICOM file (``{"error": [reason, detail]}`` for an unreadable one or a repeat of an
    earlier instance); records the de-identified path of each file whose path holds PHI in ``src.public``."""
    dicoms = {rel: _dicom_info(src, rel, dataset, salt) for rel in rels}
    src.public.update((rel, i["path"]) for rel, i in dicoms.items() if i.get("path", rel) != rel)
    first_of: dict[str, str] = {}  # SOPInstanceUID hash → first file (sorted order) carrying it
    for rel, i in sorted(dicoms.items()):
        if "error" in i:
            continue
        first = first_of.setdefault(i["sop"], rel)
        if first != rel:  # the same DICOM instance twice (a copy, a re-export): keep the first, say so
            detail = f"same SOPInstanceUID as {src.ref(first)}"
            dicoms[rel] = {"error": ["duplicate_instance", detail]}  # a new dict: the stat cache keeps its facts
    return dicoms


def _dicom_info(src: Source, rel: str, dataset: str, salt: str) -> dict[str, Any]:
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
