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
from tests.flows.conftest import run_deployment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _versions(env) -> list[int]:
    code = ("from mlflow import MlflowClient\n"
            "print(sorted(int(v.version) for v in MlflowClient().search_model_versions(\"name='medsam2'\")))")
    out = subprocess.run([str(REPO / ".venv/bin/python"), "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    return eval(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []  # noqa: S307 - our own list


def test_killed_worker_leaves_registry_untouched_and_rerun_resumes(stack, tmp_path):
    env, home = stack
    data = copy_kvasir_subset(tmp_path / "kvasir-seg", n_train=4, n_val=2, n_test=2)
    params = {"source": str(data), "workdir": str(tmp_path / "work"),
              "overrides": ["train.max_steps=120", "train.checkpoint_every=5",
                            f"train.output_dir={tmp_path / 'runs'}"]}
    before = _versions(env)
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
    time.sleep(5)  # a few more steps
    worker_pid = int(Path(home, "run", "prefect-worker.pid").read_text())
    os.killpg(worker_pid, signal.SIGKILL)  # the worker and the flow-run process it started
    time.sleep(3)
    assert _versions(env) == before, "a crashed training must not register anything"

    up = subprocess.run(["bash", "scripts/up.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert up.returncode == 0, up.stderr
    out = run_deployment(env, "train-medsam2/demo", params)
    assert "finished successfully" in out, out[-3000:]
    log = Path(home, "logs", "prefect-worker.log").read_text()
    assert "resuming from" in log and str(tmp_path / "runs") in log
    assert len(_versions(env)) == len(before) + 1
