"""The real thing: a Prefect server, an MLflow server and a process worker started by the test (the same
scripts as `make demo`), `prefect deploy --all` of prefect.yaml, then

1. `prefect deployment run train-medsam2/demo` ends COMPLETED with a `champion` in the MLflow registry;
2. ingesting new labelled images through the `ingest-data` deployment emits `medsam2.labels.arrived`, and the
   `on-new-labels` trigger starts a gated retraining run;
3. a rerun of `retrain-on-new-labels` with no new labels ends "skipped".
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, copy_kvasir_subset, sample_root

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
TINY = ("model.image_size=64 train.max_steps=2 train.batch_size=2 train.eval_every=2 train.warmup_steps=1 "
        "data.augment=none train.max_minutes=null")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if sample_root() is None:
        pytest.skip("real sample data not found: set MEDSAM2_SAMPLE_DATA to the shared data folder")
    home = tmp_path_factory.mktemp("stack")
    env = {**os.environ, "MEDSAM2_HOME": str(home), "MEDSAM2_PREFECT_PORT": str(_free_port()),
           "MEDSAM2_MLFLOW_PORT": str(_free_port()), "MEDSAM2_OVERRIDES": TINY}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    up = subprocess.run(["bash", "scripts/up.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert up.returncode == 0, up.stdout + up.stderr
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{env['MEDSAM2_PREFECT_PORT']}/api"
    env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{env['MEDSAM2_MLFLOW_PORT']}"
    env["MEDSAM2_ROOT"] = str(REPO)
    env["PATH"] = f"{REPO / '.venv' / 'bin'}:{env['PATH']}"
    dep = subprocess.run(["prefect", "--no-prompt", "deploy", "--all"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=400)
    assert dep.returncode == 0, dep.stdout[-3000:] + dep.stderr[-3000:]
    yield env, home
    subprocess.run(["bash", "scripts/down.sh"], cwd=REPO, env=env, capture_output=True, timeout=120)


def _run(env, deployment: str, params: dict) -> str:
    args = ["prefect", "deployment", "run", deployment, "--watch", "--watch-timeout", "900"]
    for k, v in params.items():
        args += ["--param", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1000)
    return proc.stdout + proc.stderr


def _flow_runs(env, flow_name: str) -> list[dict]:
    code = ("import asyncio, json\nfrom prefect.client.orchestration import get_client\n"
            "from prefect.client.schemas.filters import FlowFilter, FlowFilterName\n"
            "async def main():\n  async with get_client() as c:\n"
            f"    runs = await c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[{flow_name!r}])))\n"
            "    print(json.dumps([{'id': str(r.id), 'state': r.state_type.value, 'deployment': str(r.deployment_id),"
            " 'params': r.parameters} for r in runs]))\nasyncio.run(main())")
    out = subprocess.run([str(REPO / ".venv/bin/python"), "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _champion(env) -> dict:
    out = subprocess.run(["medsam2", "champion", "--json"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_deployment_run_trigger_and_skip(stack, tmp_path):
    env, home = stack
    data = copy_kvasir_subset(tmp_path / "kvasir-seg", n_train=4, n_val=2, n_test=2)
    workdir = str(tmp_path / "work")

    out = _run(env, "train-medsam2/demo", {"source": str(data), "workdir": workdir})
    assert "finished successfully" in out, out[-3000:]
    champ = _champion(env)
    assert champ["version"] == 1 and champ["tags"]["gate_decision"] == "promoted"
    assert "test_dice" in champ["metrics"] and "baseline_ellipse_in_box_dice" in champ["metrics"]

    # New labelled images arrive: ingest-data emits the event, the on-new-labels trigger retrains (gated).
    extra = copy_kvasir_subset(tmp_path / "more" / "kvasir-seg", n_train=6, n_val=2, n_test=2)
    out = _run(env, "ingest-data/default", {"source": str(extra), "workdir": workdir})
    assert "finished successfully" in out, out[-3000:]
    deadline = time.time() + 900
    triggered = []
    while time.time() < deadline:
        runs = [r for r in _flow_runs(env, "train-medsam2") if r["params"].get("only_if_new_labels")]
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
    out = _run(env, "retrain-on-new-labels/default", {"workdir": workdir})
    assert "finished successfully" in out, out[-3000:]
    assert Path(home, "logs", "prefect-worker.log").read_text().count("skipped: no new labels") >= 1
