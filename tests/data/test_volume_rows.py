"""Volumes as first-class manifest rows (issue 16): the slices of a NIfTI file and of a DICOM series (suffix-less
files, blank SOPClassUID and SeriesInstanceUID) share a ``volume_id``, carry their slice index in position order,
the spacing in mm and the orientation; a volume never straddles train/val/test."""

from __future__ import annotations

import json
import shutil

import pandas as pd

from medsam2.data.ingest import ingest
from medsam2.data.manifest import index_volumes, read_manifest
from medsam2.data.process import _sha_arr
from medsam2.data.volumes import read_volume


def test_nifti_and_dicom_series_rows_are_volumes(sample_data, tmp_path):
    shutil.copytree(sample_data / "dicom" / "totalsegmentator_ct_series", tmp_path / "ser")
    shutil.copytree(sample_data / "totalsegmentator-examples", tmp_path / "ts")
    ingest(str(tmp_path / "ser"), tmp_path / "work")
    ingest(str(tmp_path / "ts"), tmp_path / "work")
    df = read_manifest(tmp_path / "work")
    assert df["volume_id"].notna().all()
    for _, vol in df.groupby("volume_id"):
        assert vol["split"].nunique() == 1 and vol["patient_id"].nunique() == 1
        idx = sorted(vol["slice_index"].astype(int).unique())
        assert idx == list(range(len(idx)))
    ser = df[df["dataset"] == "ser"]
    assert len(ser) == 20 and ser["volume_id"].nunique() == 1 and set(ser["orientation"]) == {"LPS"}
    assert all(s == [2.0, 0.9765625, 0.9765625] for s in ser["spacing_mm"])
    # the manifest's slice order is the order medsam2 predict --volume reads the series in
    # (file names are pseudonymised in the manifest: the decoded pixels say which slice is which)
    vol = read_volume(sample_data / "dicom" / "totalsegmentator_ct_series")
    assert ser.sort_values("slice_index")["pixel_sha256"].tolist() == [_sha_arr(s) for s in vol.slices]
    ct = df[df["source_uri"].str.endswith("example_ct_sm.nii.gz")]
    assert (ct["slice_index"] == ct["frame"]).all() and set(ct["orientation"]) == {"RAS"}
    assert all(s == [3.0, 3.0, 3.0] for s in ct["spacing_mm"])
    assert df["meta"].map(lambda m: "SeriesInstanceUID" not in json.loads(m)).all()


def test_a_volume_gets_one_split_test_first():
    rows = pd.DataFrame({
        "volume_id": ["v1", "v1", "v1", "v2", "v2", None], "split": ["train", "test", "val", "train", "val", "val"],
        "slice_index": pd.array([0, 1, 2, None, None, None], dtype="Int64"), "spacing_mm": [None] * 6,
        "meta": ["{}"] * 3 + [json.dumps({"slice_position_mm": p}) for p in (-4.0, -10.0)] + ["{}"]})
    out = index_volumes(rows)
    assert out["split"].tolist() == ["test", "test", "test", "val", "val", "val"]
    assert out["slice_index"].tolist()[3:5] == [1, 0]
    assert out["spacing_mm"].tolist()[3] == [6.0, None, None]
