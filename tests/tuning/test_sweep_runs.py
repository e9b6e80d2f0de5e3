"""How a sweep's trial runs are closed (``medsam2.tracking.sweeps.close_trial_runs``), on a real SQLite MLflow
store: every child run gets its Tune outcome and the status it means (also over what a process torn down by
Tune wrote), and a run whose trial the resumed sweep no longer knows (started
before a crash, never saved in Tune's experiment state, asked again under a new id) is LOST, not a trial."""

from __future__ import annotations

from mlflow import MlflowClient

from medsam2.tracking.sweeps import LOST, TRIAL_TAG, SweepRun, close_trial_runs


def _child(client: MlflowClient, exp: str, parent: str, trial_id: str, status: str | None) -> str:
    run = client.create_run(exp, run_name=f"run_trial_{trial_id}",
                            tags={"mlflow.parentRunId": parent, TRIAL_TAG: trial_id})
    if status:
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_each_trial_run_gets_its_outcome_and_an_unknown_one_is_lost(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("sweep", artifact_location=str(tmp_path / "art"))
    parent = client.create_run(exp, run_name="sweep").info.run_id
    other = client.create_run(exp, run_name="another sweep").info.run_id
    runs = {
        "done": _child(client, exp, parent, "a", "FINISHED"),
        "asha": _child(client, exp, parent, "b", None),  # Tune ended its process before it closed its run
        "error": _child(client, exp, parent, "c", None),
        "lost": _child(client, exp, parent, "d", None),  # its trial is not in the resumed sweep's table
        "lost_done": _child(client, exp, parent, "f", "FINISHED"),  # lost, but it had closed its run: kept
        # teardown races of a distributed trial's driver once Tune has its final result (see close_trial_runs)
        "fit_torn_down": _child(client, exp, parent, "g", "FAILED"),
        "rank0_not_yet_ended": _child(client, exp, parent, "h", "KILLED"),
        "patience": _child(client, exp, parent, "i", None),
        "elsewhere": _child(client, exp, other, "e", None),  # another sweep's: untouched
    }
    outcomes = {"a": "COMPLETED", "b": "STOPPED_EARLY", "c": "ERROR", "g": "COMPLETED", "h": "COMPLETED",
                "i": "ENDED_BY_TRAINER"}

    assert close_trial_runs(SweepRun(exp, parent, uri), outcomes) == 2

    got = {k: client.get_run(r) for k, r in runs.items()}
    assert {k: (r.info.status, r.data.tags.get("tune_status")) for k, r in got.items()} == {
        "done": ("FINISHED", "COMPLETED"), "asha": ("KILLED", "STOPPED_EARLY"), "error": ("FAILED", "ERROR"),
        "lost": ("FAILED", LOST), "lost_done": ("FINISHED", LOST), "fit_torn_down": ("FINISHED", "COMPLETED"),
        "rank0_not_yet_ended": ("FINISHED", "COMPLETED"), "patience": ("FINISHED", "ENDED_BY_TRAINER"),
        "elsewhere": ("RUNNING", None)}
