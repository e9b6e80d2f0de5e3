"""Volumes as stacks of slices: a NIfTI file or a DICOM series folder → axial (H, W, 3) uint8 slices, their
spacing in mm, and the way back to the source's voxel grid for a label volume.

Slice conventions are those of ingest, so a slice index or a box means the same here as on a manifest row:

* **NIfTI**: reoriented to RAS+ (:func:`~medsam2.data.readers.read_nifti`); slice ``z`` is the ``z``-th axial
  plane from inferior to superior, shown with anterior up (:func:`~medsam2.data.readers.nifti_slice`); one
  0.5–99.5 percentile window over the whole volume. Labels go back to the file's own orientation and affine.
* **DICOM series**: the files of one SeriesInstanceUID (any name, with or without a suffix; an empty
  SOPClassUID is accepted), ordered by ImagePositionPatient along the slice normal; each decoded with
  :func:`~medsam2.data.dicom.decode_image` (modality LUT, header or CT default window). A label volume written
  as NIfTI has shape (Columns, Rows, Z) and the RAS affine of the series geometry.

Header values other than the geometry never leave this module except the series' UIDs and numbers that a user
needs to choose a series in a folder holding several (:class:`~medsam2.errors.InputDataError`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsam2.data import dicom as dcm
from medsam2.data.readers import (
    QuarantineError,
    apply_window,
    ext_of,
    nifti_array,
    nifti_slice,
    percentile_window,
    read_nifti,
    sniff_kind,
    to_rgb,
)
from medsam2.errors import InputDataError

#: SOP classes filled in, in memory only, for image files whose SOPClassUID is empty (DICOM-SEG needs one)
IMAGE_SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}


@dataclass
class Volume:
    """Z axial slices of a volume and how they map back to the source."""

    slices: np.ndarray
    """(Z, H, W, 3) uint8 RGB (grey replicated), windowed once."""
    spacing: tuple[float, float, float]
    """(between slices, between rows, between columns) in mm."""
    kind: str
    """``nifti`` or ``dicom``."""
    shape: tuple[int, int, int]
    """The source's voxel shape (a NIfTI's own; (Columns, Rows, Z) for a DICOM series)."""
    affine: np.ndarray
    """(4, 4) voxel → RAS mm of :attr:`shape` (a NIfTI's own affine)."""
    sources: tuple[Path, ...] = ()
    """DICOM files in slice order (empty for NIfTI)."""
    series_uid: str | None = None
    _ornt: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.slices.shape[0])

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.slices.shape[1]), int(self.slices.shape[2])

    def to_source(self, labels: np.ndarray) -> np.ndarray:
        """(Z, H, W) labels on the slices → the source's voxel grid (:attr:`shape`), same dtype."""
        if labels.shape != (len(self), *self.hw):
            raise ValueError(f"labels {labels.shape} vs slices {(len(self), *self.hw)}")
        if self.kind == "dicom":
            return np.ascontiguousarray(labels.transpose(2, 1, 0))
        import nibabel as nib

        canon = np.stack([np.rot90(s, k=-1) for s in labels], axis=2)  # inverse of nifti_slice
        out = nib.orientations.apply_orientation(canon, self._ornt)
        assert tuple(out.shape) == self.shape, (out.shape, self.shape)
        return np.ascontiguousarray(out)

    def write_nifti(self, labels: np.ndarray, path: Path) -> Path:
        """Write (Z, H, W) labels as a uint8 NIfTI with the source's shape and affine."""
        import nibabel as nib

        img = nib.Nifti1Image(self.to_source(labels.astype(np.uint8)), self.affine)
        img.header.set_zooms(tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(0))))
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(path))
        return path


def _quarantine(path: Path, e: QuarantineError) -> InputDataError:
    return InputDataError(f"{path.name}: {e.reason}: {e.detail}", "give a readable NIfTI file or DICOM series")


def read_nifti_volume(path: Path) -> Volume:
    """A 3D NIfTI file → :class:`Volume` (RAS+ axial slices, percentile window)."""
    import nibabel as nib

    try:
        canon, _ = read_nifti(path)
        vol = nifti_array(canon).astype(np.float32)
    except QuarantineError as e:
        raise _quarantine(path, e) from None
    orig = nib.load(str(path))
    low, high = percentile_window(vol)
    slices = np.stack([to_rgb(apply_window(nifti_slice(vol, z), low, high)) for z in range(vol.shape[2])])
    zx, zy, zz = (float(v) for v in canon.header.get_zooms()[:3])
    back = nib.orientations.ornt_transform(nib.orientations.io_orientation(canon.affine),
                                           nib.orientations.io_orientation(orig.affine))
    return Volume(slices=slices, spacing=(zz, zy, zx), kind="nifti", shape=tuple(int(s) for s in orig.shape[:3]),
                  affine=np.asarray(orig.affine, np.float64), _ornt=back)


def read_nifti_labels(path: Path, like: Volume) -> np.ndarray:
    """A label NIfTI on the grid of ``like`` (a NIfTI :class:`Volume`) → (Z, H, W) integer labels on its slices."""
    if like.kind != "nifti":
        raise InputDataError(f"label volume {path.name}: NIfTI labels are read for NIfTI images only",
                             "give the image as NIfTI (a DICOM series' labels would be a DICOM-SEG)")
    try:
        img, shape = read_nifti(path)
        lab = nifti_array(img)
    except QuarantineError as e:
        raise _quarantine(path, e) from None
    if tuple(shape[:3]) != tuple(like.shape):
        raise InputDataError(f"label volume {path.name} has shape {shape}, the image {like.shape}",
                             "give the label volume of this image")
    return np.stack([nifti_slice(lab, z) for z in range(lab.shape[2])]).astype(np.int32)


