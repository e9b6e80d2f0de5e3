"""Ingest of real sample data: pairing per layout, cache contract, splits, incremental behaviour."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
from data_helpers import SALT

from medsam2.data.ingest import IngestResult, ingest
from medsam2.data.manifest import MANIFEST_COLUMNS, dataset_version, read_manifest, read_quarantine


def _check_cache(workdir: Path, df: pd.DataFrame) -> None:
    for r in df.itertuples():
        img = np.load(workdir / r.image_uri, mmap_mode="r")
        assert img.dtype == np.uint8 and img.shape == (r.height, r.width, 3)
        if r.label_kind == "mask":
            m = np.load(workdir / r.mask_uri, mmap_mode="r")
            assert m.dtype == np.uint8 and m.shape == (r.height, r.width) and int(m.max()) <= 1
            assert abs(float(m.mean()) - r.mask_fraction) < 1e-9
        else:
            assert r.mask_uri is None or pd.isna(r.mask_uri)


def test_kvasir_subset_contract_and_incremental(kvasir_small: Path, tmp_path: Path) -> None:
    wd = tmp_path / "work"
    res = ingest(str(kvasir_small), wd, salt=SALT)
    assert isinstance(res, IngestResult)
    d = res.to_dict()
    json.dumps(d)  # JSON-serialisable for the CLI
    for k in (
        "added",
        "unchanged",
        "updated",
        "quarantined",
        "rows",
        "inputs_seen",
        "dataset_version",
        "labels_changed",
    ):
        assert k in d
    assert (res.added, res.unchanged, res.updated, res.rows, res.inputs_seen) == (10, 0, 0, 10, 10)
    assert res.dataset == "kvasir-seg" and res.labels_changed and res.quarantined == {}
    df = read_manifest(wd)
    assert list(df.columns[: len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
    assert (
        df["image_id"].is_unique
        and set(df["label_kind"]) == {"mask"}
        and set(df["modality"]) == {"endoscopy"}
    )
    _check_cache(wd, df)
    # frozen test list honoured; masks binarised (JPEG noise) and flagged; boxes = tight mask boxes
    test = set((kvasir_small / "split_pranet_test.txt").read_text().split())
    stems = df["source_uri"].map(lambda u: Path(u).stem)
    assert (df.loc[stems.isin(test), "split"] == "test").all() and len(test) == 3
    assert set(df.loc[~stems.isin(test), "split"]) <= {"train", "val"}
    assert df["flags"].str.contains("binarised").all()
    for r in df.itertuples():
        m = np.load(wd / r.mask_uri)
        ys, xs = np.nonzero(m)
        assert list(r.box) == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert df["patient_id"].str.fullmatch(r"p[0-9a-f]{16}").all()
    assert res.dataset_version == dataset_version(df)

    # re-run: nothing decoded, nothing added, same version
    again = ingest(str(kvasir_small), wd, salt=SALT)
    assert (again.added, again.unchanged, again.updated, again.decoded_units) == (0, 10, 0, 0)
    assert again.dataset_version == res.dataset_version and not again.labels_changed
    cols = [c for c in MANIFEST_COLUMNS if c != "ingested_at"]
    pd.testing.assert_frame_equal(read_manifest(wd)[cols], df[cols])

    # change one mask → one row updated, labels changed; delete one image → removed + its mask quarantined
    mask = next((kvasir_small / "masks").iterdir())
    m = np.zeros((10, 10), np.uint8)
    from PIL import Image

    w, h = Image.open(mask).size
    m = np.zeros((h, w), np.uint8)
    m[h // 4 : h // 2, w // 4 : w // 2] = 255
    Image.fromarray(m).save(mask, format="PNG")
    os.utime(mask, (time.time() + 5, time.time() + 5))
    upd = ingest(str(kvasir_small), wd, salt=SALT)
    assert (upd.added, upd.updated, upd.unchanged) == (0, 1, 9) and upd.labels_changed
    victim = sorted((kvasir_small / "images").iterdir())[-1]
    victim.unlink()
    rem = ingest(str(kvasir_small), wd, salt=SALT)
    assert rem.removed == 1 and rem.dataset_rows == 9 and rem.quarantined == {"mask_without_image": 1}
    assert rem.inputs_seen == 10
    assert len(list((wd / "cache").glob("*.npy"))) == 18  # orphan cache files of the removed row are gone


def test_cvc_full_grouped_by_sequence(sample_data: Path, tmp_path: Path) -> None:
    res = ingest(str(sample_data / "cvc-clinicdb"), tmp_path / "w", salt=SALT)
    df = read_manifest(tmp_path / "w")
    assert res.dataset_rows == 87 and res.inputs_seen == 88
    # the original TIFF pair decodes (tifffile) to exactly the PNG pixels → duplicate, not a second row
    q = read_quarantine(tmp_path / "w")
    assert q["reason"].tolist() == ["duplicate_content"] and q["source_uri"].iloc[0].endswith("1_frame.tif")
    assert df["patient_id"].nunique() == 29  # one group per video sequence
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(df["split"]) == {"train", "val"}
    _check_cache(tmp_path / "w", df)
    # whole dataset as an external test set
    ext = ingest(str(sample_data / "cvc-clinicdb"), tmp_path / "w", salt=SALT, layout={"split": "test"})
    assert ext.splits == {"test": 87} and ext.labels_changed and ext.decoded_units == 0


def test_sam_med2d_per_structure_rows(sample_data: Path, tmp_path: Path) -> None:
    res = ingest(str(sample_data / "sam-med2d-demo"), tmp_path / "w", salt=SALT)
    df = read_manifest(tmp_path / "w")
    assert res.dataset_rows == 31 and res.quarantined == {}
    assert (df["label_kind"] == "mask").sum() == 30
    mr = df[df["label_kind"] == "none"]
    assert len(mr) == 1 and mr["modality"].iloc[0] == "MR" and "amos_0507_31" in mr["source_uri"].iloc[0]
    hip = df[df["target"].fillna("").str.startswith("hip_left")]
    assert sorted(hip["target"]) == ["hip_left_000", "hip_left_001"]
    assert df.groupby("source_uri")["patient_id"].nunique().max() == 1
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    _check_cache(tmp_path / "w", df)


def test_busi_brats_totalseg(sample_data: Path, tmp_path: Path) -> None:
    src = tmp_path / "busi"
    for sub in ("images", "masks"):
        (src / sub).mkdir(parents=True)
        for name in sorted(os.listdir(sample_data / "busi" / sub))[:6]:
            shutil.copy(sample_data / "busi" / sub / name, src / sub / name)
    wd = tmp_path / "w"
    b = ingest(str(src), wd, salt=SALT)
    assert b.dataset_rows == 6 and b.labelled == 6
    br = ingest(str(sample_data / "brats2021-flair-edema"), wd, salt=SALT)
    df = read_manifest(wd)
    brats = df[df["dataset"] == "brats2021-flair-edema"]
    assert (brats["frame"] == -1).sum() == 12  # NPY slices
    assert (brats["frame"] >= 0).sum() + br.quarantined.get("blank_image", 0) == 104  # every volume slice
    assert brats["patient_id"].nunique() == 1 and set(brats["modality"]) == {"MR"}
    ts = ingest(str(sample_data / "totalsegmentator-examples"), wd, salt=SALT)
    t = read_manifest(wd)
    t = t[t["dataset"] == "totalsegmentator-examples"]
    assert ts.dataset_rows == 50 and set(t["modality"]) == {"CT", "MR"} and (t["label_kind"] == "mask").all()
    assert t.groupby("modality")["height"].first().to_dict() == {"CT": 101, "MR": 91}
    _check_cache(wd, read_manifest(wd))
    # per-label rows: one row per label present in a slice
    pl = ingest(
        str(sample_data / "totalsegmentator-examples"),
        tmp_path / "w2",
        salt=SALT,
        layout={"label_mode": "per_label", "skip_empty_slices": True},
    )
    t2 = read_manifest(tmp_path / "w2")
    assert pl.dataset_rows > 200 and t2["target"].str.startswith("label_").all()
    assert (t2["mask_fraction"] > 0).all()


def test_declarative_layout(tmp_path: Path) -> None:
    src = tmp_path / "mine"
    (src / "imgs").mkdir(parents=True)
    (src / "labels").mkdir()
    rng = np.random.default_rng(0)
    from PIL import Image

    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(src / "imgs" / f"case{i}_a.png")
        if i < 3:
            m = np.zeros((40, 50), np.uint8)
            m[5:20, 10 + i : 30] = 255
            Image.fromarray(m).save(src / "labels" / f"case{i}_a_seg.png")
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(src / "labels" / "ghost_seg.png")
    (src / "notes.bin").write_bytes(b"x")  # unknown format: quarantined
    (src / "extra").mkdir()
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(src / "extra" / "x.png")  # outside the layout: ignored
    layout = {
        "images": "imgs/*.png",
        "masks": "labels/{stem}_seg.png",
        "modality": "CT",
        "split": "train",
        "patient": r"^(case\d+)_",
    }
    res = ingest(str(src), tmp_path / "w", layout=layout, salt=SALT)
    df = read_manifest(tmp_path / "w")
    assert res.dataset_rows == 4 and res.quarantined == {"mask_without_image": 1, "unsupported_format": 1}
    assert res.ignored_files == ["extra/x.png"]
    assert (df["label_kind"] == "mask").sum() == 3 and set(df["split"]) == {"train"}
    assert set(df["modality"]) == {"CT"} and df["patient_id"].nunique() == 4
