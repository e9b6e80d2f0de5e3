"""great-expectations validation: a clean manifest passes; leakage, bad boxes, missing cache and
non-binary masks are reported as readable failures; Data Docs HTML is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from data_helpers import SALT, copy_kvasir

from medsam2.data.ingest import ingest
from medsam2.data.manifest import MANIFEST_COLUMNS, MANIFEST_NAME, read_manifest, write_table
from medsam2.data.validate import ValidationResult, validate


def test_validate_clean_then_broken(sample_data: Path, tmp_path: Path) -> None:
    wd = tmp_path / "w"
    ingest(str(copy_kvasir(sample_data, tmp_path / "kvasir-seg", n_test=2, n_other=6)), wd, salt=SALT)
    ingest(str(sample_data / "sam-med2d-demo"), wd, salt=SALT)
    ok = validate(wd, data_docs_dir=tmp_path / "docs")
    assert isinstance(ok, ValidationResult)
    assert ok.success, ok.failures
    assert ok.statistics["rows"] == 39 and ok.statistics["unsuccessful_expectations"] == 0
    assert ok.data_docs and Path(ok.data_docs).is_file() and "<html" in Path(ok.data_docs).read_text().lower()
    assert ok.to_dict()["success"] is True

    df = read_manifest(wd)
    test_row = df[df["split"] == "test"].iloc[0]
    train_idx = df.index[df["split"] == "train"]
    df.loc[train_idx[0], "sha256"] = test_row["sha256"]  # test image content in train
    df.loc[train_idx[1], "patient_id"] = test_row["patient_id"]  # patient in two splits
    df.at[train_idx[2], "box"] = [0, 0, 10_000, 5]  # box outside the image
    df.loc[train_idx[3], "split"] = "holdout"  # unknown split
    (wd / df.loc[train_idx[4], "image_uri"]).unlink()  # missing cache file
    mask_path = wd / df.loc[train_idx[5], "mask_uri"]
    m = np.load(mask_path)
    m[0, 0] = 7
    np.save(mask_path, m)  # non-binary mask
    write_table(df, wd / MANIFEST_NAME, MANIFEST_COLUMNS)
    bad = validate(wd)
    assert not bad.success and bad.data_docs is None
    # one needle per planted fault, each matching only that fault's failure line ("split" alone would also
    # match "more than one split"; the unknown split is reported with its value)
    needles = ("same sha256", "more than one split", "box outside", "['holdout']", "image cache", "not binary")
    hits = {n: [f for f in bad.failures if n in f] for n in needles}
    for n, lines in hits.items():
        assert len(lines) == 1, (n, bad.failures)
    assert len({lines[0] for lines in hits.values()}) == len(needles), bad.failures
