"""A worker killed (SIGKILL of its whole process group) in the middle of training leaves the model registry
untouched; a rerun of the same deployment resumes from the last checkpoint and completes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, copy_kvasir_subset, descendants
from tests.flows.conftest import run_deployment, wait_idle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _versions(home: Path, workdir: Path) -> tuple[list[dict], list[dict]]:
    """Registered versions trained on ``workdir`` (other tests share the registry: their versions are never
    looked at), with the step their training resumed from; and our training runs, for assertion messages.

    Read from the stack's SQLite store itself (read-only), the registry's ground truth: in the full CI suite the
    MLflow server's search once answered without a version that its store already held (version created
    21:40:09, searched after 21:40:11); the store is what a restarted server and the UI will show."""
    db = sqlite3.connect(f"file:{home / 'mlflow.db'}?mode=ro", uri=True)
    try:
        runs = db.execute("SELECT r.run_uuid, r.name, r.status FROM runs r JOIN params p ON p.run_uuid = r.run_uuid "
                          "WHERE p.key = 'data.workdir' AND p.value = ?", (str(workdir),)).fetchall()
        ours = []
        for run_id, _, _ in runs:
            resumed = db.execute("SELECT value FROM tags WHERE run_uuid = ? AND key = 'resumed_from_step'",
                                 (run_id,)).fetchone()
            for (version,) in db.execute("SELECT version FROM model_versions WHERE name = 'medsam2' AND run_id = ?",
                                         (run_id,)):
                ours.append({"version": int(version), "resumed": int(resumed[0]) if resumed else 0})
    finally:
        db.close()
    return ours, [{"run": name, "id": rid, "status": status} for rid, name, status in runs]


def test_killed_worker_leaves_registry_untouched_and_rerun_resumes(stack, tmp_path):
    env, home = stack
    busy = wait_idle(env)  # killing the worker must not hit (or race with) another test's triggered run
    assert not busy, f"flow runs of earlier tests still active: {busy}"
    data = copy_kvasir_subset(tmp_path / "kvasir-seg", n_train=4, n_val=2, n_test=2)
    params = {"source": str(data), "workdir": str(tmp_path / "work"),
              "overrides": ["train.max_steps=60", "train.checkpoint_every=5",
                            f"train.output_dir={tmp_path / 'runs'}"]}
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
    ours, seen = _versions(home, tmp_path / "work")
    assert ours == [], f"a crashed training must not register anything: {seen}"

    up = subprocess.run(["bash", "scripts/up.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert up.returncode == 0, up.stderr
    out = run_deployment(env, "train-medsam2/demo", params)
    assert "finished successfully" in out, out[-3000:]
    registered, seen = _versions(home, tmp_path / "work")
    assert len(registered) == 1 and registered[0]["resumed"] >= 5, (registered, seen)  # resumed from a checkpoint
