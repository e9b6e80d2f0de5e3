"""≥ 20 kinds of bad input made in tmp_path: each is quarantined with its reason; ingest never crashes."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medsam2.data.ingest import ingest
from medsam2.data.manifest import read_manifest, read_quarantine

RNG = np.random.default_rng(0)


def png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def noise(h: int = 40, w: int = 50) -> np.ndarray:
    return RNG.integers(0, 255, (h, w), dtype=np.uint8)


def bomb_png(path: Path, w: int = 30000, h: int = 30000) -> None:
    """A PNG whose header declares w×h (decompression bomb); the data is a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def dicom(path: Path, *, ts: str = ExplicitVRLittleEndian, pixels: bool = True, burned: bool = False) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.PatientName = "CT", "Q123", "Bad^Input"
    if burned:
        ds.BurnedInAnnotation = "YES"
    if pixels:
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 32, 32, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        raw = RNG.integers(-1000, 1000, (32, 32), dtype=np.int16).tobytes()
        if ts != ExplicitVRLittleEndian:  # a compressed syntax: encapsulate (the bytes are not really MPEG2)
            from pydicom.encaps import encapsulate

            raw = encapsulate([raw])
        ds.PixelData = raw
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def npy(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)


def build_bad_source(root: Path, outside: Path) -> dict[str, str]:
    """Create the bad inputs; returns {relative path: expected reason}."""
    img, msk = root / "images", root / "masks"
    good = noise()
    png(img / "good.png", good)
    m = np.zeros((40, 50), np.uint8)
    m[10:20, 10:30] = 255
    png(msk / "good.png", m)
    png(img / "negative.png", noise())  # valid negative: kept with flag
    png(msk / "negative.png", np.zeros((40, 50), np.uint8))
    exp: dict[str, str] = {}

    (img / "zero.png").write_bytes(b"")
    exp["images/zero.png"] = "zero_byte"
    (img / "garbage.png").write_bytes(RNG.integers(0, 255, 500, dtype=np.uint8).tobytes())
    exp["images/garbage.png"] = "corrupt"
    buf = io.BytesIO()
    Image.fromarray(np.stack([noise(200, 200)] * 3, -1)).save(buf, format="JPEG")
    (img / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    exp["images/truncated.jpg"] = "truncated"
    (root / "weird.xyz").write_bytes(b"hello")
    exp["weird.xyz"] = "unsupported_format"
    png(img / "mismatch.png", noise())
    png(msk / "mismatch.png", np.zeros((30, 30), np.uint8))
    exp["images/mismatch.png"] = "size_mismatch"
    png(msk / "orphan.png", m)
    exp["masks/orphan.png"] = "mask_without_image"
    png(img / "gradient.png", noise())
    png(msk / "gradient.png", np.tile(np.linspace(0, 255, 50).astype(np.uint8), (40, 1)))
    exp["images/gradient.png"] = "non_binary_mask"
    png(img / "multilabel.png", noise())
    png(
        msk / "multilabel.png",
        np.repeat(np.array([0, 1, 2, 3], np.uint8), [10, 10, 10, 10])[:, None].repeat(50, 1),
    )
    exp["images/multilabel.png"] = "non_binary_mask"
    png(outside / "secret.png", noise())
    (img / "escape.png").symlink_to(outside / "secret.png")
    exp["images/escape.png"] = "outside_root"
    (root / "linked_dir").symlink_to(outside, target_is_directory=True)
    exp["linked_dir"] = "outside_root"
    (img / "dangling.png").symlink_to(root / "nope.png")
    exp["images/dangling.png"] = "broken_link"
    (img / "zz_copy.png").write_bytes((img / "good.png").read_bytes())
    exp["images/zz_copy.png"] = "duplicate_content"
    bomb_png(img / "bomb.png")
    exp["images/bomb.png"] = "too_large"
    png(img / "tiny.png", noise(4, 4))
    exp["images/tiny.png"] = "too_small"
    png(img / "blank.png", np.full((40, 50), 7, np.uint8))
    exp["images/blank.png"] = "blank_image"
    npy(img / "nan.npy", np.full((40, 50), np.nan, np.float32))
    exp["images/nan.npy"] = "nan_inf"
    npy(img / "vector.npy", np.arange(100, dtype=np.float32))
    exp["images/vector.npy"] = "wrong_ndim"
    npy(img / "complex.npy", np.ones((40, 50), np.complex64))
    exp["images/complex.npy"] = "unsupported_dtype"
    npy(img / "empty.npy", np.zeros((0, 50), np.float32))
    exp["images/empty.npy"] = "empty_image"
    with open(img / "huge.npy", "wb") as f:  # header says 30000 x 30000, data absent
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (30000, 30000)}
        )
    exp["images/huge.npy"] = "too_large"
    npy(img / "short.npy", np.ones((40, 50), np.float32))
    (img / "short.npy").write_bytes((img / "short.npy").read_bytes()[:-400])
    exp["images/short.npy"] = "truncated"
    vol = np.ones((20, 20, 4), np.float32)
    vol[0, 0, 0] = np.inf
    (root / "vol").mkdir()
    nib.save(nib.Nifti1Image(vol, np.eye(4)), root / "vol" / "inf_ct.nii.gz")
    exp["vol/inf_ct.nii.gz"] = "nan_inf"
    nib.save(nib.Nifti1Image(np.ones((20, 20, 4, 3), np.float32), np.eye(4)), root / "vol" / "time_ct.nii.gz")
    exp["vol/time_ct.nii.gz"] = "wrong_ndim"
    nib.save(nib.Nifti1Image(np.ones((9, 9, 9), np.uint8), np.eye(4)), root / "vol" / "lonely_seg.nii.gz")
    exp["vol/lonely_seg.nii.gz"] = "mask_without_image"
    (root / "vol" / "broken_mr.nii.gz").write_bytes(b"\x1f\x8b" + b"not gzip at all" * 10)
    exp["vol/broken_mr.nii.gz"] = "corrupt"
    dicom(root / "dcm" / "mpeg.dcm", ts="1.2.840.10008.1.2.4.100")
    exp["dcm/mpeg.dcm"] = "unsupported_transfer_syntax"
    dicom(root / "dcm" / "nopixels.dcm", pixels=False)
    exp["dcm/nopixels.dcm"] = "no_pixel_data"
    dicom(root / "dcm" / "burned.dcm", burned=True)
    exp["dcm/burned.dcm"] = "burned_in_phi"
    dicom(root / "dcm" / "cut.dcm")
    (root / "dcm" / "cut.dcm").write_bytes((root / "dcm" / "cut.dcm").read_bytes()[:-1000])
    exp["dcm/cut.dcm"] = "truncated"
    (root / "dcm" / "fake").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10")  # magic, then nothing
    exp["dcm/fake"] = "corrupt"
    (root / "README.md").write_text("sidecar, not an input")
    return exp


