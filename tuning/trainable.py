"""The Tune trial: base config + sampled params → ``medsam2.engine.train.train`` with two callbacks.

* :class:`TuneReport` is the only place in the project that calls ``ray.tune.report``: one report per
  evaluation (``val_dice``, ``step``, ...), carrying a Tune checkpoint (the trial's ``last.pt`` plus its
  resolved config) whenever the loop writes one at the same step.
* :func:`trial_run` (``medsam2.tracking.sweeps.TrialRun``) logs the trial as one MLflow run nested under the
  sweep's parent run (tag ``mlflow.parentRunId``); a retried trial reopens the same child run instead of making
  a second one.

Resume: each trial trains into its own ``train.output_dir`` (``<trial dir>/train`` for local storage). A trial
restarted after a failure finds its ``last.pt`` there, or — on another node — gets it back from the last Tune
checkpoint, and ``train`` resumes from it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from medsam2.config import ExperimentCfg
from medsam2.engine.callbacks import Callback, TrainStart
from medsam2.engine.train import train
from medsam2.tracking.sweeps import SweepRun, TrialRun
from tuning.ray_session import restore_last, stage_last
from tuning.spaces import apply_params

FAULT_ENV = "MEDSAM2_TUNE_FAIL_ONCE"
"""Test hook: path of a marker file. The first trial to write a Tune checkpoint while the marker is absent
creates it and raises, so Tune's FailureConfig retry path runs (a crash mid-trial cannot be provoked
otherwise on a healthy machine)."""
ENDED_BY_TRAINER = "ended_by_trainer"
"""Report key: the trial's own loop stopped it before ``max_steps`` (``train.max_minutes`` or
``train.early_stop_patience``), which the sweep table calls ``ENDED_BY_TRAINER``, not an ASHA stop."""
CONFIG_FILE = "resolved_config.yaml"


@dataclass(frozen=True)
class SweepContext:
    """What every trial needs from the driver; plain data so it ships to any Ray node."""

    base_cfg: dict[str, Any]
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_name: str
    storage_path: str
    """Tune's storage: a local/shared path (trial dirs are real dirs) or a URI such as ``s3://…``."""

    @property
    def local_storage(self) -> bool:
        return "://" not in self.storage_path or self.storage_path.startswith("file://")


def trial_dirname(trial_id: str) -> str:
    """Tune trial dir name (``trial_dirname_creator``); short, because Tune's default embeds every param."""
    return f"trial_{trial_id}"


def trial_output_dir(ctx: SweepContext, trial_id: str) -> Path:
    """Where a trial's ``train`` writes ``last.pt``/``final.pt``: ``<storage>/<sweep>/trial_<id>/train``.

    Not Tune's per-session working dir (which Tune copies to storage as artifacts and which changes when a
    sweep is resumed): the path is part of the config hash ``train`` checks before resuming from ``last.pt``,
    so it must be the same for every attempt of the trial. Remote storage: a node-local dir instead, and a
    trial restarted elsewhere gets ``last.pt`` back from its Tune checkpoint."""
    if ctx.local_storage:
        return Path(ctx.storage_path.removeprefix("file://")) / ctx.sweep_name / trial_dirname(trial_id) / "train"
    root = Path(os.environ.get("MEDSAM2_TUNE_LOCAL_DIR", Path(tempfile.gettempdir()) / "medsam2-tune"))
    return root / ctx.sweep_name / trial_dirname(trial_id) / "train"


def trial_config(
    base_cfg: dict[str, Any] | ExperimentCfg, params: dict[str, Any], output_dir: str | Path
) -> ExperimentCfg:
    """The full resolved config of one trial."""
    base = base_cfg if isinstance(base_cfg, ExperimentCfg) else ExperimentCfg.model_validate(base_cfg)
    return apply_params(base, {**params, "train.output_dir": str(output_dir)})


def trial_metrics(val_dice: float, best: float, step: int, max_steps: int, resumed_from: int) -> dict[str, Any]:
    """One Tune report. ``step`` is ASHA's time attribute; ``max_steps`` tells the driver a trial finished."""
    return {
        "val_dice": float(val_dice),
        "best_val_dice": float(best),
        "step": int(step),
        "max_steps": int(max_steps),
        "resumed_from": int(resumed_from),
    }


