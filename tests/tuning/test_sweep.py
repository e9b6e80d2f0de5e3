"""End-to-end Ray Tune sweeps on CPU: ASHA early stopping, MLflow parent/child runs, best config, retries."""

from __future__ import annotations

import json

import pandas as pd
from mlflow import MlflowClient

from medsam2.config import load_config
from tuning.sweep import cli_sweep, run_sweep
from tuning.trainable import FAULT_ENV

# Random search seed for the smoke sweep: sampled configs and their (CPU, seeded) val Dice are deterministic,
# and with this seed a later trial lands strictly below the first two at the first rung, so ASHA must stop
# at least one trial whatever order the two concurrent trials arrive in.
SMOKE_SEED = 0


def test_smoke_sweep_asha_stops_trials_early(sweep_env, tmp_path, check_sweep_tracking):
    cfg = load_config(None, sweep_env["overrides"])
    res = run_sweep(
        "smoke", 4, base_cfg=cfg, num_cpus=2, storage_path=str(tmp_path / "ray"), seed=SMOKE_SEED, quiet=True
    )
    table = pd.read_csv(res.results_csv)
    print(json.dumps(res.to_dict(), indent=1))
    print(table[["trial_id", "status", "val_dice_by_step", "model.adapter", "model.decoder", "train.lr"]])
    assert (res.trials, res.errored) == (4, 0)
    assert res.stopped_early >= 1 and res.completed >= 1
    assert res.stopped_early + res.completed == 4
    check_sweep_tracking(res, sweep_env["uri"], 4)
    stopped = table[table["status"] == "STOPPED_EARLY"]
    assert (stopped["step"] < 4).all()
    json.dumps(res.to_dict())  # JSON-serialisable, for `medsam2 sweep --json`


def test_failed_trial_is_retried_and_resumes(sweep_env, tmp_path, monkeypatch):
    """A trial crashing mid-run is retried (FailureConfig) and resumes from its checkpoint. The crash is
    injected through a test hook (env var + marker file) because a healthy machine cannot produce one."""
    marker = tmp_path / "fault.marker"
    monkeypatch.setenv(FAULT_ENV, str(marker))
    out = cli_sweep(
        "smoke",
        1,
        overrides=[*sweep_env["overrides"], "train.checkpoint_every=2"],
        json=True,
        num_cpus=1,
        storage_path=str(tmp_path / "ray"),
        max_failures=1,
        seed=1,
    )
    json.dumps(out)
    assert marker.exists(), "the injected fault fired"
    assert (out["trials"], out["errored"], out["completed"]) == (1, 0, 1)
    for key in ("parent_run_id", "best_config", "best_val_dice", "trials", "stopped_early", "wall_s"):
        assert key in out
    row = pd.read_csv(out["results_csv"]).iloc[0]
    assert row["resumed_from"] == 2 and row["step"] == 4  # failed after step 2's checkpoint, resumed there
    client = MlflowClient(sweep_env["uri"], registry_uri=sweep_env["uri"])
    exp = client.get_run(out["parent_run_id"]).info.experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{out['parent_run_id']}'")
    assert len(children) == 1, "the retry reopens the trial's child run"
    assert children[0].info.status == "FINISHED" and children[0].data.tags.get("retried") == "true"


def test_a_trial_its_trainer_ended_is_not_an_asha_stop(sweep_env, tmp_path):
    """``train.early_stop_patience=1`` with an evaluation every step: the trial's own loop stops it once val Dice
    fails to improve, before ``max_steps``; the table and the child run say ENDED_BY_TRAINER, not STOPPED_EARLY."""
    out = cli_sweep("smoke", 1, overrides=[*sweep_env["overrides"], "train.eval_every=1",
                                           "train.early_stop_patience=1", "train.max_steps=12"],
                    json=True, num_cpus=1, storage_path=str(tmp_path / "ray"), seed=1)
    row = pd.read_csv(out["results_csv"]).iloc[0]
    assert row["step"] < 12, "patience did not stop the trial: the test would prove nothing"
    assert row["status"] == "ENDED_BY_TRAINER" and (out["ended_by_trainer"], out["stopped_early"]) == (1, 0)
    client = MlflowClient(sweep_env["uri"], registry_uri=sweep_env["uri"])
    exp = client.get_run(out["parent_run_id"]).info.experiment_id
    (child,) = client.search_runs([exp], f"tags.mlflow.parentRunId = '{out['parent_run_id']}'")
    assert child.data.tags["tune_status"] == "ENDED_BY_TRAINER" and child.info.status == "FINISHED"


def test_distributed_trials_train_on_ray_train_workers(sweep_env, tmp_path):
    """``train.num_workers=2`` in a sweep: the trial trains on 2 Ray Train workers (its driver holds 0.01 CPU, so
    3 logical CPUs), rank 0 reports its evaluations to Tune (``TuneReportCallback``) and logs the child run."""
    out = cli_sweep("smoke", 1, overrides=[*sweep_env["overrides"], "train.num_workers=2", "train.batch_size=2",
                                           "train.checkpoint_every=2"],
                    json=True, num_cpus=3, storage_path=str(tmp_path / "ray"), seed=SMOKE_SEED)
    assert (out["trials"], out["errored"], out["completed"]) == (1, 0, 1), out
    row = pd.read_csv(out["results_csv"]).iloc[0]
    assert row["reports"] == 2 and row["step"] == 4 and json.loads(row["val_dice_by_step"]).keys() == {"2", "4"}
    client = MlflowClient(sweep_env["uri"], registry_uri=sweep_env["uri"])
    exp = client.get_run(out["parent_run_id"]).info.experiment_id
    (child,) = client.search_runs([exp], f"tags.mlflow.parentRunId = '{out['parent_run_id']}'")
    assert child.data.tags["num_workers"] == "2" and child.data.tags["tune_status"] == "COMPLETED"
    assert child.info.status == "FINISHED", child.data.tags.get("exit_error")
    assert [m.step for m in client.get_metric_history(child.info.run_id, "val_dice")] == [2, 4]
