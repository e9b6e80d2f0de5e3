"""Train one model on N workers: Ray Train's ``TorchTrainer`` runs ``medsam2.engine.train.train`` in each.

``run_train_distributed(cfg)`` is what ``medsam2 train --set train.num_workers=N`` and the ``train-medsam2``
flow's training stage call when ``train.num_workers > 1``; it returns the same result dict as
``medsam2.steps.run_train`` (``run_id``, ``model_uri``, ``checkpoint``, ..., ``num_workers``).

Driver: the config made portable, its run dir fixed (``engine.train.output_dir_of``, so every worker and every
attempt agree), the request checked against the cluster (workers × CPUs/GPUs per worker) before anything
starts, one MLflow run opened, then ``TorchTrainer.fit``. The process group is gloo on CPU and NCCL on GPU (Ray's
``TorchConfig`` default); ``medsam2.engine.distributed`` does the rest inside the loop.

Workers: rank 0 trains through ``steps.run_train`` into the driver's MLflow run (it alone logs and writes
``last.pt``/``final.pt``, and logs the model); the other ranks run ``train`` with no logging. Every checkpoint
step every rank calls ``ray.train.report`` (a barrier in Ray Train), rank 0 with ``last.pt`` as the checkpoint.

Faults: ``FailureConfig(max_failures)``. When a worker dies (a node lost, a SIGKILL), Ray Train restarts the whole
group; each worker finds ``last.pt`` in the run dir, or gets it back from the last reported checkpoint
(``ray_session.restore_last``), and the loop resumes at that step. Rank 0 reopens the same MLflow run, so a run
with a restart is still one run and, through the flow, one model version.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from medsam2 import steps, tracking
from medsam2.config import ExperimentCfg, config_hash, with_overrides
from medsam2.engine.callbacks import Callback
from medsam2.engine.train import output_dir_of, train
from medsam2.errors import UsageError
from tuning.ray_session import init_ray, portable_config, restore_last, stage_last, storage_root

log = logging.getLogger(__name__)
RESULT_FILE = "train_result.json"
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
WORKER_START_TIMEOUT_S = 600
"""How long Ray Train waits for a worker group to start, unless ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` says
otherwise (Ray's default: 60 s). Each worker imports torch, SAM2 and peft before it answers; on two busy cores
that took several minutes, and a start timeout fails the attempt."""


class TrainReport(Callback):
    """``ray.train.report`` at every checkpoint step, on every rank (Ray Train requires the same number of
    reports from each); rank 0's report carries ``last.pt`` as the run's checkpoint."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_checkpoint(self, step: int, path: str) -> None:
        last = Path(path)
        if self.rank != 0 or not last.exists():
            ray.train.report({"step": step})
            return
        with stage_last(last) as stage:
            ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(stage))


def _worker(loop_config: dict[str, Any]) -> None:
    """One data-parallel worker (``train_loop_per_worker``)."""
    rank = ray.train.get_context().get_world_rank()
    cfg = ExperimentCfg.model_validate(loop_config["cfg"])
    out = Path(cfg.train.output_dir)
    if restore_last(out, ray.train.get_checkpoint()):
        log.info("rank %d: last.pt restored from the run's last Ray checkpoint", rank)
    reporter = TrainReport(rank)
    if rank == 0:  # the result travels as the run's last checkpoint: Ray keeps the metrics of checkpoints only
        res = steps.run_train(cfg, run_id=loop_config["run_id"], callbacks=[reporter])
        with tempfile.TemporaryDirectory(prefix="medsam2-result-") as d:
            (Path(d) / RESULT_FILE).write_text(json.dumps(res, default=str))
            ray.train.report({"step": res["steps"]}, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        result = train(cfg, callbacks=[reporter])
        ray.train.report({"step": result.steps})


def check_resources(cfg: ExperimentCfg) -> None:
    """The request against what the connected cluster has: a one-line error before anything starts."""
    tc = cfg.train
    have = ray.cluster_resources()
    need = {"CPU": tc.num_workers * tc.cpus_per_worker}
    if tc.use_gpu:
        need["GPU"] = tc.num_workers * tc.gpus_per_worker
    for res, n in need.items():
        if have.get(res, 0) < n:
            per = tc.gpus_per_worker if res == "GPU" else tc.cpus_per_worker
            raise UsageError(
                f"train.num_workers={tc.num_workers} × {per:g} {res} per worker needs {n:g} {res}s; the Ray cluster "
                f"has {have.get(res, 0):g}",
                hint="lower train.num_workers or train.cpus_per_worker/gpus_per_worker, or join a bigger cluster "
                     "with --address (RAY_ADDRESS)")


def make_trainer(cfg: ExperimentCfg, worker: Any, loop_config: dict[str, Any], *, name: str, storage_path: str,
                 max_failures: int, callbacks: list | None = None) -> TorchTrainer:
    """The ``TorchTrainer`` of one run of ``cfg``: ``train.num_workers`` workers with their CPUs/GPUs, running
    ``worker`` with ``{"cfg": <cfg as JSON>, **loop_config}``; Ray's storage and retries; the last checkpoint
    kept (it is ``last.pt``, or the result)."""
    tc = cfg.train
    os.environ.setdefault(START_TIMEOUT_ENV, str(WORKER_START_TIMEOUT_S))  # Ray Train passes it to its controller
    return TorchTrainer(
        worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), **loop_config},
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu,
            resources_per_worker={"CPU": tc.cpus_per_worker, **({"GPU": tc.gpus_per_worker} if tc.use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=storage_path, callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )


def distributed_config(cfg: ExperimentCfg) -> ExperimentCfg:
    """``cfg`` made portable, with its run dir fixed, so every worker and every attempt train the same run."""
    cfg = portable_config(cfg)
    return with_overrides(cfg, train={"output_dir": str(output_dir_of(cfg).resolve())})


def run_train_distributed(
    cfg: ExperimentCfg,
    *,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    max_failures: int = 1,
    storage_path: str | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train ``cfg`` on ``cfg.train.num_workers`` Ray Train workers; the result dict of ``steps.run_train``."""
    if cfg.train.num_workers < 2:
        raise UsageError(f"train.num_workers={cfg.train.num_workers}: distributed training needs 2 or more",
                         hint="train with medsam2 train (one process) instead")
    cfg = distributed_config(cfg)
    tc = cfg.train
    started = init_ray(address, num_cpus, quiet)
    try:
        check_resources(cfg)
        tracking.setup(cfg)
        name = run_name or f"train-{config_hash(cfg)}"
        with tracking.active_run(run_name=name, parent_run_id=parent_run_id) as run_id:
            tracking.set_tags({"medsam2.launcher": "ray-train"})  # rank 0 tags num_workers (MlflowCallback)
            trainer = make_trainer(cfg, _worker, {"run_id": run_id}, name=f"{cfg.name}-{Path(tc.output_dir).name}",
                                   storage_path=storage_root(storage_path), max_failures=max_failures)
            result = trainer.fit()
            with result.checkpoint.as_directory() as d:
                return json.loads((Path(d) / RESULT_FILE).read_text())
    finally:
        if started:
            ray.shutdown()

