"""The real thing: a Prefect server, an MLflow server and a process worker started by the test (the same
scripts as `make demo`), `prefect deploy --all` of prefect.yaml, then

1. `prefect deployment run train-medsam2/demo` ends COMPLETED with a `champion` in the MLflow registry;
2. ingesting new labelled images through the `ingest-data` deployment emits `medsam2.labels.arrived`, and the
   `on-new-labels` trigger starts a gated retraining run;
3. a rerun of `retrain-on-new-labels` with no new labels ends "skipped".
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, copy_kvasir_subset
from tests.flows.conftest import champion, flow_runs, python_json, run_deployment, wait_idle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _versions(env) -> set[int]:
    """Every version of the registered model ``medsam2``, read through the stack's MLflow server."""
    code = ("import json, os\nfrom mlflow import MlflowClient\nuri = os.environ['MLFLOW_TRACKING_URI']\n"
            "c = MlflowClient(uri, registry_uri=uri)\n"
            "print(json.dumps([int(v.version) for v in c.search_model_versions(\"name = 'medsam2'\")]))")
    return set(python_json(env, code))


def test_deployment_run_trigger_and_skip(stack, tmp_path):
    env, home = stack
    busy = wait_idle(env)  # an earlier test's triggered run would take the new-labels slot
    assert not busy, f"flow runs of earlier tests still active: {busy}"
    data = copy_kvasir_subset(tmp_path / "kvasir-seg", n_train=4, n_val=2, n_test=2)
    workdir = str(tmp_path / "work")

    before = _versions(env)  # other tests of the session share the stack's registry
    out = run_deployment(env, "train-medsam2/demo", {"source": str(data), "workdir": workdir})
    assert "finished successfully" in out, out[-3000:]
    new = sorted(_versions(env) - before)
    assert len(new) == 1, (before, new)  # the run registered one version
    (version,) = new
    champ = champion(env)  # the honest gate: champion only if it beat the box-prior baseline (and any champion)
    promoted = champ["version"] == version
    if not promoted:
        last = champ["last_challenger"]
        assert last["version"] == version and last["gate_decision"] == "rejected", champ
        assert last["tags"]["gate_selection_split"] == "val" and last["gate_summary"], last
        assert "test_dice" in last["tags"]  # reported beside the decision
    else:
        assert champ["tags"]["gate_decision"] == "promoted"
        assert "test_dice" in champ["metrics"] and "baseline_ellipse_in_box_dice" in champ["metrics"]
    # The run's artifacts link the MLflow run and the model version in the MLflow UI, with the gate decision.
    md = python_json(env, (
        "import json\nfrom prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey\n"
        "from prefect.client.schemas.sorting import ArtifactSort\n"
        "with get_client(sync_client=True) as c:\n"
        "    arts = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey("
        "any_=['train-medsam2-summary', 'train-medsam2-metrics'])), sort=ArtifactSort.CREATED_DESC)\n"
        "latest = {}\nfor a in arts:\n    latest.setdefault(a.key, str(a.data))\n"
        "print(json.dumps(latest))"))  # the newest of each: this run's (nothing else is running)
    mlflow_ui = env["MLFLOW_TRACKING_URI"]
    summary = md["train-medsam2-summary"]
    assert f"{mlflow_ui}/#/models/medsam2/versions/{version}" in summary and f"{mlflow_ui}/#/experiments/" in summary
    decision = "promoted" if promoted else "not promoted (rejected, stays challenger)"
    assert f"Gate decision: **{decision}**" in summary and "test_dice" in md["train-medsam2-metrics"]

    # New labelled images arrive: ingest-data emits the event, the on-new-labels trigger retrains (gated).
    extra = copy_kvasir_subset(tmp_path / "more" / "kvasir-seg", n_train=6, n_val=2, n_test=2)
    out = run_deployment(env, "ingest-data/default", {"source": str(extra), "workdir": workdir})
    assert "finished successfully" in out, out[-3000:]
    deadline = time.time() + 900
    triggered = []
    while time.time() < deadline:
        runs = [r for r in flow_runs(env, "train-medsam2")
                if r["params"].get("only_if_new_labels") and r["params"].get("workdir") == workdir]
        triggered = [r for r in runs if r["state"] in ("COMPLETED", "FAILED", "CRASHED")]
        if triggered:
            break
        time.sleep(10)
    assert triggered and triggered[0]["state"] == "COMPLETED", triggered
    assert triggered[0]["params"]["workdir"] == workdir
    out = subprocess.run(["medsam2", "retrain-check", "--set", f"data.workdir={workdir}", "--set",
                          "tracking.experiment=polyp-kvasir", "--json"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    check = json.loads(out.stdout.strip().splitlines()[-1])
    assert check["retrain"] is False  # the triggered run trained (and gated) the new data version

    # Nothing new: the retraining flow skips without training.
    out = run_deployment(env, "retrain-on-new-labels/default", {"workdir": workdir})
    assert "finished successfully" in out, out[-3000:]
    assert Path(home, "logs", "prefect-worker.log").read_text().count("skipped: no new labels") >= 1