class TuneReport(Callback):
    """Reports every evaluation to Tune. When the loop also writes ``last.pt`` at that step (it does so right
    after evaluating), the report waits for it and carries it as the trial's checkpoint.

    The last evaluation (``step == max_steps``) is reported from ``on_train_end``, after ``final.pt`` and
    the MLflow run are complete: ASHA answers a trial's report at ``max_t`` with STOP, and Tune carries
    that out by raising ``SystemExit`` inside ``tune.report``, which would cut the trial's ending short.

    In a distributed trial every Ray Train worker has one (``report=ray.train.report``, its ``rank``): Ray Train
    wants the same reports from every rank, only rank 0's carries ``last.pt``, and Ray's ``TuneReportCallback``
    hands rank 0's to Tune."""

    def __init__(self, cfg: ExperimentCfg, report: Any = None, checkpoint_cls: Any = None, rank: int = 0) -> None:
        self.cfg = cfg
        self.report_fn = report or tune.report
        self.checkpoint_cls = checkpoint_cls or tune.Checkpoint
        self.rank = rank
        self.reported = 0
        self.last_step = 0
        self.resumed_from = 0
        self._pending: dict[str, float] | None = None
        self._final: tuple[dict[str, Any], Path | None] | None = None

    def on_train_start(self, info: TrainStart) -> None:
        self.resumed_from = info.resumed_from

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        tc = self.cfg.train
        val = metrics["val_dice"]
        report = trial_metrics(val, metrics.get("best_val_dice", val), step, tc.max_steps, self.resumed_from)
        if step % tc.checkpoint_every == 0 or step == tc.max_steps:
            self._pending = report  # on_checkpoint follows in the same step
        else:
            self._report(report, None)

    def on_checkpoint(self, step: int, path: str) -> None:
        if self._pending is None or self._pending["step"] != step:
            return
        report, self._pending = self._pending, None
        if step >= self.cfg.train.max_steps:
            self._final = (report, Path(path))
        else:
            self._report(report, Path(path))

    def on_train_end(self, result: Any) -> None:
        if self._pending is not None:
            report, self._pending = self._pending, None
            self._report(report, None)
        if self._final is not None:
            (report, path), self._final = self._final, None
            self._report(report, path if path.exists() else None)

    def _report(self, metrics: dict[str, Any], last_pt: Path | None) -> None:
        self.reported += 1
        self.last_step = int(metrics["step"])
        if last_pt is None or self.rank != 0:
            self.report_fn(metrics)
            return
        resolved = yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False)
        with stage_last(last_pt, {CONFIG_FILE: resolved}) as stage:
            self.report_fn(metrics, checkpoint=self.checkpoint_cls.from_directory(stage))


class FailOnce(Callback):
    """Raises once, after the first checkpointed report, if ``$MEDSAM2_TUNE_FAIL_ONCE`` names a missing
    file (it creates the file first, so exactly one attempt of one trial fails)."""

    def __init__(self, marker: str) -> None:
        self.marker = Path(marker)

    def on_checkpoint(self, step: int, path: str) -> None:
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        raise RuntimeError(f"injected fault at step {step} ({FAULT_ENV}={self.marker})")


def trial_run(ctx: SweepContext, trial_id: str, trial_name: str, params: dict[str, Any]) -> TrialRun:
    """The trial's MLflow child run under the sweep's parent run (``medsam2.tracking.sweeps``)."""
    return TrialRun(SweepRun(ctx.experiment_id, ctx.parent_run_id, ctx.tracking_uri), ctx.sweep_name, trial_id,
                    trial_name, params)


