"""Prefect tasks: each is a thin wrapper over one ``medsam2.steps`` function and exchanges only paths, URIs,
run ids and small dicts. I/O tasks retry (an unreachable service or an internal error, not a usage or input
mistake); training never retries, is never cached, and holds the ``gpu`` global concurrency slot. A failing task
has the CLI's error line and hint as its state message (``flows.failures``)."""

from __future__ import annotations

import contextlib
from typing import Any

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency

from flows.failures import reported_task, retry_unless_user_error
from medsam2 import steps
from medsam2.config import ExperimentCfg
from medsam2.engine.callbacks import Callback
from medsam2.errors import InputDataError

MODEL_PROMOTED = "medsam2.model.promoted"


@reported_task(name="ingest", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
               retry_condition_fn=retry_unless_user_error)
def ingest_task(source: str, workdir: str, labels: bool = False) -> dict[str, Any]:
    return steps.run_ingest(source, workdir, labels=labels)


@reported_task(name="validate", cache_policy=NO_CACHE)
def validate_task(workdir: str) -> dict[str, Any]:
    res = steps.run_validate(workdir)
    if not res["success"]:
        raise InputDataError("data validation failed: " + "; ".join(res["failures"]),
                             "fix the data (see the Data Docs) and ingest again")
    return res


def ensure_concurrency_limit(name: str, limit: int = 1) -> None:
    """Create the global concurrency limit ``name`` if the server has none (``concurrency()`` silently skips a
    missing limit unless strict); a concurrent creator winning the race is fine."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))


# The holder renews its lease while it runs; a killed worker's slot frees itself this long after the crash.
GPU_LEASE_S = 60


class ProgressArtifact(Callback):
    """Training progress (percent of max_steps, latest loss) as a Prefect progress artifact."""

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self.artifact_id = create_progress_artifact(0.0, key="train-progress", description="training steps")

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        update_progress_artifact(self.artifact_id, 100.0 * step / self.max_steps)


@reported_task(name="train", retries=0, cache_policy=NO_CACHE)
def train_task(cfg: ExperimentCfg, parent_run_id: str | None, address: str | None = None,
               max_failures: int = 1) -> dict[str, Any]:
    """One process, or ``train.num_workers`` Ray Train workers (``tuning.distributed``; no progress artifact:
    the workers run outside this flow run)."""
    with concurrency("gpu", occupy=1, lease_duration=GPU_LEASE_S):
        if cfg.train.num_workers > 1:
            from tuning.distributed import run_train_distributed

            return run_train_distributed(cfg, parent_run_id=parent_run_id, address=address,
                                         max_failures=max_failures, quiet=True)
        return steps.run_train(cfg, parent_run_id=parent_run_id, callbacks=[ProgressArtifact(cfg.train.max_steps)])


@reported_task(name="self-training", retries=0, cache_policy=NO_CACHE)
def self_training_task(cfg: ExperimentCfg, teacher_checkpoint: str, parent_run_id: str | None) -> dict[str, Any]:
    with concurrency("gpu", occupy=1, lease_duration=GPU_LEASE_S):
        return steps.run_self_training(cfg, teacher_checkpoint, parent_run_id=parent_run_id)


@reported_task(name="evaluate", retries=1, cache_policy=NO_CACHE,
               retry_condition_fn=retry_unless_user_error)
def evaluate_task(model_uri: str, run_id: str | None, overrides: list[str] | None = None) -> dict[str, Any]:
    return steps.run_evaluate(model_uri, overrides, run_id=run_id)


@reported_task(name="promote", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
               retry_condition_fn=retry_unless_user_error)
def promote_task(model_uri: str, eval_run_id: str, cfg: ExperimentCfg) -> dict[str, Any]:
    """The promotion gate; a promotion emits ``medsam2.model.promoted`` (the ``suggest-labels`` trigger)."""
    res = steps.run_promote(model_uri, eval_run_id, cfg)
    if res.get("promoted"):
        from prefect.events import emit_event

        name, version = res["model_name"], res["version"]
        emit_event(MODEL_PROMOTED, resource={"prefect.resource.id": f"medsam2.model.{name}"},
                   payload={"model_uri": f"models:/{name}/{version}", "model_name": name, "version": version,
                            "workdir": cfg.data.workdir})
    return res


@reported_task(name="suggest", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
               retry_condition_fn=retry_unless_user_error)
def suggest_task(model: str, workdir: str, budget: int, out: str, score: str) -> dict[str, Any]:
    return steps.run_suggest(model, workdir, budget, out, score=score, cap_budget=True)


@reported_task(name="check-new-labels", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
               retry_condition_fn=retry_unless_user_error)
def check_labels_task(cfg: ExperimentCfg) -> dict[str, Any]:
    return steps.labels_changed_since_champion(cfg)


@reported_task(name="sweep", retries=0, cache_policy=NO_CACHE)
def sweep_task(space: str, num_samples: int, address: str | None, config: str | None,
               overrides: list[str] | None, parent_run_id: str | None = None) -> dict[str, Any]:
    """The sweep, its MLflow parent run nested under the pipeline's ``parent_run_id``."""
    from tuning.sweep import cli_sweep

    return cli_sweep(space=space, num_samples=num_samples, address=address, config=config, overrides=overrides,
                     json=True, parent_run_id=parent_run_id)
