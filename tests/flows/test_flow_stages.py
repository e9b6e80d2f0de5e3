"""train-medsam2's stages under the Prefect test harness (local SQLite MLflow, tiny model on CPU):

- the optional sweep stage runs the `smoke` space and the final model trains from the best trial's config in
  the flow's own output dir (not the trial's checkpoint dir);
- a burst of retraining runs for one labelled-data version trains it once (the others skip under the
  `medsam2-retrain` slot);
- every run publishes a markdown summary (links to MLflow run and model version, gate decision and reasons)
  and a metrics table, evaluate-model and promote-model included.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

TINY = ["model.image_size=64", "train.max_steps=2", "train.batch_size=2", "train.warmup_steps=1",
        "train.eval_every=2", "data.augment=none", "train.progress=false", "train.max_minutes=null"]


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def flow_env(harness, tracking_env, monkeypatch):
    monkeypatch.delenv("MEDSAM2_OVERRIDES", raising=False)
    return tracking_env


def _artifacts(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def _by_run(key: str, flow_run_id) -> object:
    found = [a for a in _artifacts(key) if a.flow_run_id == flow_run_id]
    assert found, f"no {key} artifact for flow run {flow_run_id}"
    return found[0]


def test_sweep_stage_trains_final_model_from_best_config(kvasir_workdir, tmp_path, flow_env):
    from flows.train import train_medsam2

    overrides = [f"data.workdir={kvasir_workdir}", f"train.output_dir={tmp_path / 'runs'}", *TINY,
                 "tracking.experiment=sweep-stage-test"]
    res = train_medsam2(source=None, config=None, overrides=overrides,
                        sweep={"space": "smoke", "num_samples": 1})
    sweep = res["sweep"]
    assert sweep["space"] == "smoke" and sweep["trials"] == 1
    best = yaml.safe_load(Path(sweep["best_config"]).read_text())
    ckpt = Path(res["train"]["checkpoint"])
    assert ckpt.is_relative_to(tmp_path / "runs"), ckpt  # the flow's run-scoped dir, not the trial's
    assert not ckpt.is_relative_to(Path(best["train"]["output_dir"]))
    assert res["train"]["steps"] == best["train"]["max_steps"]  # trained afresh from the best config
    promo = res["promotion"]  # gated on val: promoted, or rejected with the baseline named
    assert promo["selection"]["split"] == "val" and (promo["promoted"] or "ellipse_in_box" in promo["summary"])
    from mlflow import MlflowClient

    client = MlflowClient()
    sweep_parent = client.get_run(sweep["parent_run_id"])
    assert sweep_parent.data.tags.get("mlflow.parentRunId") == res["parent_run_id"]  # nested in the pipeline


def test_training_stage_on_two_workers_makes_one_run_and_one_version(kvasir_workdir, tmp_path, flow_env,
                                                                     monkeypatch):
    """The ``scale_out`` parameter: the model trains on 2 Ray Train workers, one MLflow run nested under the
    pipeline run, then the usual evaluate → promote, which registers one model version."""
    from mlflow import MlflowClient

    from flows.train import train_medsam2

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    overrides = [f"data.workdir={kvasir_workdir}", f"train.output_dir={tmp_path / 'runs'}", *TINY,
                 "train.max_steps=4", "train.batch_size=4", "tracking.experiment=scale-out-test"]
    res = train_medsam2(source=None, config=None, overrides=overrides, scale_out={"num_workers": 2})
    trained = res["train"]
    assert trained["num_workers"] == 2 and trained["steps"] == 4
    client = MlflowClient()
    run = client.get_run(trained["run_id"])
    assert run.data.tags.get("mlflow.parentRunId") == res["parent_run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["num_workers"] == "2"
    versions = client.search_model_versions("name = 'medsam2'")
    assert len(versions) == 1, [(v.version, v.run_id) for v in versions]


def test_burst_trains_once_and_every_flow_publishes_artifacts(kvasir_workdir, tmp_path, flow_env):
    from flows.lifecycle import evaluate_model, promote_model
    from flows.train import train_medsam2

    overrides = [f"data.workdir={kvasir_workdir}", f"train.output_dir={tmp_path / 'runs'}", *TINY,
                 "tracking.experiment=burst-test"]
    results: list[dict] = []
    errors: list[BaseException] = []
    run_ids: list = []

    def run() -> None:  # what each medsam2.labels.arrived event of a burst starts
        try:
            state = train_medsam2(source=None, config=None, overrides=overrides, only_if_new_labels=True,
                                  return_state=True)
            run_ids.append(state.state_details.flow_run_id)
            results.append(state.result())
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert not errors, errors
    trained = [r for r in results if not r.get("skipped")]
    assert len(results) == 3 and len(trained) == 1, results  # one training for one data version
    assert all(r["reason"] == "no new labels" for r in results if r.get("skipped"))

    summaries = [_by_run("train-medsam2-summary", r) for r in run_ids]  # other tests share the harness
    assert all(_by_run("train-medsam2-metrics", r) for r in run_ids)
    done = next(a.data for a in summaries if "skipped" not in a.data)
    promo = trained[0]["promotion"]
    decision = "promoted" if promo["promoted"] else "not promoted (rejected, stays challenger)"
    assert f"Gate decision: **{decision}** — {promo['summary']}" in done
    assert f"models:/medsam2/{promo['version']}" in done and "Decided on the `val` split" in done
    assert trained[0]["parent_run_id"] in done and trained[0]["train"]["run_id"] in done
    assert sum("skipped: no new labels" in a.data for a in summaries) == 2

    ev_state = evaluate_model(model=f"models:/medsam2/{promo['version']}",
                              overrides=[f"data.workdir={kvasir_workdir}"], return_state=True)
    ev = ev_state.result()
    assert ev["run_id"] in _by_run("evaluate-model-summary", ev_state.state_details.flow_run_id).data
    table = _by_run("evaluate-model-metrics", ev_state.state_details.flow_run_id)
    assert "test_dice" in str(table.data)

    pr_state = promote_model(model_uri=trained[0]["train"]["model_uri"], eval_run_id=ev["run_id"], config=None,
                             workdir=str(kvasir_workdir), return_state=True)
    pr = pr_state.result()
    md = _by_run("promote-model-summary", pr_state.state_details.flow_run_id).data
    assert "Gate decision:" in md and "Gate reasons:" in md and all(r in md for r in pr["reasons"])
    assert f"models:/medsam2/{pr['version']}" in md
    assert _by_run("promote-model-metrics", pr_state.state_details.flow_run_id)


def test_model_version_url_follows_the_mlflow_ui(monkeypatch):
    from flows.artifacts import model_version_link, model_version_url

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000/")
    assert model_version_url("medsam2", 3) == "http://mlflow.example:5000/#/models/medsam2/versions/3"
    assert model_version_link("medsam2", 3) == "[medsam2 v3](http://mlflow.example:5000/#/models/medsam2/versions/3)"
