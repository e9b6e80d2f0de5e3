"""``train-medsam2``: ingest → validate → [sweep] → train → [self-training] → evaluate → promote, one MLflow
parent run per pipeline.

Run it from a deployment: ``prefect deployment run train-medsam2/demo``. Parameters are typed (pydantic), so the
Prefect UI renders them as a form. With ``only_if_new_labels`` (schedules and the new-labels trigger) the run
holds the ``medsam2-retrain`` global concurrency slot and ends early with "skipped: no new labels" when the
labelled-data version is the champion's or the last challenger's: a burst of ``medsam2.labels.arrived`` events
(or the nightly run racing the trigger) trains each data version once. The services it needs (MLflow, and Ray
for a sweep) are checked first, and a failure's state message is the CLI's error line (``flows.failures``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.concurrency.sync import concurrency
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from flows.artifacts import gate_lines, gate_metrics, publish, run_link
from flows.failures import reported
from flows.tasks import (
    GPU_LEASE_S,
    check_labels_task,
    ensure_concurrency_limit,
    evaluate_task,
    ingest_task,
    promote_task,
    self_training_task,
    sweep_task,
    train_task,
    validate_task,
)
from medsam2 import tracking
from medsam2.config import ExperimentCfg, load_config, with_overrides
from medsam2.services import check_mlflow, check_ray

# One retraining of the gated path at a time; each re-checks the data version once it holds the slot.
RETRAIN_LIMIT = "medsam2-retrain"

Override = Annotated[str, StringConstraints(pattern=r"^\s*[A-Za-z_][\w.]*\s*=")]
"""A dotted ``key=value`` config override (``train.max_steps=50``), as ``medsam2 … --set`` takes."""


class ScaleOut(BaseModel):
    """Train the model on several data-parallel workers (Ray Train); the global batch stays ``train.batch_size``."""

    model_config = ConfigDict(extra="forbid")
    num_workers: int = Field(2, ge=2, description="Workers training one model (train.num_workers).")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); CPU workers use gloo.")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)
    address: str | None = Field(None, description="Ray cluster address (None: RAY_ADDRESS or a local Ray).")
    max_failures: int = Field(1, ge=0, description="Restarts of the worker group after a worker dies.")

    def overrides(self) -> list[str]:
        return [f"train.{k}={getattr(self, k)}" for k in ("num_workers", "use_gpu", "cpus_per_worker",
                                                          "gpus_per_worker")]


class SweepStage(BaseModel):
    """An optional Ray Tune sweep after validation; the final model trains from the best trial's config."""

    model_config = ConfigDict(extra="forbid")
    space: str = Field("smoke", description="Registered search space (tuning.spaces), e.g. smoke, gpu_h100.")
    num_samples: int = Field(4, ge=1, description="Number of trials.")
    address: str | None = Field(None, description="Ray cluster address (None: RAY_ADDRESS or a local Ray).")


def project_root() -> Path:
    """Where prefect.yaml and configs/ live: ``MEDSAM2_ROOT`` (set by scripts/env.sh and the image), else the
    checkout this file belongs to."""
    return Path(os.environ.get("MEDSAM2_ROOT") or Path(__file__).resolve().parents[1])


def config_path(config: str | None) -> Path | None:
    """Config file paths are relative to the project root (where prefect.yaml lives) unless absolute."""
    if not config:
        return None
    path = Path(config)
    if not path.is_absolute() and not path.exists():
        path = project_root() / config
    return path.resolve()


def override_list(overrides: list[str] | None, workdir: str | None) -> list[str]:
    """Worker-level ``MEDSAM2_OVERRIDES`` (whitespace-separated ``key=value``; e.g. a GPU worker sets
    ``train.batch_size=32``, a test worker shrinks the model) ← flow ``overrides`` ← ``workdir``."""
    extra = os.environ.get("MEDSAM2_OVERRIDES", "").split() + list(overrides or [])
    return extra + ([f"data.workdir={workdir}"] if workdir else [])


