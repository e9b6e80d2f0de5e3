"""A worker killed (SIGKILL of its whole process group) in the middle of training leaves the model registry
untouched; a rerun of the same deployment resumes from the last checkpoint and completes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, copy_kvasir_subset
from tests.flows.conftest import python_json, run_deployment, wait_idle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _versions(env, workdir: Path) -> tuple[list[dict], list[dict]]:
    """Registered versions trained on ``workdir`` (other tests share the registry: their versions are never
    looked at), with the step their training resumed from; and our training runs, for assertion messages."""
    code = ("import json\nfrom mlflow import MlflowClient\nc = MlflowClient()\n"
            "exps = [e.experiment_id for e in c.search_experiments()]\n"
            f"runs = c.search_runs(exps, \"params.`data.workdir` = '{workdir}'\")\n"
            "out = []\n"
            "for r in runs:\n"
            "    for v in c.search_model_versions(f\"name='medsam2' and run_id='{r.info.run_id}'\"):\n"
            "        out.append({'version': int(v.version), 'resumed': int(r.data.tags.get('resumed_from_step', 0))})\n"
            "seen = [{'run': r.info.run_name, 'id': r.info.run_id, 'status': r.info.status} for r in runs]\n"
            "print(json.dumps([out, seen]))")
    ours, seen = python_json(env, code)
    return ours, seen


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        c, p = map(int, line.split())
        children.setdefault(p, []).append(c)
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


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
    victims = _descendants(worker_pid)  # the flow-run process runs in its own session: kill it explicitly
    assert victims, "no flow-run process under the worker"
    for pid in [worker_pid, *victims]:  # what a machine crash does to both
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(3)
    ours, seen = _versions(env, tmp_path / "work")
    assert ours == [], f"a crashed training must not register anything: {seen}"

    up = subprocess.run(["bash", "scripts/up.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert up.returncode == 0, up.stderr
    out = run_deployment(env, "train-medsam2/demo", params)
    assert "finished successfully" in out, out[-3000:]
    registered, seen = _versions(env, tmp_path / "work")
    assert len(registered) == 1 and registered[0]["resumed"] >= 5, (registered, seen)  # resumed from a checkpoint