def run_trial(params: dict[str, Any], ctx: SweepContext) -> None:
    """Tune function trainable (bind ``ctx`` with ``tune.with_parameters``)."""
    tctx = tune.get_context()
    trial_id, trial_name = tctx.get_trial_id(), tctx.get_trial_name()
    out = trial_output_dir(ctx, trial_id)
    cfg = trial_config(ctx.base_cfg, params, out)
    if cfg.train.num_workers > 1:
        _run_distributed_trial(params, ctx, cfg, trial_id, trial_name)
        return
    restore_last(out, tune.get_checkpoint())
    reporter = TuneReport(cfg)
    child = trial_run(ctx, trial_id, trial_name, params)
    callbacks: list[Callback] = [child, reporter]  # child first: its on_train_end precedes the final report
    if os.environ.get(FAULT_ENV):
        callbacks.append(FailOnce(os.environ[FAULT_ENV]))
    child.start()
    with child.ending(lambda: reporter.last_step >= cfg.train.max_steps):  # STOP at max_t: the final report
        result = train(cfg, callbacks=callbacks)
    child.note_resumed(result.resumed_from)  # a restored trial that had already finished starts no training
    if result.stopped_early:  # the trainer ended it (time budget, patience), not ASHA: say so in a last report
        m, nan = result.metrics, float("nan")
        tune.report({**trial_metrics(m.get("last_val_dice", nan), m.get("best_val_dice", nan), result.steps,
                                     cfg.train.max_steps, result.resumed_from), ENDED_BY_TRAINER: 1})
        child.tag("tune_status", "ENDED_BY_TRAINER")
    if not reporter.reported:  # e.g. restored after it had already finished: report the final numbers once
        m, nan = result.metrics, float("nan")
        tune.report(
            trial_metrics(
                m.get("last_val_dice", nan),
                m.get("best_val_dice", nan),
                result.steps,
                cfg.train.max_steps,
                result.resumed_from,
            )
        )
    child.finish("FINISHED")


def _run_distributed_trial(params: dict[str, Any], ctx: SweepContext, cfg: ExperimentCfg, trial_id: str,
                           trial_name: str) -> None:
    """A trial on ``train.num_workers`` Ray Train workers: this function (the trial's driver) opens the trial's
    MLflow child run and runs a ``TorchTrainer``; Ray's ``TuneReportCallback`` hands rank 0's evaluations and
    checkpoints to Tune, so ASHA and retries work as for a one-process trial."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from tuning.distributed import make_trainer

    child = trial_run(ctx, trial_id, trial_name, params)
    child.start()
    trainer = make_trainer(cfg, _trial_worker, {"ctx": asdict(ctx), "trial": [trial_id, trial_name], "params": params,
                                                "run_id": child.run_id, "reopened": child.reopened},
                           name=f"{ctx.sweep_name}-{trial_dirname(trial_id)}", storage_path=ctx.storage_path,
                           max_failures=0, callbacks=[TuneReportCallback()])  # Tune's FailureConfig retries
    with child.ending(child.trained_to_the_end):
        trainer.fit()  # ASHA's STOP is raised here, in the driver, when a report is handed to Tune
    child.finish("FINISHED")


def _trial_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker of a distributed trial; rank 0 logs into the trial's MLflow run."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    cfg = ExperimentCfg.model_validate(loop_config["cfg"])
    restore_last(Path(cfg.train.output_dir), ray.train.get_checkpoint())
    callbacks: list[Callback] = [TuneReport(cfg, report=ray.train.report, checkpoint_cls=ray.train.Checkpoint,
                                            rank=rank)]
    if rank == 0:
        child = trial_run(SweepContext(**loop_config["ctx"]), *loop_config["trial"], loop_config["params"])
        child.attach(loop_config["run_id"], loop_config["reopened"])
        callbacks.insert(0, child)  # its on_train_end precedes the final report
    result = train(cfg, callbacks=callbacks)
    if rank == 0:
        child.note_resumed(result.resumed_from)
    if result.stopped_early:  # as in run_trial; every rank reports (Ray Train), rank 0's numbers reach Tune
        m, nan = result.metrics, float("nan")
        ray.train.report({**trial_metrics(m.get("last_val_dice", nan), m.get("best_val_dice", nan), result.steps,
                                          cfg.train.max_steps, result.resumed_from), ENDED_BY_TRAINER: 1})