def resolve_cfg(config: str | None, overrides: list[str] | None, workdir: str | None) -> ExperimentCfg:
    """Config file ← ``MEDSAM2_OVERRIDES`` ← flow ``overrides`` ← ``workdir``."""
    return load_config(config_path(config), override_list(overrides, workdir))


def run_scoped(cfg: ExperimentCfg) -> ExperimentCfg:
    """Give each (config, data version) its own output dir, so a rerun after a crash resumes the same training
    while new labels start a fresh one."""
    from medsam2.engine.train import output_dir_of

    # the deployment's dir holds one run dir per identity (no dir: under MEDSAM2_HOME)
    return with_overrides(cfg, train={"output_dir": str(output_dir_of(cfg, cfg.train.output_dir))})


def from_best_config(best_config: str, cfg: ExperimentCfg) -> ExperimentCfg:
    """The sweep's best trial config, trained into this flow's output dir (not the trial's, whose checkpoint
    it would otherwise resume) on this flow's work dir, with this flow's self-training rounds."""
    best = load_config(best_config)
    return with_overrides(best, train={"output_dir": cfg.train.output_dir}, data={"workdir": cfg.data.workdir},
                          semisup={"self_training_rounds": cfg.semisup.self_training_rounds})


def _summary_md(res: dict[str, Any]) -> str:
    m, t, p = res["eval"]["metrics"], res["train"], res["promotion"]
    nan = float("nan")
    sweep = res.get("sweep")
    return "\n".join([
        "# MedSAM2 training pipeline",
        f"- MLflow pipeline run: {run_link(res['parent_run_id'])}; training run: {run_link(t['run_id'])}; "
        f"evaluation run: {run_link(res['eval']['run_id'])}",
        *([f"- Sweep `{sweep['space']}`: {sweep.get('trials')} trials, best val Dice {sweep.get('best_val_dice')}, "
           f"run {run_link(sweep.get('parent_run_id'))}, best config `{sweep.get('best_config')}`"] if sweep else []),
        f"- Model: `{t['model_uri']}`",
        *gate_lines(p),
        f"- Data version: `{t['data_version']}`, config hash `{t['config_hash']}`, {t['steps']} steps, "
        f"trainable/total params {t['trainable_params']:,}/{t['total_params']:,}",
        "",
        "| metric | model | ellipse-in-box baseline |",
        "|---|---|---|",
        *(f"| {name} | {m.get(f'test_{key}', nan):.4f} | {m.get(f'baseline_ellipse_in_box_{key}', nan):.4f} |"
          for name, key in (("Dice", "dice"), ("IoU", "iou"))),
    ])


def _skip(check: dict[str, Any]) -> dict[str, Any]:
    get_run_logger().info("skipped: no new labels (data version %s)", check["data_version"])
    publish("train-medsam2", "\n".join([
        "# MedSAM2 training pipeline — skipped: no new labels",
        f"- Labelled-data version `{check['data_version']}` (champion's `{check['champion_data_version']}`, "
        f"last challenger's `{check['challenger_data_version']}`): nothing trained, no alias moved.",
    ]), {"retrain": 0})
    return {"skipped": True, "reason": "no new labels", **check}