def test_bad_inputs_are_quarantined(tmp_path: Path) -> None:
    root, outside = tmp_path / "bad", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    expected = build_bad_source(root, outside)
    assert len(set(expected.values())) >= 20
    res = ingest(str(root), tmp_path / "w", salt="s")
    q = read_quarantine(tmp_path / "w")
    got = {u[len(str(root)) + 1 :]: r for u, r in zip(q["source_uri"], q["reason"], strict=True)}
    for rel, reason in expected.items():
        assert got.get(rel) == reason, (
            rel,
            reason,
            got.get(rel),
            q[q["source_uri"].str.endswith(rel)].to_dict(),
        )
    assert set(got) == set(expected), set(got) ^ set(expected)
    assert (q["detail"].str.len() > 0).all()
    df = read_manifest(tmp_path / "w")
    assert sorted(df["source_uri"].map(lambda u: Path(u).name)) == ["good.png", "negative.png"]
    assert (
        df.set_index(df["source_uri"].map(lambda u: Path(u).name)).loc["negative.png", "flags"]
        == "empty_mask"
    )
    assert res.inputs_seen == len(df) + len(q) and res.ignored_files == ["README.md"]
    assert sum(res.quarantined.values()) == len(expected)
    json.dumps(res.to_dict())
    # rerun: the same verdicts, nothing re-decoded except nothing (all cached)
    again = ingest(str(root), tmp_path / "w", salt="s")
    assert again.quarantined == res.quarantined and again.added == 0


def test_declarative_mask_template_cannot_escape(tmp_path: Path) -> None:
    src = tmp_path / "src"
    png(src / "imgs" / "a.png", noise())
    png(tmp_path / "elsewhere" / "a.png", np.zeros((40, 50), np.uint8))
    res = ingest(
        str(src), tmp_path / "w", layout={"images": "imgs/*.png", "masks": "../elsewhere/{stem}.png"}
    )
    assert res.quarantined == {"outside_root": 1} and res.dataset_rows == 0
