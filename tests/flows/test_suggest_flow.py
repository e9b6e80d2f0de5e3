"""The ``suggest-labels`` flow under the Prefect test harness: it ranks the unlabelled pool with a model and
publishes the queue as artifacts; an empty pool completes with "nothing to label"; a promotion emits the event
that triggers it; labels coming back through ``ingest-data`` emit ``medsam2.labels.arrived``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.active.conftest import pool_workdir  # noqa: F401  (fixture)
from tests.engine.conftest import tiny_checkpoint  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _artifacts(key: str, flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return [a for a in found if a.flow_run_id == flow_run_id]


def test_suggest_labels_flow_publishes_the_queue(harness, pool_workdir, tiny_checkpoint, tmp_path,  # noqa: F811
                                                 monkeypatch):
    from flows.suggest import suggest_labels
    from medsam2.active.pool import pool_rows

    monkeypatch.setenv("MEDSAM2_HOME", str(tmp_path / "home"))
    workdir, _ = pool_workdir
    n_pool = len(pool_rows(workdir))
    state = suggest_labels(model=str(tiny_checkpoint), workdir=str(workdir), budget=n_pool + 5, score="pred_iou",
                           return_state=True)
    res = state.result()
    assert res["n"] == res["pool"] == n_pool  # a budget past the pool queues the whole pool in a flow
    out = Path(res["out"])
    assert out.is_relative_to(tmp_path / "home" / "queues") and (out / "labelstudio.json").is_file()
    run_id = state.state_details.flow_run_id
    (summary,) = _artifacts("suggest-labels-summary", run_id)
    assert f"{n_pool} of {n_pool} unlabelled images" in summary.data and "pred_iou" in summary.data
    (table,) = _artifacts("suggest-labels-queue", run_id)
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["image_id"] for r in rows] == [r["image_id"] for r in res["items"]]


def test_empty_pool_completes_with_nothing_to_label(harness, pool_workdir, tiny_checkpoint, tmp_path):  # noqa: F811
    from flows.suggest import suggest_labels
    from medsam2.data.manifest import MANIFEST_COLUMNS, read_manifest, write_table

    workdir, _ = pool_workdir
    df = read_manifest(workdir)
    empty = tmp_path / "work"
    empty.mkdir()
    write_table(df[df["label_kind"] == "mask"], empty / "manifest.parquet", MANIFEST_COLUMNS)
    state = suggest_labels(model=str(tiny_checkpoint), workdir=str(empty), budget=3, out=str(tmp_path / "q"),
                           return_state=True)
    assert state.is_completed() and state.result()["n"] == 0
    (summary,) = _artifacts("suggest-labels-summary", state.state_details.flow_run_id)
    assert "nothing to label" in summary.data and not (tmp_path / "q").exists()


def test_a_promotion_emits_the_trigger_event(harness, monkeypatch, tmp_path):
    import prefect.events

    from flows import tasks
    from medsam2.config import load_config

    emitted = []
    monkeypatch.setattr(prefect.events, "emit_event", lambda event, **kw: emitted.append((event, kw)))
    outcomes = iter([{"model_name": "medsam2", "version": 7, "promoted": True},
                     {"model_name": "medsam2", "version": 8, "promoted": False}])
    # the gate's outcome (a real promotion needs a trained model that beats its baseline on val: the slow
    # flow-stage tests run that path)
    monkeypatch.setattr(tasks.steps, "run_promote", lambda *a, **k: next(outcomes))
    cfg = load_config(overrides=[f"data.workdir={tmp_path}"])
    tasks.promote_task.fn("models:/medsam2/7", "run", cfg)
    tasks.promote_task.fn("models:/medsam2/8", "run", cfg)
    assert len(emitted) == 1  # a rejected candidate triggers nothing
    event, kw = emitted[0]
    assert event == tasks.MODEL_PROMOTED == "medsam2.model.promoted"
    assert kw["resource"]["prefect.resource.id"] == "medsam2.model.medsam2"
    assert kw["payload"]["model_uri"] == "models:/medsam2/7" and kw["payload"]["workdir"] == str(tmp_path)


def test_labels_back_through_ingest_data_emit_labels_arrived(harness, pool_workdir, tmp_path,  # noqa: F811
                                                               monkeypatch):
    import shutil

    import numpy as np
    from PIL import Image

    import flows.lifecycle as lifecycle
    from medsam2.active.pool import pool_rows

    emitted = []
    monkeypatch.setattr(lifecycle, "emit_event", lambda event, **kw: emitted.append((event, kw)))
    workdir = tmp_path / "work"
    shutil.copytree(pool_workdir[0], workdir)
    row = pool_rows(workdir).iloc[0]
    masks = tmp_path / "masks"
    masks.mkdir()
    mask = np.zeros((int(row["height"]), int(row["width"])), np.uint8)
    mask[5:50, 5:60] = 255
    Image.fromarray(mask).save(masks / f"{row['image_id']}.png")
    res = lifecycle.ingest_data(source=str(masks), workdir=str(workdir), labels=True)
    assert res["added"] == 1 and res["labels_changed"] is True
    ((event, kw),) = emitted
    assert event == lifecycle.LABELS_ARRIVED and kw["payload"]["dataset_version"] == res["dataset_version"]
    assert row["image_id"] not in set(pool_rows(workdir)["image_id"])
    emitted.clear()
    assert lifecycle.ingest_data(source=str(masks), workdir=str(workdir), labels=True)["labels_changed"] is False
    assert emitted == []  # the same labels again: no retraining trigger
