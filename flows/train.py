"""``train-medsam2``: ingest → validate → train → evaluate → promote, one MLflow parent run per pipeline.

Run it from a deployment: ``prefect deployment run train-medsam2/demo``. Parameters render as a form in the
Prefect UI. With ``only_if_new_labels`` (schedules and the new-labels trigger) the run ends early with
"skipped: no new labels" when the labelled-data version equals the champion's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.tasks import (
    check_labels_task,
    evaluate_task,
    ingest_task,
    promote_task,
    self_training_task,
    train_task,
    validate_task,
)
from medsam2 import tracking
from medsam2.config import ExperimentCfg, load_config


def resolve_cfg(config: str | None, overrides: list[str] | None, workdir: str | None) -> ExperimentCfg:
    """Config file paths are relative to the project root (where prefect.yaml lives) unless absolute.

    Order: config file ← worker-level ``MEDSAM2_OVERRIDES`` (whitespace-separated ``key=value``; e.g. a GPU
    worker sets ``train.batch_size=32``, a test worker shrinks the model) ← flow ``overrides`` ← ``workdir``.
    """
    path = None
    if config:
        path = Path(config)
        if not path.is_absolute() and not path.exists():
            path = Path(__file__).resolve().parents[1] / config
    extra = os.environ.get("MEDSAM2_OVERRIDES", "").split() + list(overrides or [])
    extra += [f"data.workdir={workdir}"] if workdir else []
    return load_config(path, extra)


def run_scoped(cfg: ExperimentCfg) -> ExperimentCfg:
    """Give each (config, data version) its own output dir, so a rerun after a crash resumes the same training
    while new labels start a fresh one."""
    from medsam2.config import config_hash, with_overrides
    from medsam2.data.selection import training_data_version

    tag = f"{config_hash(cfg)}-{training_data_version(cfg.data)}"
    return with_overrides(cfg, train={"output_dir": str(Path(cfg.train.output_dir) / tag)})


def _summary_md(res: dict[str, Any]) -> str:
    m, t, p = res["eval"]["metrics"], res["train"], res["promotion"]
    nan = float("nan")
    url = tracking.run_url(t["run_id"]) or t["run_id"]
    return "\n".join([
        "# MedSAM2 training pipeline",
        f"- MLflow run: {url}",
        f"- Model: `{t['model_uri']}` → registered `{p['model_name']}` v{p['version']} (alias **{p['alias']}**)",
        f"- Gate: {'promoted' if p['promoted'] else 'not promoted'} — " + "; ".join(p["reasons"]),
        f"- Data version: `{t['data_version']}`, config hash `{t['config_hash']}`, {t['steps']} steps, "
        f"trainable/total params {t['trainable_params']:,}/{t['total_params']:,}",
        "",
        "| metric | model | ellipse-in-box baseline |",
        "|---|---|---|",
        *(f"| {name} | {m.get(f'test_{key}', nan):.4f} | {m.get(f'baseline_ellipse_in_box_{key}', nan):.4f} |"
          for name, key in (("Dice", "dice"), ("IoU", "iou"))),
    ])


@flow(name="train-medsam2", log_prints=True)
def train_medsam2(
    source: str | None = "sample:kvasir-seg",
    config: str | None = "configs/demo.yaml",
    overrides: list[str] | None = None,
    workdir: str | None = None,
    only_if_new_labels: bool = False,
) -> dict[str, Any]:
    """Fine-tune SAM2 on ``source`` (folder, s3:// URI, sample:<name>, or None to use the manifest as is)."""
    logger = get_run_logger()
    cfg = resolve_cfg(config, overrides, workdir)
    wd = cfg.data.workdir
    ingested = ingest_task(source, wd) if source else None
    validated = validate_task(wd)
    if only_if_new_labels:
        check = check_labels_task(cfg)
        if not check["retrain"]:
            logger.info("skipped: no new labels (data version %s)", check["data_version"])
            create_markdown_artifact(f"skipped: no new labels (data version `{check['data_version']}`)",
                                     key="train-medsam2-summary")
            return {"skipped": True, "reason": "no new labels", **check}
    cfg = run_scoped(cfg)
    parent = tracking.start_parent_run(cfg, f"pipeline-{cfg.name}")
    status = "FAILED"
    try:
        trained = train_task(cfg, parent)
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
        tracking.end_run(parent, status)
    res = {"ingest": ingested, "validate": {"success": validated["success"]}, "train": trained,
           "self_training": selftrained,
           "eval": evaluated, "promotion": promoted, "parent_run_id": parent}
    create_markdown_artifact(_summary_md(res), key="train-medsam2-summary")
    create_table_artifact([{"metric": k, "value": round(v, 5)} for k, v in sorted(evaluated["metrics"].items())],
                          key="train-medsam2-metrics")
    return res
