"""MLflow runs of a Ray Tune sweep: the sweep's parent run (opened, or reopened on ``--resume``; its params,
artifacts and summary metrics) and one child run per trial (:class:`TrialRun`, nested under it by
``mlflow.parentRunId``; a retried or restored trial reopens its own run, found by :data:`TRIAL_TAG`).

``tuning/`` drives the sweep and calls only these functions: it imports no mlflow.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient

from medsam2.config import ExperimentCfg
from medsam2.engine.callbacks import Callback, TrainStart
from medsam2.tracking.runs import MlflowCallback, log_config, setup

TRIAL_TAG = "medsam2.trial_id"
"""Tag of a trial's child run: its Tune trial id, how a retried attempt finds the run to reopen."""


@dataclass(frozen=True)
class SweepRun:
    """The sweep's parent run: where its trials nest."""

    experiment_id: str
    run_id: str
    tracking_uri: str | None


def open_sweep_run(cfg: ExperimentCfg, name: str, space: str, *, resume_run_id: str | None = None,
                   parent_run_id: str | None = None) -> SweepRun:
    """Create the store and experiment once (before any trial touches them) and make the sweep's parent run the
    active one: ``resume_run_id`` reopened, else a new run nested under ``parent_run_id`` (a pipeline's run) or
    under a caller's active run."""
    exp_id = setup(cfg)
    if resume_run_id:
        run = mlflow.start_run(run_id=resume_run_id)
    else:
        run = mlflow.start_run(experiment_id=exp_id, run_name=name, nested=True, parent_run_id=parent_run_id,
                               tags={"medsam2.kind": "sweep", "medsam2.space": space})
    return SweepRun(exp_id, run.info.run_id, cfg.tracking.tracking_uri)


def log_sweep_start(cfg: ExperimentCfg, params: dict[str, Any]) -> None:
    """The base config and the sweep's own settings (``sweep.*``) onto the active parent run (once: params are
    immutable, so a resumed sweep logs nothing)."""
    log_config(cfg)
    mlflow.log_params({f"sweep.{k}": v for k, v in params.items()})


def log_sweep_files(*paths: Path | None) -> None:
    """Files (results table, plot, best config, summary) under ``sweep/`` of the active parent run."""
    for p in paths:
        if p is not None:
            mlflow.log_artifact(str(p), "sweep")


def log_sweep_result(metrics: dict[str, float], best_trial: str | None = None) -> None:
    """Counts, wall time and ``best_val_dice`` onto the active parent run; ``best_trial`` as a tag."""
    mlflow.log_metrics(metrics)
    if best_trial is not None:
        mlflow.set_tag("best_trial", best_trial)


def end_sweep_run(status: str) -> None:
    mlflow.end_run(status)


def close_trial_runs(sweep: SweepRun, outcomes: dict[str, str]) -> int:
    """Tag every trial run with its Tune outcome (``{trial_id: COMPLETED | STOPPED_EARLY | ENDED_BY_TRAINER |
    ERROR}``) and give it the status that outcome means (FINISHED, KILLED, FINISHED, FAILED).

    Tune's outcome is the trial's truth, so it also corrects what a trial's own process wrote. Tune ends a
    trial's process as soon as its last result is in (ASHA stops at a rung, and at ``max_t`` on the final
    report), so the process may never close its run (left RUNNING), or may close it wrongly in that teardown: a
    distributed trial's driver can ask whether rank 0 logged the loop's end before rank 0 got there (KILLED), or
    see ``TorchTrainer.fit`` raise as Tune stops it (FAILED, with ``exit_error`` tagged). CI on 2026-12-07 had a
    COMPLETED distributed trial whose run was FAILED; which of the two it was is not known (not reproduced).

    A child run whose trial is not in ``outcomes`` is an attempt lost in a crash: Tune had started the trial but
    had not yet saved it in its experiment state, so the resumed sweep asked its searcher again under a new trial
    id. Such a run is tagged ``tune_status=LOST`` and, if still RUNNING, ended FAILED (kept, not deleted: it
    holds what the attempt logged). Returns how many there were."""
    client = MlflowClient(sweep.tracking_uri, registry_uri=sweep.tracking_uri)
    query = f"tags.mlflow.parentRunId = '{sweep.run_id}'"
    lost = 0
    for run in client.search_runs([sweep.experiment_id], query, max_results=10_000):
        outcome = outcomes.get(run.data.tags.get(TRIAL_TAG), LOST)
        lost += outcome == LOST
        client.set_tag(run.info.run_id, "tune_status", outcome)
        status = _RUN_STATUS.get(outcome, "KILLED")
        if run.info.status != status and (outcome != LOST or run.info.status == "RUNNING"):
            client.set_terminated(run.info.run_id, status)
    return lost


