"""Ingest accounts by file: the folder decides a file's role before its name, a repeated SOPInstanceUID is
quarantined as ``duplicate_instance``, every file listed is a row, a quarantine row or ignored (checked by the
code at the end of every ingest), and a DICOM-SEG object is never decoded as an image."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from data_helpers import SALT
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medsam2.data import layouts as L
from medsam2.data.ingest import ingest
from medsam2.data.manifest import read_manifest, read_quarantine
from medsam2.data.readers import QuarantineError
from medsam2.errors import InternalError

RNG = np.random.default_rng(0)


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _pair(root: Path, stem: str) -> None:
    _png(root / "images" / f"{stem}.png", RNG.integers(0, 255, (32, 40, 3), dtype=np.uint8))
    m = np.zeros((32, 40), np.uint8)
    m[8:20, 10:30] = 255
    _png(root / "masks" / f"{stem}.png", m)


def _dicom(path: Path, sop_uid: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, sop_uid
    ds.Modality, ds.PatientID = "CT", "P1"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 32, 32, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = RNG.integers(-1000, 1000, (32, 32), dtype=np.int16).tobytes()  # different pixels per file
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_folder_decides_role_before_the_name() -> None:
    files = ["images/polyp_label_3.png", "masks/polyp_label_3.png", "images/a_mask.png", "masks/a_mask.png",
             "loose/b.png", "loose/b_mask.png"]
    pairs, orphans = L.pair_2d(files, dict.fromkeys(files, "raster"))
    assert orphans == []
    assert sorted((im, mk) for im, mk, _ in pairs) == [
        ("images/a_mask.png", "masks/a_mask.png"),
        ("images/polyp_label_3.png", "masks/polyp_label_3.png"),
        ("loose/b.png", "loose/b_mask.png"),  # outside role folders the name still decides
    ]
    assert L.folder_role("images/x_seg.png") == "image" and L.folder_role("data/masks/x.png") == "mask"
    assert L.folder_role("x_seg.png") is None


def test_image_named_like_a_mask_is_ingested_as_an_image(tmp_path: Path) -> None:
    src = tmp_path / "lab-polyps"
    for stem in ("polyp_label_3", "case_mask", "plain"):
        _pair(src, stem)
    res = ingest(str(src), tmp_path / "w", salt=SALT)
    df = read_manifest(tmp_path / "w")
    assert res.quarantined == {} and res.dataset_rows == 3, res.quarantined
    assert (df["label_kind"] == "mask").all()
    assert sorted(Path(u).name for u in df["source_uri"]) == ["case_mask.png", "plain.png", "polyp_label_3.png"]
    assert res.files_seen == 6


def test_repeated_sop_instance_uid_is_quarantined_naming_the_first(tmp_path: Path) -> None:
    src = tmp_path / "ct-export"
    uid = generate_uid()
    _dicom(src / "a" / "first.dcm", uid)
    _dicom(src / "b" / "second.dcm", uid)  # another file, other pixels, the same instance UID
    _dicom(src / "c" / "other.dcm", generate_uid())
    res = ingest(str(src), tmp_path / "w", salt=SALT)
    q = read_quarantine(tmp_path / "w")
    assert res.dataset_rows == 2 and res.quarantined == {"duplicate_instance": 1}
    (row,) = q.itertuples()
    assert row.source_uri.endswith("b/second.dcm") and row.detail.endswith("a/first.dcm")
    assert res.inputs_seen == 3 == res.files_seen
    again = ingest(str(src), tmp_path / "w", salt=SALT)  # incremental: the same answer from the stat cache
    assert again.quarantined == {"duplicate_instance": 1} and again.unchanged == 2


def test_a_lost_file_is_an_internal_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medsam2.data.ingest as ing

    src = tmp_path / "lab-polyps"
    for stem in ("a", "b"):
        _pair(src, stem)
    (src / "README.md").write_text("sidecar: ignored, not lost\n")
    real = ing.discover

    def drop_one(*args, **kwargs):  # a bug that forgets a unit
        units, ignored, test_stems = real(*args, **kwargs)
        return units[1:], ignored, test_stems

    monkeypatch.setattr(ing, "discover", drop_one)
    with pytest.raises(InternalError, match=r"lost track of 2 of 5 files.*images/a.png"):
        ingest(str(src), tmp_path / "w", salt=SALT)
    monkeypatch.setattr(ing, "discover", real)
    res = ingest(str(src), tmp_path / "w", salt=SALT)
    assert res.files_seen == 5 and res.ignored == 1 and res.dataset_rows == 2


def test_mask_of_a_rejected_unit_goes_with_its_quarantine_row(tmp_path: Path) -> None:
    src = tmp_path / "lab-polyps"
    _pair(src, "a")
    (src / "images" / "b.png").write_bytes((src / "images" / "a.png").read_bytes())  # same bytes as a.png
    _png(src / "masks" / "b.png", np.zeros((32, 40), np.uint8))
    res = ingest(str(src), tmp_path / "w", salt=SALT)
    assert res.quarantined == {"duplicate_content": 1} and res.files_seen == 4


def test_decode_image_rejects_a_dicom_seg(sample_data: Path) -> None:
    from medsam2.data.dicom import SEG_SOP_CLASS, decode_image, read_header
    from medsam2.data.images import read_image_any

    seg = sample_data / "dicom" / "dcmqi" / "liver.dcm"
    assert str(read_header(seg).SOPClassUID) == SEG_SOP_CLASS
    for read in (decode_image, read_image_any):
        with pytest.raises(QuarantineError, match="DICOM-SEG") as e:
            read(seg)
        assert e.value.reason == "seg_not_image"
    frames, _, _ = decode_image(sample_data / "dicom" / "dcmqi" / "ct-3slice" / "01.dcm")  # images still decode
    assert frames[0].dtype == np.uint8 and frames[0].ndim == 3


def test_the_same_files_under_a_new_folder_are_accounted_for(tmp_path: Path) -> None:
    """New labels arrive as a new copy of the dataset folder (the earlier files plus new ones): the earlier
    units are reused from the first ingest and count as rows; the check used to call them lost (InternalError),
    which failed the ingest-data flow of the retraining loop."""
    first, more = tmp_path / "v1" / "lab-polyps", tmp_path / "v2" / "lab-polyps"
    for stem in ("a", "b"):
        _pair(first, stem)
    shutil.copytree(first, more)
    _pair(more, "c")
    ingest(str(first), tmp_path / "w", salt=SALT)
    res = ingest(str(more), tmp_path / "w", salt=SALT)
    assert res.files_seen == 6 and res.rows == 3 and res.added == 1 and res.unchanged == 2
    assert len(read_manifest(tmp_path / "w")) == 3
