"""`medsam2 suggest` end to end on real images: only the unlabelled train pool is ranked, and the queue holds a
CSV, Label Studio tasks whose pre-annotation is the model's mask, overlays and a DICOM-SEG for the DICOM item."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medsam2.active.pool import labelled_rows, pool_rows
from medsam2.data.labelstudio import rle_to_mask
from medsam2.data.manifest import read_manifest


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medsam2.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_pool_is_the_unlabelled_train_rows_only(pool_workdir):
    workdir, stems = pool_workdir
    df = read_manifest(workdir)
    pool = pool_rows(workdir)
    assert set(pool["split"]) == {"train"} and set(pool["label_kind"]) == {"none"}
    sources = set(pool["source_uri"].map(lambda u: u.rsplit("/", 1)[-1]))
    assert sources == {f"{s}.jpg" for s in stems["train"]} | {"CT_small.dcm"}
    unlabelled_elsewhere = df[(df["label_kind"] == "none") & (df["split"] != "train")]
    assert len(unlabelled_elsewhere) == 3  # a val and a test Kvasir image, the MR: never in the pool
    assert not set(unlabelled_elsewhere["image_id"]) & set(pool["image_id"])
    assert set(labelled_rows(workdir)["label_kind"]) == {"mask"} and len(labelled_rows(workdir)) == 6


@pytest.mark.parametrize("score", ["tta_flip", "kcenter"])
def test_suggest_writes_the_queue(pool_workdir, tiny_checkpoint, tmp_path, score):
    workdir, _ = pool_workdir
    pool = pool_rows(workdir)
    out = tmp_path / "queue"
    res = _cli("suggest", "--model", str(tiny_checkpoint), "--workdir", str(workdir), "--budget", str(len(pool)),
               "--out", str(out), "--score", score, "--label", "polyp", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["n"] == summary["pool"] == len(pool) and summary["score"] == score
    csv = pd.read_csv(out / "queue.csv")
    assert list(csv.columns[:5]) == ["rank", "image_id", "dataset", "source", "score"]
    assert set(csv["image_id"]) == set(pool["image_id"]) and csv["rank"].tolist() == list(range(1, len(pool) + 1))
    if score == "tta_flip":  # a per-image score: the queue is sorted by it
        assert csv["score"].is_monotonic_decreasing and csv["score"].between(0, 1).all()
    tasks = json.loads((out / "labelstudio.json").read_text())
    assert 'value="polyp"' in (out / "labelstudio_config.xml").read_text()
    queue = json.loads((out / "queue.json").read_text())
    by_id = pool.set_index("image_id")
    for t, item in zip(tasks, queue["items"], strict=True):
        assert t["data"]["medsam2_id"] == item["image_id"]
        assert t["data"]["image"].endswith(item["files"]["image"])
        (result,) = t["predictions"][0]["result"]
        assert result["value"]["brushlabels"] == ["polyp"] and t["data"]["image"].startswith("/data/local-files/?d=")
        h, w = int(by_id.loc[item["image_id"], "height"]), int(by_id.loc[item["image_id"], "width"])
        assert (result["original_height"], result["original_width"]) == (h, w)
        mask = rle_to_mask(result["value"]["rle"], h, w)
        assert mask.mean() == pytest.approx(item["foreground_fraction"])
        assert np.array(Image.open(out / item["files"]["image"])).shape == (h, w, 3)
        assert np.array(Image.open(out / item["files"]["overlay"])).shape == (h, w, 3)
    (dicom_item,) = [i for i in queue["items"] if i["source"].endswith("CT_small.dcm")]
    assert "dicom_seg" in dicom_item["files"]
    assert not [i for i in queue["items"] if i is not dicom_item and "dicom_seg" in i["files"]]
    import highdicom as hd
    import pydicom

    seg = hd.seg.segread(out / dicom_item["files"]["dicom_seg"])
    src = pydicom.dcmread(dicom_item["source"])
    refs = [i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence]
    assert src.SOPInstanceUID in refs and (seg.Rows, seg.Columns) == (src.Rows, src.Columns)


def test_budget_larger_than_the_pool_and_empty_pool_are_one_line_answers(pool_workdir, tiny_checkpoint, tmp_path):
    workdir, _ = pool_workdir
    n = len(pool_rows(workdir))
    res = _cli("suggest", "--model", str(tiny_checkpoint), "--workdir", str(workdir), "--budget", str(n + 1),
               "--out", str(tmp_path / "q"), "--json")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    err = json.loads(res.stdout.strip().splitlines()[-1])
    assert f"larger than the unlabelled pool ({n} images)" in err["error"] and f"--budget {n}" in err["hint"]
    assert not (tmp_path / "q").exists()

    labelled_only = tmp_path / "labelled"
    labelled_only.mkdir()
    df = read_manifest(workdir)
    from medsam2.data.manifest import MANIFEST_COLUMNS, write_table

    write_table(df[df["label_kind"] == "mask"], labelled_only / "manifest.parquet", MANIFEST_COLUMNS)
    res = _cli("suggest", "--model", str(tiny_checkpoint), "--workdir", str(labelled_only), "--budget", "1",
               "--out", str(tmp_path / "q2"), "--json")
    assert res.returncode == 3 and "Traceback" not in res.stderr
    assert "unlabelled pool" in json.loads(res.stdout.strip().splitlines()[-1])["error"]
    assert len(res.stderr.strip().splitlines()) == 2  # Error: … and its hint

    res = _cli("suggest", "--model", str(tiny_checkpoint), "--workdir", str(workdir), "--budget", "1",
               "--out", str(tmp_path / "q3"), "--score", "entropyy")
    assert res.returncode == 2 and "is not one of entropy, kcenter, pred_iou, random, tta_flip" in res.stderr
