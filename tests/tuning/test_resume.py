"""A sweep whose driver is killed (SIGKILL of its whole process group, as a machine crash would) resumes with
``medsam2 sweep --resume``: the same MLflow parent run, every trial finished once, Optuna's search state kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tuning.conftest import child_runs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
MEDSAM2 = str(Path(sys.executable).with_name("medsam2"))


def test_killed_optuna_sweep_resumes_under_the_same_parent_run(sweep_env, tmp_path):
    storage = tmp_path / "ray"
    args = [MEDSAM2, "sweep", "--space", "smoke", "--num-samples", "3", "--search", "optuna", "--seed", "0",
            "--storage", str(storage), "--json"]
    for o in [*sweep_env["overrides"], "train.checkpoint_every=2"]:
        args += ["--set", o]
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and first.poll() is None and not list(storage.glob("*/*/checkpoint_*")):
        time.sleep(1)
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]  # killed before it could finish
    assert list(storage.glob("*/*/checkpoint_*")), "no trial checkpoint within 10 minutes"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(30)
    (sweep_dir,) = [p for p in storage.iterdir() if (p / "sweep.json").exists()]
    parent_id = json.loads((sweep_dir / "sweep.json").read_text())["parent_run_id"]

    again = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    out = json.loads(again.stdout.strip().splitlines()[-1])
    assert out["parent_run_id"] == parent_id
    assert (out["trials"], out["errored"]) == (3, 0), out
    assert out["completed"] + out["stopped_early"] == 3
    _, children = child_runs(sweep_env["uri"], parent_id)
    assert len(children) == 3 and {c.info.status for c in children} == {"FINISHED"}, [
        (c.info.run_name, c.info.status) for c in children]
