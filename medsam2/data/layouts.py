"""Source layouts: which files are images, which are masks, how they pair, and per-dataset profiles.

A layout turns a file listing into :class:`Unit` s — the unit of incremental work. A unit is one image file
(2D raster/NPY, a NIfTI volume, a DICOM object) with what labels it (a mask file, a label volume, DICOM-SEG
objects, a box from a sidecar), and produces one or more manifest rows (frames, slices) or quarantine rows.

**Automatic pairing** (``layout=None``), per file kind:

* 2D (PNG/JPEG/TIFF/BMP/NPY). The folder decides first: a folder on a file's path that names a role makes it
  a *mask* (``masks``, ``labels``, ``gt``, ``ground truth``, ``annotations``, ...) or an *image* (``images``,
  ``imgs``, ``original``, ``frames``, ...; a mask folder wins), whatever its name: ``images/polyp_label_3.png``
  is an image. Only outside such folders does the name decide: a stem ending in ``_mask``/``_seg``/``_label``/
  ``_gt`` (optional ``_N`` instance suffix) is a mask. Masks pair with images of the same
  kind (raster/NPY) in the same *scope* (the folder above an ``images``/``masks`` folder, else the file's own
  folder) by the *core stem*: the stem without ``_frame``/``_image``/``_img`` (images) or the mask suffix
  (masks). Examples: ``images/a.jpg`` + ``masks/a.jpg`` (Kvasir, BUSI, BraTS NPY),
  ``original_tif/1_frame.tif`` + ``original_tif/1_mask.tif`` (CVC originals), ``a.png`` + ``a_mask.png`` /
  ``a_mask_1.png``. Failing that, the longest image core stem that prefixes the mask stem followed by ``_``
  wins and the rest names the structure: ``masks/s0114_111_aorta_000.png`` → image ``s0114_111``, target
  ``aorta_000`` (SAM-Med2D). **One row per mask file** (per structure *instance*): a box prompt around one
  connected part is what SAM is trained on; merging is a one-line group-by downstream. Images without a mask
  are unlabelled (``label_kind`` none, or box when a sidecar gives one); a mask without an image is
  quarantined (``mask_without_image``).
* NIfTI: volumes in a mask folder, or (outside role folders) named with a ``seg``/``label``/``mask``/``gt``
  token, are label volumes; each pairs with the
  image volume of the same shape, preferring the same folder and the longest common name prefix.
* DICOM (``.dcm`` or ``DICM`` magic): SEG objects pair with the images they reference (in discover.py).
* Sidecars (``.md .txt .json .yaml .csv ...`` and hidden files) are not inputs; they are reported as
  ``ignored``. Anything else is quarantined as ``unsupported_format``.

**Declarative layout** (a dict or YAML file)::

    {"images": "imgs/*.png", "masks": "labels/{stem}_seg.png", "modality": "CT", "split": "train",
     "patient": "^(case\\d+)_", "boxes": "boxes.json", "test_list": "test.txt"}

``images`` is a glob relative to the source root; ``masks`` a template with ``{stem}``, ``{name}``,
``{parent}``. Every key except ``images``/``masks`` also works as an override for automatic pairing (see
:data:`OPTION_KEYS`).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from medsam2.data.readers import ext_of, stem_of
from medsam2.errors import UsageError

OPTION_KEYS = {
    "images": "glob of image files (declarative layout)",
    "masks": "mask path template, e.g. 'labels/{stem}_seg.png' (declarative layout)",
    "modality": "modality of every image (default: profile / file name / DICOM header)",
    "split": "force every row of the dataset into train|val|test (e.g. 'test' for an external test set)",
    "patient": "regex on the image stem; group 1 (or the match) is the patient key",
    "boxes": "JSON sidecar with boxes per stem (Kvasir format or {stem: [x0,y0,x1,y1]})",
    "test_list": "text file of image stems (one per line) frozen as the test split",
    "val_fraction": "fraction of patients in val (default 0.1)",
    "label_mode": "NIfTI labels: 'foreground' (label > 0, default) or 'per_label' (one row per label value)",
    "skip_empty_slices": "NIfTI: drop slices whose label slice is empty (default false)",
}

MASK_DIRS = {
    "mask",
    "masks",
    "label",
    "labels",
    "gt",
    "ground truth",
    "ground_truth",
    "groundtruth",
    "annotations",
    "annotation",
    "segmentation",
    "segmentations",
    "seg",
    "segs",
    "targets",
}
IMAGE_DIRS = {"image", "images", "img", "imgs", "original", "originals", "frames", "inputs", "input", "raw"}
SIDECAR_EXT = {
    ".md",
    ".txt",
    ".json",
    ".yaml",
    ".yml",
    ".csv",
    ".tsv",
    ".xml",
    ".html",
    ".pdf",
    ".rst",
    ".log",
}
MASK_SUFFIX = re.compile(
    r"^(?P<core>.+?)[_-](?:mask|seg|label|labels|gt|segmentation)(?:[_-](?P<inst>\d+))?$", re.IGNORECASE
)
IMAGE_SUFFIX = re.compile(r"^(?P<core>.+?)[_-](?:frame|image|img)$", re.IGNORECASE)
NIFTI_LABEL_TOKEN = re.compile(r"(^|[_\-.])(seg|label|labels|mask|gt|segmentation)([_\-.]|$)", re.IGNORECASE)

# CVC-ClinicDB: frame number → video sequence (README_original.txt table: last frame of sequences 1..29).
_CVC_SEQ_END = [
    25,
    50,
    67,
    78,
    103,
    126,
    151,
    177,
    199,
    205,
    227,
    252,
    277,
    297,
    317,
    342,
    363,
    383,
    408,
    428,
    447,
    466,
    478,
    503,
    528,
    546,
    571,
    591,
    612,
]


def cvc_sequence(stem: str) -> str:
    """CVC-ClinicDB frame stem (``'151'``, ``'1_frame'``) → ``'seq7'`` (the patient/group: one video
    sequence)."""
    m = re.match(r"(\d+)", stem)
    if not m:
        return stem
    n = int(m.group(1))
    for i, end in enumerate(_CVC_SEQ_END, start=1):
        if n <= end:
            return f"seq{i}"
    return stem


def modality_from_name(name: str, default: str = "other") -> str:
    """Modality from file-name tokens (``ct``, ``mr``/``flair``/``t1``/``t2``, ``us``, ``xray``/``cxr``,
    ``mammo``)."""
    toks = set(re.split(r"[^a-z0-9]+", name.lower()))
    if toks & {"ct", "cta"}:
        return "CT"
    if toks & {"mr", "mri", "flair", "t1", "t2", "t1ce", "t1c", "dwi", "adc"}:
        return "MR"
    if toks & {"us", "ultrasound"}:
        return "ultrasound"
    if toks & {"xray", "cxr", "dx"}:
        return "DX"
    if toks & {"mg", "mammo", "mammogram"}:
        return "MG"
    return default


def _sammed2d_modality(stem: str) -> str:
    m = re.match(r"amos_(\d+)", stem)  # AMOS ids >= 500 are MRI
    return "MR" if m and int(m.group(1)) >= 500 else "CT"


#: Built-in profiles, chosen by dataset name (exact, else prefix). Values: options above, callables
#: ``modality_fn(stem) -> str`` / ``patient_fn(stem) -> str``, or ``shipped_test_list``: the name of a test list
#: in ``medsam2/data/resources/`` used when the source has no ``test_list`` file of its own.
PROFILES: dict[str, dict[str, Any]] = {
    "kvasir-seg": {
        "modality": "endoscopy",
        "boxes": "kavsir_bboxes.json",
        "test_list": "split_pranet_test.txt",
        # The official download (Simula) has no test list: the PraNet one ships with the package.
        "shipped_test_list": "kvasir_split_pranet_test.txt",
    },
    "cvc-clinicdb": {"modality": "endoscopy", "patient_fn": cvc_sequence},
    "busi": {"modality": "ultrasound"},
    "sam-med2d": {"modality_fn": _sammed2d_modality, "patient": r"^(.*)_\d+$"},
    "brats": {"modality": "MR", "patient": r"(BraTS\d*_\d+)"},
    "totalsegmentator": {"modality_fn": modality_from_name},
    "dicom": {},
}


def resolve_layout(dataset: str, layout: str | dict | None) -> dict[str, Any]:
    """Profile for ``dataset`` merged with ``layout`` (a dict, a YAML/JSON file path, or a profile name)."""
    opts: dict[str, Any] = {}
    name = dataset.lower()
    prof = PROFILES.get(name) or next((p for k, p in PROFILES.items() if name.startswith(k)), None)
    if isinstance(layout, str) and layout in PROFILES:
        prof, layout = PROFILES[layout], None
    opts.update(prof or {})
    if isinstance(layout, str):
        import yaml

        layout = yaml.safe_load(Path(layout).read_text())
    if layout and not isinstance(layout, dict):
        raise UsageError(f"a layout must be a mapping of options, got {type(layout).__name__}",
                         f"write key: value lines; known keys: {sorted(OPTION_KEYS)}")
    if layout:
        unknown = set(layout) - set(OPTION_KEYS)
        if unknown:
            near = {k: difflib.get_close_matches(k, OPTION_KEYS, n=1) for k in sorted(unknown)}
            guess = "; ".join(f"{k!r}: did you mean {v[0]!r}?" for k, v in near.items() if v)
            raise UsageError(f"unknown layout keys {sorted(unknown)}" + (f" ({guess})" if guess else "")
                             + f"; known: {sorted(OPTION_KEYS)}", "fix the layout file (medsam2 ingest --layout)")
        opts.update(layout)
        if "test_list" in layout:  # the user's own list (or null: none): never fall back to the shipped one
            opts.pop("shipped_test_list", None)
    if opts.get("split") not in (None, "train", "val", "test"):
        raise UsageError(f"layout split must be one of train, val, test; got {opts['split']!r}",
                         "fix the layout file (medsam2 ingest --layout)")
    return opts


@dataclass
class Unit:
    """One image source and its labels. ``key`` is stable (relative paths), unique within a dataset."""

    key: str
    kind: str  # "2d" | "nifti" | "dicom" | "reject"
    image: str | None = None
    mask: str | None = None
    segs: tuple[str, ...] = ()
    target: str | None = None
    stem: str = ""
    box: list[int] | None = None
    modality: str = "other"
    patient_id: str = ""
    split_bucket: int = 0
    reject: tuple[str, str] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> list[str]:
        return [f for f in (self.image, self.mask, *self.segs) if f]


def classify(rel: str) -> str:
    """``sidecar|raster|npy|nifti|dicom|maybe`` from the name only ('maybe' = sniff the bytes)."""
    p = PurePosixPath(rel)
    if any(part.startswith(".") for part in p.parts):
        return "sidecar"
    e = ext_of(p.name)
    if e in SIDECAR_EXT:
        return "sidecar"
    if e in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"):
        return "raster"
    if e == ".npy":
        return "npy"
    if e in (".nii", ".nii.gz"):
        return "nifti"
    if e in (".dcm", ".dicom"):
        return "dicom"
    return "maybe"


def _stem(rel: str) -> str:
    return stem_of(rel)


def folder_role(rel: str) -> str | None:
    """``'mask'`` if a folder on ``rel``'s path is a mask folder (:data:`MASK_DIRS`), else ``'image'`` if one is an
    image folder (:data:`IMAGE_DIRS`), else None. The folder decides before any token in the file name:
    ``images/polyp_label_3.png`` is an image, ``masks/a.png`` a mask."""
    dirs = {d.lower() for d in PurePosixPath(rel).parts[:-1]}
    if dirs & MASK_DIRS:
        return "mask"
    return "image" if dirs & IMAGE_DIRS else None


def _is_mask_2d(rel: str) -> bool:
    role = folder_role(rel)
    return role == "mask" if role else bool(MASK_SUFFIX.match(_stem(rel)))


def _is_label_volume(rel: str) -> bool:
    role = folder_role(rel)
    return role == "mask" if role else bool(NIFTI_LABEL_TOKEN.search(_stem(rel)))


def _scope(rel: str) -> str:
    parent = PurePosixPath(rel).parent
    if parent.name.lower() in MASK_DIRS | IMAGE_DIRS:
        parent = parent.parent
    return parent.as_posix()


def pair_2d(
    files: list[str], kinds: dict[str, str]
) -> tuple[list[tuple[str, str | None, str | None]], list[str]]:
    """Automatic 2D pairing → ([(image, mask or None, target or None)], [masks without image])."""
    images = [f for f in files if not _is_mask_2d(f)]
    masks = [f for f in files if _is_mask_2d(f)]
    by_core: dict[tuple[str, str, str], str] = {}
    cores: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for im in images:
        s = _stem(im)
        m = IMAGE_SUFFIX.match(s)
        core = m.group("core") if m else s
        key = (_scope(im), kinds[im], core)
        by_core.setdefault(key, im)
        by_core.setdefault((_scope(im), kinds[im], s), im)
        cores.setdefault((_scope(im), kinds[im]), []).append((core, im))
    pairs: list[tuple[str, str | None, str | None]] = []
    used: set[str] = set()
    orphans: list[str] = []
    for mk in masks:
        s, sc, k = _stem(mk), _scope(mk), kinds[mk]
        m = MASK_SUFFIX.match(s)
        target = None
        im = by_core.get((sc, k, s))
        if im is None and m:
            im = by_core.get((sc, k, m.group("core")))
            target = m.group("inst")
        if im is None:  # longest image core that prefixes the mask stem: <core>_<structure>
            best = max(
                (c for c in cores.get((sc, k), []) if s.startswith(c[0] + "_")),
                key=lambda c: len(c[0]),
                default=None,
            )
            if best is not None:
                im, target = best[1], s[len(best[0]) + 1 :]
        if im is None:
            orphans.append(mk)
            continue
        pairs.append((im, mk, target))
        used.add(im)
    pairs += [(im, None, None) for im in images if im not in used]
    return sorted(pairs, key=lambda p: (p[0], p[1] or "")), orphans


def pair_declarative(
    files: list[str], opts: dict[str, Any]
) -> tuple[list[tuple[str, str | None, str | None]], list[str], list[str]]:
    """``images`` glob + ``masks`` template → (pairs, masks without image, files outside the layout)."""
    fileset = set(files)
    images = sorted(f for f in files if fnmatch.fnmatch(f, opts["images"]))
    tmpl = opts.get("masks")
    pairs: list[tuple[str, str | None, str | None]] = []
    used: set[str] = set(images)
    for im in images:
        mk = None
        if tmpl:
            p = PurePosixPath(im)
            cand = tmpl.format(stem=_stem(im), name=p.name, parent=p.parent.as_posix())
            cand = PurePosixPath(cand).as_posix()
            if ".." in PurePosixPath(cand).parts or cand.startswith("/"):
                cand = "\0" + cand  # never inside the listing: reported as outside_root by ingest
            if cand in fileset:
                mk = cand
                used.add(cand)
            elif cand.startswith("\0"):
                mk = cand
        pairs.append((im, mk, None))
    orphans: list[str] = []
    if tmpl:
        mask_glob = re.sub(r"\{(stem|name|parent)\}", "*", tmpl)
        orphans = sorted(f for f in files if fnmatch.fnmatch(f, mask_glob) and f not in used)
        used.update(orphans)
    outside = sorted(f for f in files if f not in used)
    return pairs, orphans, outside


def pair_nifti(headers: dict[str, tuple[int, ...]]) -> tuple[list[tuple[str, str | None]], list[str]]:
    """NIfTI volumes {rel: shape} → ([(image volume, label volume or None)], [label volumes without
    image])."""
    labels = sorted(f for f in headers if _is_label_volume(f))
    images = sorted(f for f in headers if f not in labels)
    pairs: dict[str, str | None] = {im: None for im in images}
    orphans: list[str] = []

    def score(lab: str, im: str) -> tuple[int, int]:
        same_dir = int(PurePosixPath(lab).parent == PurePosixPath(im).parent)
        a, b = _stem(lab), _stem(im)
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return same_dir, n

    for lab in labels:
        cands = [im for im in images if headers[im][:3] == headers[lab][:3] and pairs[im] is None]
        if not cands:
            orphans.append(lab)
            continue
        pairs[max(cands, key=lambda im: score(lab, im))] = lab
    return sorted(pairs.items()), orphans
