"""A burst of real ``medsam2.labels.arrived`` events on the running stack (Prefect server, its automation, the
``on-new-labels`` deployment, a process worker) trains the new data version once: every event starts a triggered
run, the deployment's concurrency limit of 1 serialises them, and every run after the first finds the data version
already trained and gated ("skipped: no new labels")."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO, copy_kvasir_subset
from tests.flows.conftest import flow_runs, python_json, wait_idle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
BURST = 3


def _emit(env: dict, workdir: str, dataset_version: str, n: int) -> None:
    """``n`` events, as ``ingest-data`` emits them, sent to the stack's Prefect server from a separate process."""
    code = (
        "import json\nfrom prefect.events import emit_event\nfrom prefect.events.worker import EventsWorker\n"
        "from flows.lifecycle import LABELS_ARRIVED\n"
        f"for _ in range({n}):\n"
        f"    emit_event(LABELS_ARRIVED, resource={{'prefect.resource.id': 'medsam2.workdir.{workdir}'}},\n"
        f"               payload={{'dataset_version': {dataset_version!r}, 'workdir': {workdir!r}, 'added': 8}})\n"
        "EventsWorker.drain_all()\nprint(json.dumps({'sent': " + str(n) + "}))"
    )
    assert python_json({**env, "PYTHONPATH": str(REPO)}, code) == {"sent": n}


def test_a_burst_of_label_events_trains_the_data_version_once(stack, tmp_path):
    from mlflow import MlflowClient

    env, home = stack
    busy = wait_idle(env)  # an earlier test's triggered run would share the deployment's concurrency slot
    assert not busy, f"flow runs of earlier tests still active: {busy}"
    data = copy_kvasir_subset(tmp_path / "kvasir-seg", n_train=4, n_val=2, n_test=2)
    workdir = str(tmp_path / f"work-{uuid.uuid4().hex[:6]}")
    ing = subprocess.run(["medsam2", "ingest", str(data), "--workdir", workdir, "--json"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert ing.returncode == 0, ing.stderr[-2000:]
    version = json.loads(ing.stdout.strip().splitlines()[-1])["dataset_version"]
    worker_log = Path(home, "logs", "prefect-worker.log")
    skips_before = worker_log.read_text().count("skipped: no new labels")

    _emit(env, workdir, version, BURST)
    deadline, ours = time.time() + 900, []
    while time.time() < deadline:
        ours = [r for r in flow_runs(env, "train-medsam2") if r["params"].get("workdir") == workdir]
        if len(ours) >= BURST and all(r["state"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in ours):
            break
        time.sleep(5)
    assert len(ours) == BURST and {r["state"] for r in ours} == {"COMPLETED"}, ours  # one run per event
    assert all(r["params"].get("only_if_new_labels") for r in ours), ours  # started by the on-new-labels trigger

    # one training of this data version, read through the MLflow server: one training run, one model version
    client = MlflowClient(env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    trainings = [r for r in client.search_runs(exp_ids, f"params.`data.workdir` = '{workdir}'")
                 if r.info.run_name.startswith("train")]
    assert len(trainings) == 1, [(r.info.run_name, r.info.status) for r in trainings]
    assert trainings[0].data.tags.get("data_version"), trainings[0].data.tags  # the version it trained
    versions = [mv for mv in client.search_model_versions("name = 'medsam2'") if mv.run_id == trainings[0].info.run_id]
    assert len(versions) == 1, versions
    # and the other runs of the burst said why they did nothing
    assert worker_log.read_text().count("skipped: no new labels") - skips_before == BURST - 1