def _series_headers(folder: Path) -> dict[str, list[tuple[Path, Any]]]:
    """SeriesInstanceUID → [(file, header)] of the image files (not DICOM-SEG) in ``folder`` (not recursive)."""
    groups: dict[str, list[tuple[Path, Any]]] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or sniff_kind(p) != "dicom":
            continue
        try:
            ds = dcm.read_header(p)
        except QuarantineError:
            continue
        if dcm.is_seg(ds) or "ImagePositionPatient" not in ds:
            continue
        groups.setdefault(str(ds.get("SeriesInstanceUID", "") or ""), []).append((p, ds))
    return groups


def _choose(groups: dict[str, list[tuple[Path, Any]]], series: str | None, folder: Path) -> str:
    if not groups:
        raise InputDataError(f"{folder} holds no DICOM image slices with a position",
                             "give a folder of one DICOM series, or a NIfTI file")
    if series is not None:
        hits = [uid for uid, files in groups.items()
                if series == uid or series == str(files[0][1].get("SeriesNumber", ""))]
        if len(hits) != 1:
            raise InputDataError(f"--series {series} matches {len(hits)} of the {len(groups)} series in {folder}",
                                 "give one SeriesInstanceUID: " + _listing(groups))
        return hits[0]
    if len(groups) > 1:
        raise InputDataError(f"{folder} holds {len(groups)} DICOM series: {_listing(groups)}",
                             "choose one with --series UID (or its SeriesNumber)")
    return next(iter(groups))


def _listing(groups: dict[str, list[tuple[Path, Any]]]) -> str:
    return "; ".join(f"{uid} (SeriesNumber {files[0][1].get('SeriesNumber', '?')}, "
                     f"{files[0][1].get('Modality', '?')}, {len(files)} files)" for uid, files in groups.items())


def read_dicom_series(folder: Path, series: str | None = None) -> Volume:
    """A folder with one DICOM series (or several and ``series``: a SeriesInstanceUID or SeriesNumber) →
    :class:`Volume` of its slices in position order."""
    groups = _series_headers(folder)
    uid = _choose(groups, series, folder)
    files = groups[uid]
    iop = np.array([float(v) for v in files[0][1].ImageOrientationPatient], np.float64)
    row_dir, col_dir = iop[:3], iop[3:]  # direction of increasing column index, of increasing row index
    normal = np.cross(row_dir, col_dir)
    files.sort(key=lambda f: float(np.dot(normal, [float(v) for v in f[1].ImagePositionPatient])))
    pos = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in files])
    sizes = {(int(ds.Rows), int(ds.Columns)) for _, ds in files}
    if len(sizes) != 1:
        raise InputDataError(f"series {uid} mixes slice sizes {sorted(sizes)}", "give a series of equal slices")
    if len(files) > 1 and np.unique(np.round(pos @ normal, 3)).size != len(files):
        raise InputDataError(f"series {uid} has several slices at one position",
                             "give one acquisition (e.g. one echo or phase) per folder")
    dr, dc = (float(v) for v in files[0][1].PixelSpacing)  # between rows, between columns
    step = (pos[-1] - pos[0]) / (len(files) - 1) if len(files) > 1 else normal * float(
        files[0][1].get("SliceThickness", 1.0) or 1.0)
    slices = []
    for p, _ in files:
        try:
            slices.append(dcm.decode_image(p)[0][0])
        except QuarantineError as e:
            raise _quarantine(p, e) from None
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * dc, col_dir * dr, step, pos[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM LPS → NIfTI RAS
    rows, cols = sizes.pop()
    return Volume(slices=np.stack(slices), spacing=(float(np.linalg.norm(step)), dr, dc), kind="dicom",
                  shape=(cols, rows, len(files)), affine=affine, sources=tuple(p for p, _ in files), series_uid=uid)


def source_datasets(vol: Volume) -> list[Any]:
    """The pydicom datasets of a DICOM volume's slices in order, headers only, for a DICOM-SEG that references
    them. An anonymiser may blank SOPClassUID / SOPInstanceUID in the body (the shared TotalSegmentator series
    does): they are filled in memory from the file meta (MediaStorageSOPClassUID / MediaStorageSOPInstanceUID),
    else the class from the modality (:data:`IMAGE_SOP_CLASS`), so the SEG references each slice."""
    out = []
    for p in vol.sources:
        ds = dcm.read_header(p)
        meta = getattr(ds, "file_meta", None)
        meta = meta if meta is not None else {}
        if not str(ds.get("SOPClassUID", "") or "").strip():
            ds.SOPClassUID = str(meta.get("MediaStorageSOPClassUID", "") or "") or IMAGE_SOP_CLASS.get(
                dcm.modality_of(ds), "1.2.840.10008.5.1.4.1.1.7")
        if not str(ds.get("SOPInstanceUID", "") or "").strip():
            uid = str(meta.get("MediaStorageSOPInstanceUID", "") or "")
            if not uid:
                raise InputDataError(f"{p.name} has no SOPInstanceUID", "a DICOM-SEG cannot reference this slice")
            ds.SOPInstanceUID = uid
        out.append(ds)
    return out


def read_volume(path: Path, series: str | None = None) -> Volume:
    """A NIfTI file (``.nii`` / ``.nii.gz``) or a DICOM series folder → :class:`Volume`."""
    path = Path(path)
    if not path.exists():
        raise InputDataError(f"volume not found: {path}", "give a NIfTI file or a DICOM series folder")
    if path.is_dir():
        return read_dicom_series(path, series)
    if ext_of(path.name) in (".nii", ".nii.gz"):
        return read_nifti_volume(path)
    raise InputDataError(f"{path.name} is not a volume", "give a NIfTI file (.nii/.nii.gz) or a DICOM series folder")
