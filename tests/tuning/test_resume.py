"""A sweep whose driver is killed (SIGKILL of its whole process group, as a machine crash would) resumes with
``medsam2 sweep --resume``: the same MLflow parent run, every trial finished once, Optuna's search state kept."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import crash
from tests.tuning.conftest import child_runs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
MEDSAM2 = str(Path(sys.executable).with_name("medsam2"))
MAX_STEPS = 12
"""``train.max_steps`` of the sweep: the smoke space's 4 steps run from the first checkpoint (step 2) to the end in
about a second on two quiet cores, faster than the test can see the checkpoint and crash the sweep (it saw the
trial at step 4 in a fresh-clone CI run); 12 leaves ten steps for the crash to land between checkpoints."""


def _study_trials(sweep_dir: Path) -> dict[int, tuple[str, dict]]:
    """Optuna trial number → (its state, its sampled params), read through Optuna's API from the sweep's durable
    study (the study's memory of what it already tried)."""
    import optuna

    from tuning.sweep import optuna_storage

    assert (sweep_dir / "optuna.db").exists(), sorted(p.name for p in sweep_dir.iterdir())
    study = optuna.load_study(study_name=sweep_dir.name, storage=optuna_storage(sweep_dir))
    return {t.number: (t.state.name, dict(t.params)) for t in study.trials}


def _checkpointed_steps(storage: Path) -> dict[str, int]:
    """Trial id → the step of its ``train/last.pt`` (``train`` resumes from it), for every trial that wrote one."""
    from medsam2.engine.checkpoint import read_checkpoint

    return {last.parent.parent.name.removeprefix("trial_"): int(read_checkpoint(last)["step"])
            for last in storage.glob("*/trial_*/train/last.pt")}


def test_killed_optuna_sweep_resumes_under_the_same_parent_run(sweep_env, tmp_path):
    storage = tmp_path / "ray"
    args = [MEDSAM2, "sweep", "--space", "smoke", "--num-samples", "3", "--search", "optuna", "--seed", "0",
            "--storage", str(storage), "--json"]
    for o in [*sweep_env["overrides"], "train.checkpoint_every=2", f"train.max_steps={MAX_STEPS}"]:
        args += ["--set", o]
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and first.poll() is None and not list(storage.glob("*/*/checkpoint_*")):
        time.sleep(1)
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]  # killed before it could finish
    assert list(storage.glob("*/*/checkpoint_*")), "no trial checkpoint within 10 minutes"
    crash(first.pid)  # the driver and its raylet and Ray workers (own process groups) at once, all gone after
    first.wait(30)
    (sweep_dir,) = [p for p in storage.iterdir() if (p / "sweep.json").exists()]
    parent_id = json.loads((sweep_dir / "sweep.json").read_text())["parent_run_id"]
    at_kill = _checkpointed_steps(storage)
    mid_run = {t: s for t, s in at_kill.items() if 0 < s < MAX_STEPS}  # must resume from s, not restart at 0
    assert mid_run, f"no trial was killed between checkpoints: {at_kill}"
    study_before = _study_trials(sweep_dir)
    assert study_before, "the killed sweep's Optuna study holds no trial"
    assert "RUNNING" in {st for st, _ in study_before.values()}, study_before  # the kill cut trials off

    again = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    out = json.loads(again.stdout.strip().splitlines()[-1])
    assert out["parent_run_id"] == parent_id
    assert (out["trials"], out["errored"]) == (3, 0), out
    assert out["completed"] + out["stopped_early"] == 3
    client, runs = child_runs(sweep_env["uri"], parent_id)
    # a trial Tune started but had not yet saved in its experiment state when the kill came is asked again under a
    # new id after the resume: its child run is kept, tagged LOST and ended FAILED, and counted, not left RUNNING
    lost = [c for c in runs if c.data.tags.get("tune_status") == "LOST"]
    assert out["lost_attempts"] == len(lost) and all(c.info.status == "FAILED" for c in lost), [
        (c.info.run_name, c.info.status) for c in lost]
    children = [c for c in runs if c not in lost]
    statuses = sorted(c.info.status for c in children)  # ASHA's early stop ends a trial's run as KILLED
    assert statuses == sorted(["FINISHED"] * out["completed"] + ["KILLED"] * out["stopped_early"]), [
        (c.info.run_name, c.info.status, c.data.tags.get("tune_status")) for c in runs]

    # the trials killed between checkpoints continued from them: resumed_from (results table and MLflow child run)
    # is their last.pt step at the kill; a trial that restarted from scratch would report 0. (With only the
    # driver's process group killed, its Ray workers outlived it and wrote later checkpoints: crash() kills all.)
    import pandas as pd

    from medsam2.tracking.sweeps import TRIAL_TAG

    table = pd.read_csv(Path(out["results_csv"]), dtype={"trial_id": str}).set_index("trial_id")
    by_trial = {c.data.tags[TRIAL_TAG]: c for c in children}
    checkpoint_steps = set(range(2, MAX_STEPS + 1, 2))  # train.checkpoint_every=2
    kept = {t: s for t, s in mid_run.items() if t in table.index}  # not a LOST attempt's (see above)
    assert kept, (mid_run, table[["status", "step", "resumed_from"]])
    for trial_id, step in kept.items():
        row = table.loc[trial_id]
        resumed = int(row["resumed_from"])
        assert resumed == step > 0 and resumed in checkpoint_steps, (
            trial_id, step, table[["status", "step", "resumed_from"]])
        hist = client.get_metric_history(by_trial[trial_id].info.run_id, "resumed_from")
        assert [m.value for m in hist] == [resumed], (trial_id, hist)
    never_checkpointed = set(table.index) - set(at_kill)
    assert (table.loc[sorted(never_checkpointed), "resumed_from"] == 0).all(), table

    # Optuna's study was kept, not rebuilt: every trial it held at the kill is still there with the same params;
    # one finished trial per Tune trial, with the params that Tune trial ran; any other trial is an attempt cut off
    # by the kill (asked again after the resume), marked FAIL at the end, none left RUNNING
    study_after = _study_trials(sweep_dir)
    assert {n: study_after[n][1] for n in study_before} == {n: p for n, (_, p) in study_before.items()}, (
        study_before, study_after)
    finished = {n: p for n, (st, p) in study_after.items() if st in ("COMPLETE", "PRUNED")}
    cut_off = {n: p for n, (st, p) in study_after.items() if n not in finished}
    assert len(finished) == 3 and all(study_after[n][0] == "FAIL" for n in cut_off), study_after
    keys = sorted({k for p in finished.values() for k in p})

    def norm(v):  # a float read back from results.csv may differ in its last digits
        return round(float(v), 9) if isinstance(v, float) else str(v)

    ran = sorted(tuple(norm(table.loc[t, k]) for k in keys) for t in table.index)
    asked = sorted(tuple(norm(p[k]) for k in keys) for p in finished.values())
    assert keys and ran == asked, (keys, ran, asked)
    assert {tuple(norm(p[k]) for k in keys) for p in cut_off.values()} <= set(ran), (cut_off, ran)