LOST = "LOST"
"""``tune_status`` of a child run whose trial the resumed sweep no longer knows (see :func:`close_trial_runs`)."""

_RUN_STATUS = {"COMPLETED": "FINISHED", "ENDED_BY_TRAINER": "FINISHED", "STOPPED_EARLY": "KILLED", "ERROR": "FAILED",
               LOST: "FAILED"}
"""The MLflow run status each Tune outcome means (NO_RESULT: KILLED)."""


class TrialRun(Callback):
    """One child run per trial under the sweep's parent run; delegates the run content to ``MlflowCallback``
    (resolved config, params, losses, val Dice per evaluation, learning curve)."""

    def __init__(self, sweep: SweepRun, sweep_name: str, trial_id: str, trial_name: str,
                 params: dict[str, Any]) -> None:
        self.sweep, self.sweep_name = sweep, sweep_name
        self.trial_id, self.trial_name, self.params = trial_id, trial_name, params
        self.inner = MlflowCallback()
        self.run_id: str | None = None
        self.reopened = False
        self.resume_logged = False

    def _client(self) -> MlflowClient:
        return MlflowClient(self.sweep.tracking_uri, registry_uri=self.sweep.tracking_uri)

    def start(self) -> str:
        """Open the trial's run (its own again when a retried or restored attempt finds it) and make it active."""
        mlflow.set_tracking_uri(self.sweep.tracking_uri)
        query = f"tags.mlflow.parentRunId = '{self.sweep.run_id}' and tags.`{TRIAL_TAG}` = '{self.trial_id}'"
        found = self._client().search_runs([self.sweep.experiment_id], query, max_results=1)
        if found:
            run = mlflow.start_run(run_id=found[0].info.run_id)
            mlflow.set_tag("retried", "true")
            self.reopened = True
        else:
            run = mlflow.start_run(
                experiment_id=self.sweep.experiment_id, run_name=self.trial_name, nested=True,
                parent_run_id=self.sweep.run_id,
                tags={"mlflow.parentRunId": self.sweep.run_id, TRIAL_TAG: self.trial_id,
                      "medsam2.sweep": self.sweep_name, "medsam2.kind": "trial",
                      "tune_params": json.dumps(self.params, default=str)[:5000]})
        self.run_id = run.info.run_id
        return self.run_id

    def attach(self, run_id: str, reopened: bool) -> None:
        """Log into the run a distributed trial's driver opened (``start``), from its rank-0 worker."""
        mlflow.set_tracking_uri(self.sweep.tracking_uri)
        mlflow.start_run(run_id=run_id)
        self.run_id, self.reopened = run_id, reopened

    def note_resumed(self, step: int) -> None:
        """Log the step this attempt resumed from (once; 0 logs nothing)."""
        if step and not self.resume_logged:
            mlflow.log_metric("resumed_from", step)
            self.resume_logged = True

    def tag(self, key: str, value: str) -> None:
        mlflow.set_tag(key, value)

    def trained_to_the_end(self) -> bool:
        """The run holds ``train_wall_s``: its training loop ended (read from the store, for a driver whose
        workers logged the run)."""
        return "train_wall_s" in self._client().get_run(self.run_id).data.metrics

    def on_train_start(self, info: TrainStart) -> None:
        self.note_resumed(info.resumed_from)
        if not self.reopened:  # a reopened run has its params from the first attempt (params are immutable)
            self.inner.on_train_start(info)

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        self.inner.on_step(step, logs)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.inner.on_eval(step, metrics)

    def on_train_end(self, result: Any) -> None:
        self.inner.on_train_end(result)
        mlflow.set_tag("checkpoint", result.checkpoint)

    @contextlib.contextmanager
    def ending(self, finished: Callable[[], bool]) -> Iterator[None]:
        """End the run as the trial ends. Tune ends a trial ASHA stopped with ``SystemExit`` inside its report:
        the run is COMPLETED/FINISHED when ``finished()`` (the STOP answered the report at ``max_t``), else
        STOPPED_EARLY/KILLED; any other exception ends it FAILED. All are re-raised."""
        try:
            yield
        except SystemExit:
            done = finished()
            mlflow.set_tag("tune_status", "COMPLETED" if done else "STOPPED_EARLY")
            self.finish("FINISHED" if done else "KILLED")
            raise
        except BaseException as e:  # FAILED unless Tune says otherwise (see close_trial_runs)
            if self.run_id is not None:
                with contextlib.suppress(Exception):
                    self._client().set_tag(self.run_id, "exit_error", f"{type(e).__name__}: {e}"[:250])
            self.finish("FAILED")
            raise

    def finish(self, status: str) -> None:
        if self.run_id is not None and mlflow.active_run() is not None:
            mlflow.end_run(status)
