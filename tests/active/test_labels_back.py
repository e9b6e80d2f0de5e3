"""Labels coming back: a Label Studio export of the suggest queue and a folder of masks ingest as labels of the
pool's images (bad ones quarantined with a reason), change the training data version that `retrain-check`
compares, and survive a re-ingest of the image source."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from medsam2.active.pool import pool_rows
from medsam2.config import DataCfg
from medsam2.data.manifest import read_manifest, read_quarantine
from medsam2.data.returned_labels import RETURNED_FLAG, ingest_labels
from medsam2.data.selection import training_data_version


@pytest.fixture
def workdir(pool_workdir, tmp_path):
    src, _ = pool_workdir
    dst = tmp_path / "work"
    shutil.copytree(src, dst)
    return dst


def _ingest(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "medsam2.cli", "ingest", *args, "--json"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_label_studio_export_of_the_queue_comes_back_as_labels(workdir, tiny_checkpoint, tmp_path):
    from medsam2.active.pool import rank_pool
    from medsam2.active.queue import write_queue
    from medsam2.engine.checkpoint import load_model

    net, _ = load_model(tiny_checkpoint, "cpu")
    pool = pool_rows(workdir)
    kvasir = pool[pool["dataset"] == "kvasir-seg"]
    items = rank_pool(net, kvasir, workdir, "random", len(kvasir))
    tasks = json.loads(json.dumps(write_queue(items, workdir, tmp_path / "q", score="random", model="m")["items"]))
    ls = json.loads((tmp_path / "q" / "labelstudio.json").read_text())
    h, w = (int(kvasir.set_index("image_id").loc[ls[1]["data"]["medsam2_id"], c]) for c in ("height", "width"))
    drawn = np.zeros((h, w), bool)
    drawn[10:60, 20:90] = True
    from medsam2.data.labelstudio import mask_to_rle

    export = []
    for k, t in enumerate(ls):  # what Label Studio exports after annotation: the task, its annotations
        t = {"id": k + 1, **t}
        result = t["predictions"][0]["result"]
        if k == 0:  # accepted the pre-annotation as is
            t["annotations"] = [{"id": 1, "result": result, "was_cancelled": False}]
        elif k == 1:  # redrew it
            redrawn = [{**result[0], "value": {**result[0]["value"], "rle": mask_to_rle(drawn)}}]
            t["annotations"] = [{"id": 2, "result": redrawn, "was_cancelled": False}]
        elif k == 2:  # a polygon, in percent of the image
            poly = {"type": "polygonlabels", "from_name": "p", "to_name": "image", "original_width": 100,
                    "original_height": 80, "value": {"points": [[10, 10], [50, 10], [50, 50]], "polygonlabels": ["x"]}}
            t["annotations"] = [{"id": 3, "result": [poly], "was_cancelled": False}]  # 100x80: not its size
        else:  # skipped
            t["annotations"] = [{"id": 4, "result": [], "was_cancelled": True}]
        export.append(t)
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export))
    before_version = training_data_version(DataCfg(workdir=str(workdir)))
    res = _ingest(str(path), "--workdir", str(workdir))
    assert res["added"] == 2 and res["labels_changed"] is True
    assert res["quarantined"] == {"label_shape_mismatch": 1, "no_annotation": 1}
    df = read_manifest(workdir).set_index("image_id")
    first, second = tasks[0]["image_id"], tasks[1]["image_id"]
    assert df.loc[first, "label_kind"] == "mask" and RETURNED_FLAG in df.loc[first, "flags"]
    assert np.array_equal(np.load(workdir / df.loc[second, "mask_uri"]) > 0, drawn)
    assert df.loc[first, "mask_fraction"] == pytest.approx(tasks[0]["foreground_fraction"])
    assert set(pool_rows(workdir)["image_id"]) == set(pool["image_id"]) - {first, second}
    assert training_data_version(DataCfg(workdir=str(workdir))) != before_version  # what retrain-check compares
    q = read_quarantine(workdir)
    assert set(q.loc[q["dataset"] == "labels:export", "reason"]) == {"label_shape_mismatch", "no_annotation"}


def test_mask_folder_labels_checked_and_kept_through_a_reingest(workdir, pool_workdir, tmp_path):
    _, stems = pool_workdir
    df = read_manifest(workdir)
    by_stem = {r["source_uri"].rsplit("/", 1)[-1].rsplit(".", 1)[0]: r for _, r in df.iterrows()}
    a, b, c = (by_stem[s] for s in stems["train"][:3])
    labels = tmp_path / "labels"
    labels.mkdir()

    def save(name: str, row, value=255, size=None):
        h, w = size or (int(row["height"]), int(row["width"]))
        m = np.zeros((h, w), np.uint8)
        m[h // 4: h // 2, w // 4: w // 2] = value
        Image.fromarray(m).save(labels / name)

    save(f"{a['image_id']}_mask.png", a)  # by image id
    save(f"{stems['train'][1]}.png", b)  # by the source file's stem
    Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (40, 1))).save(labels / f"{c['image_id']}.png")
    save("no-such-image.png", a)
    save(f"{stems['test'][0]}.png", by_stem[stems["test"][0]])
    labelled = df[df["label_kind"] == "mask"].iloc[0]
    save(f"{labelled['image_id']}.png", labelled)
    res = ingest_labels(labels, workdir)
    assert res.added == 2 and res.labels_changed
    assert res.quarantined == {"already_labelled": 1, "label_for_test_row": 1, "non_binary_mask": 1,
                               "unknown_image": 1}
    version = res.dataset_version

    again = ingest_labels(labels, workdir)  # the same labels again: nothing new
    assert (again.added, again.updated, again.labels_changed) == (0, 2, False)
    src = a["source_uri"].rsplit("/images/", 1)[0]
    (workdir / a["image_uri"]).unlink()  # so that the ingest decodes a's image again: its row is rebuilt
    re_ingest = _ingest(src, "--workdir", str(workdir))  # the image source again: the labels stay
    assert re_ingest["dataset_version"] == version and re_ingest["labels_changed"] is False
    assert re_ingest["decoded_units"] == 1  # a's row came back from its source, its label re-applied
    kinds = read_manifest(workdir).set_index("image_id")["label_kind"]
    assert kinds[a["image_id"]] == kinds[b["image_id"]] == "mask" and kinds[c["image_id"]] == "none"
    from medsam2.data.validate import validate

    report = validate(workdir, data_docs_dir=str(tmp_path / "docs"))  # the returned masks pass the data suite
    assert report.success, report.failures