def _pipeline(cfg: ExperimentCfg, config: str | None, overrides: list[str] | None, workdir: str | None,
              sweep: SweepStage | None, scale_out: ScaleOut | None) -> dict[str, Any]:
    """[sweep] → train → [self-training] → evaluate → promote under one MLflow parent run."""
    parent = tracking.start_parent_run(cfg, f"pipeline-{cfg.name}")
    status, swept, tags = "FAILED", None, {}
    try:
        if sweep is not None:
            path = config_path(config)
            swept = {"space": sweep.space, **sweep_task(sweep.space, sweep.num_samples, sweep.address,
                                                        str(path) if path else None, override_list(overrides, workdir),
                                                        parent)}
            tags = {"sweep_parent_run_id": swept.get("parent_run_id") or "", "sweep_space": sweep.space}
            cfg = from_best_config(swept["best_config"], cfg)
        cfg = run_scoped(cfg)
        trained = train_task(cfg, parent, scale_out.address if scale_out else None,
                             scale_out.max_failures if scale_out else 1)
        candidate, cand_run = trained["model_uri"], trained["run_id"]
        selftrained = None
        if cfg.semisup.self_training_rounds > 0:
            selftrained = self_training_task(cfg, trained["checkpoint"], parent)
            if selftrained["improved"]:
                candidate, cand_run = selftrained["model_uri"], selftrained["run_id"]
        evaluated = evaluate_task(candidate, cand_run)
        promoted = promote_task(candidate, evaluated["run_id"], cfg)
        status = "FINISHED"
    finally:
        tracking.end_run(parent, status, tags=tags)
    return {"sweep": swept, "train": trained, "self_training": selftrained, "eval": evaluated,
            "promotion": promoted, "parent_run_id": parent}


@flow(name="train-medsam2", log_prints=True)
@reported
def train_medsam2(
    source: str | None = "sample:kvasir-seg",
    config: str | None = "configs/demo.yaml",
    overrides: list[Override] | None = None,
    workdir: str | None = None,
    only_if_new_labels: bool = False,
    self_training_rounds: Annotated[int, Field(ge=0)] | None = None,
    sweep: SweepStage | None = None,
    scale_out: ScaleOut | None = None,
) -> dict[str, Any]:
    """Fine-tune SAM2 on ``source`` and gate the result against the champion.

    Args:
        source: Folder, s3:// prefix or sample:<name> to ingest first; empty: use the manifest as is.
        config: YAML config file, relative to the project root.
        overrides: Dotted key=value config overrides, e.g. train.max_steps=50.
        workdir: Data work dir (manifest + cache); empty: the config's data.workdir.
        only_if_new_labels: Train only when the labelled-data version is new (schedules, new-labels trigger).
        self_training_rounds: Self-training rounds after training; empty: the config's.
        sweep: Run a Ray Tune sweep first and train the final model from its best trial's config.
        scale_out: Train the model on several data-parallel Ray Train workers (one MLflow run, one model).
    """
    if self_training_rounds is not None:
        overrides = [*(overrides or []), f"semisup.self_training_rounds={self_training_rounds}"]
    if scale_out is not None:
        overrides = [*(overrides or []), *scale_out.overrides()]
    cfg = resolve_cfg(config, overrides, workdir)
    check_mlflow(cfg.tracking.tracking_uri)  # an unreachable server fails the run in seconds, before any work
    for ray_stage in (sweep, scale_out):
        if ray_stage is not None:
            check_ray(ray_stage.address)
    wd = cfg.data.workdir
    ingested = ingest_task(source, wd) if source else None
    validated = validate_task(wd)
    gate: contextlib.AbstractContextManager = contextlib.nullcontext()
    if only_if_new_labels:
        ensure_concurrency_limit(RETRAIN_LIMIT)
        gate = concurrency(RETRAIN_LIMIT, occupy=1, lease_duration=GPU_LEASE_S, strict=True,
                           raise_on_lease_renewal_failure=False)  # a network blip must not kill a training
    with gate:
        if only_if_new_labels:  # checked under the slot: a run that waited sees what the holder registered
            check = check_labels_task(cfg)
            if not check["retrain"]:
                return _skip(check)
        res = _pipeline(cfg, config, overrides, workdir, sweep, scale_out)
    res = {"ingest": ingested, "validate": {"success": validated["success"]}, **res}
    publish("train-medsam2", _summary_md(res), {**res["eval"]["metrics"], **gate_metrics(res["promotion"])})
    return res
