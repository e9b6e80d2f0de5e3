"""A worker killed (SIGKILL of its whole process group) in the middle of training leaves the model registry
untouched; a rerun of the same deployment resumes from the last checkpoint and completes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO, copy_kvasir_subset, descendants
from tests.flows.conftest import run_deployment, wait_idle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _store_versions(home: Path, model: str) -> list[dict]:
    """The same as :func:`_server_versions`, read from the stack's SQLite file itself (read-only): only a cross-check
    of what the server answers (a stale read shows as a difference), never what the test decides on."""
    db = sqlite3.connect(f"file:{home / 'mlflow.db'}?mode=ro", uri=True)
    try:
        ours = []
        for version, run_id in db.execute("SELECT version, run_id FROM model_versions WHERE name = ?", (model,)):
            resumed = db.execute("SELECT value FROM tags WHERE run_uuid = ? AND key = 'resumed_from_step'",
                                 (run_id,)).fetchone()
            ours.append({"version": int(version), "resumed": int(resumed[0]) if resumed else 0})
    finally:
        db.close()
    return sorted(ours, key=lambda v: v["version"])


def _server_versions(env: dict, model: str, experiment: str) -> tuple[list[dict], list[dict]]:
    """The versions of this test's own registered model, read through the stack's MLflow server, with the step
    their training resumed from; and the runs of this test's own experiment, for assertion messages."""
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    ours = []
    for mv in client.search_model_versions(f"name = '{model}'"):
        resumed = int(client.get_run(mv.run_id).data.tags.get("resumed_from_step", 0) or 0)
        ours.append({"version": int(mv.version), "resumed": resumed})
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    seen = [{"run": r.info.run_name, "id": r.info.run_id, "status": r.info.status} for r in runs]
    return sorted(ours, key=lambda v: v["version"]), seen


#: the server read is retried this often, this long apart, before its answer counts (a bounded read-after-write
#: allowance; how many tries it took, and whether the store already held the answer, is printed: ``-rP``)
READ_TRIES, READ_PAUSE_S = 10, 0.5


def _read_registered(env: dict, home: Path, model: str, experiment: str, ok) -> tuple[list[dict], list[dict]]:
    """Poll :func:`_server_versions` until ``ok(versions)`` (at most READ_TRIES × READ_PAUSE_S) and report stale
    reads: a try whose answer differs from the SQLite store's at that moment."""
    stale = []
    for attempt in range(1, READ_TRIES + 1):
        store = _store_versions(home, model)
        ours, seen = _server_versions(env, model, experiment)
        if ours != store:
            stale.append({"try": attempt, "server": ours, "store": store})
        if ok(ours):
            break
        time.sleep(READ_PAUSE_S)
    print(f"registry read through the server: {attempt} tr{'y' if attempt == 1 else 'ies'}, "
          f"stale reads (server != store): {stale or 'none'}")
    return ours, seen


def test_killed_worker_leaves_registry_untouched_and_rerun_resumes(stack, tmp_path):
    env, home = stack
    busy = wait_idle(env)  # killing the worker must not hit (or race with) another test's triggered run
    assert not busy, f"flow runs of earlier tests still active: {busy}"
    data = copy_kvasir_subset(tmp_path / "kvasir-seg", n_train=4, n_val=2, n_test=2)
    # its own registered model and experiment: other tests' versions and runs are never looked at
    model = experiment = f"crash-{uuid.uuid4().hex[:8]}"
    params = {"source": str(data), "workdir": str(tmp_path / "work"),
              "overrides": ["train.max_steps=60", "train.checkpoint_every=5",
                            f"train.output_dir={tmp_path / 'runs'}", f"promotion.model_name={model}",
                            f"tracking.experiment={experiment}"]}
    args = ["prefect", "deployment", "run", "train-medsam2/demo"]
    for k, v in params.items():
        args += ["--param", f"{k}={v if isinstance(v, str) else __import__('json').dumps(v)}"]
    subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True)

    deadline = time.time() + 600
    ckpts: list[Path] = []
    while time.time() < deadline and not ckpts:
        ckpts = list((tmp_path / "runs").glob("*/last.pt"))
        time.sleep(2)
    assert ckpts, "training never wrote a checkpoint"
    worker_pid = int(Path(home, "run", "prefect-worker.pid").read_text())
    victims = descendants(worker_pid)  # the flow-run process runs in its own session: kill it explicitly
    assert victims, "no flow-run process under the worker"
    for pid in [worker_pid, *victims]:  # what a machine crash does to both
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(3)
    ours, seen = _read_registered(env, home, model, experiment, ok=lambda v: True)  # one read: nothing to wait for
    assert ours == [] and _store_versions(home, model) == [], \
        f"a crashed training must not register anything: {seen}"

    up = subprocess.run(["bash", "scripts/up.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert up.returncode == 0, up.stderr
    out = run_deployment(env, "train-medsam2/demo", params)
    assert "finished successfully" in out, out[-3000:]
    registered, seen = _read_registered(env, home, model, experiment, ok=lambda v: len(v) == 1)
    assert len(registered) == 1 and registered[0]["resumed"] >= 5, (registered, seen)  # resumed from a checkpoint
