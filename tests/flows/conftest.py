"""The local stack (Prefect server + MLflow server + process worker, started by the same scripts as `make demo`)
with prefect.yaml deployed, shared by the flow tests of this folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from tests.conftest import GET_SAMPLE_DATA, REPO, remove_checkpoints, sample_root, skip_or_fail

# Worker-level overrides (MEDSAM2_OVERRIDES) shrink every deployment's model so CPU runs take seconds.
TINY = ("model.image_size=64 train.max_steps=2 train.batch_size=2 train.eval_every=2 train.warmup_steps=1 "
        "data.augment=none train.max_minutes=null")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    if sample_root() is None:
        skip_or_fail("real sample data not found", GET_SAMPLE_DATA)
    home = tmp_path_factory.mktemp("stack")
    env = {**os.environ, "MEDSAM2_HOME": str(home), "MEDSAM2_PREFECT_PORT": str(free_port()),
           "MEDSAM2_MLFLOW_PORT": str(free_port()), "MEDSAM2_OVERRIDES": TINY}
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
    remove_checkpoints(home)  # runs/ and mlartifacts/ (GBs over the flow tests); logs and DBs stay


def run_deployment(env, deployment: str, params: dict) -> str:
    args = ["prefect", "deployment", "run", deployment, "--watch", "--watch-timeout", "900"]
    for k, v in params.items():
        args += ["--param", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1000)
    return proc.stdout + proc.stderr


def python_json(env, code: str):
    """Run ``code`` in the project's venv against the stack (``env``) and parse the JSON of its last stdout line."""
    out = subprocess.run([str(REPO / ".venv/bin/python"), "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def flow_runs(env, flow_name: str) -> list[dict]:
    return python_json(env, (
        "import asyncio, json\nfrom prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import FlowFilter, FlowFilterName\n"
        "async def main():\n  async with get_client() as c:\n"
        f"    runs = await c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[{flow_name!r}])))\n"
        "    print(json.dumps([{'id': str(r.id), 'state': r.state_type.value, 'deployment': str(r.deployment_id),"
        " 'params': r.parameters} for r in runs]))\nasyncio.run(main())"))


def wait_idle(env, timeout_s: float = 900) -> list[dict]:
    """Wait until no flow run on the stack is scheduled, pending or running (an earlier test's event-triggered run
    may still be going); returns what is still active at the deadline."""
    code = ("import json\nfrom prefect.client.orchestration import get_client\n"
            "from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, "
            "FlowRunFilterStateType\n"
            "from prefect.client.schemas.objects import StateType\n"
            "active = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]\n"
            "with get_client(sync_client=True) as c:\n"
            "    runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState("
            "type=FlowRunFilterStateType(any_=active))))\n"
            "print(json.dumps([{'id': str(r.id), 'name': r.name, 'state': r.state_type.value,"
            " 'scheduled': str(r.next_scheduled_start_time)} for r in runs]))")
    deadline = time.time() + timeout_s
    while True:
        # cron-scheduled runs of the nightly deployment wait for their time: only imminent ones count
        active = [r for r in python_json(env, code) if r["state"] != "SCHEDULED"]
        if not active or time.time() > deadline:
            return active
        time.sleep(5)


def champion(env) -> dict:
    out = subprocess.run(["medsam2", "champion", "--json"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


