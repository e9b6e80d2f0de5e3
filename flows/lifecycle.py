"""Flows around the model lifecycle: ``ingest-data`` (emits ``medsam2.labels.arrived`` when the labelled set
changes), ``validate-data``, ``evaluate-model``, ``promote-model``, ``retrain-on-new-labels`` and
``sweep-medsam2``. Each run publishes a markdown summary and a metrics table (``flows.artifacts``), checks the
services it needs before the work (MLflow, Ray), and fails with the CLI's error line as its state message
(``flows.failures``)."""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow
from prefect.events import emit_event
from pydantic import Field

from flows.artifacts import gate_lines, gate_metrics, publish, run_link
from flows.failures import reported
from flows.tasks import evaluate_task, ingest_task, promote_task, sweep_task, validate_task
from flows.train import Override, config_path, resolve_cfg, train_medsam2
from medsam2.config import parse_overrides
from medsam2.services import check_mlflow, check_ray

LABELS_ARRIVED = "medsam2.labels.arrived"


@flow(name="ingest-data", log_prints=True)
@reported
def ingest_data(source: str, workdir: str = ".medsam2/work", labels: bool = False) -> dict[str, Any]:
    """Ingest a folder or s3:// prefix; emit ``medsam2.labels.arrived`` if the labelled set's version changed.

    Args:
        source: Folder, s3:// prefix or sample:<name>; a .json file is a Label Studio export (labels).
        workdir: Data work dir (manifest + cache).
        labels: The source is a folder of masks for images already in the work dir (labels coming back).
    """
    res = ingest_task(source, workdir, labels)
    lines = [f"# Ingest of `{res.get('dataset')}`", f"- added {res['added']}, unchanged {res['unchanged']}, "
             f"updated {res.get('updated', 0)}, rows {res['rows']}, dataset version `{res['dataset_version']}`",
             f"- labels changed: {bool(res.get('labels_changed'))}", "",
             "| quarantine reason | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(res["quarantined"].items())] or ["| (none) | 0 |"]
    counts = {k: res.get(k) for k in ("added", "unchanged", "updated", "rows")}
    publish("ingest", "\n".join(lines), {**counts, "quarantined": sum(res["quarantined"].values())})
    if res.get("labels_changed"):
        emit_event(LABELS_ARRIVED, resource={"prefect.resource.id": f"medsam2.workdir.{workdir}"},
                   payload={"dataset_version": res["dataset_version"], "workdir": workdir,
                            "added": res["added"]})
    return res


@flow(name="evaluate-model", log_prints=True)
@reported
def evaluate_model(model: str = "models:/medsam2@champion", overrides: list[Override] | None = None) -> dict:
    """Evaluate a model on the frozen test set (a new MLflow evaluation run).

    Args:
        model: MLflow model URI (models:/name@alias, models:/name/version, runs:/…) or checkpoint path.
        overrides: Dotted key=value overrides of the evaluation config, e.g. data.workdir=….
    """
    check_mlflow((parse_overrides(overrides).get("tracking") or {}).get("tracking_uri"))
    res = evaluate_task(model, None, overrides)
    publish("evaluate-model", "\n".join([
        f"# Evaluation of `{model}`",
        f"- MLflow evaluation run: {run_link(res['run_id'])}",
        f"- Report: `{res.get('report_dir')}`",
    ]), res["metrics"])
    return res


@flow(name="promote-model", log_prints=True)
@reported
def promote_model(model_uri: str, eval_run_id: str, config: str | None = "configs/demo.yaml",
                  workdir: str | None = None) -> dict:
    """Register ``model_uri`` and gate it against its trivial baseline and the champion on the selection split
    (val); the decision and reasons go to the version's tags and to this run's artifacts.

    Args:
        model_uri: MLflow model URI of the candidate.
        eval_run_id: MLflow run holding the candidate's test evaluation; the selection results are stored there.
        config: YAML config with the promotion settings (model name, margin, confidence, guarded metrics).
        workdir: Ingest work dir whose selection split the gate evaluates (default: the config's).
    """
    cfg = resolve_cfg(config, None, workdir)
    check_mlflow(cfg.tracking.tracking_uri)
    res = promote_task(model_uri, eval_run_id, cfg)
    publish("promote-model", "\n".join([
        f"# Promotion gate for `{model_uri}`",
        f"- MLflow evaluation run: {run_link(eval_run_id)}",
        *gate_lines(res),
    ]), gate_metrics(res))
    return res


@flow(name="retrain-on-new-labels", log_prints=True)
@reported
def retrain_on_new_labels(config: str | None = "configs/demo.yaml", overrides: list[Override] | None = None,
                          workdir: str | None = None) -> dict:
    """Retrain only when the labelled-data version differs from the champion's (else 'skipped').

    Args:
        config: YAML config file, relative to the project root.
        overrides: Dotted key=value config overrides.
        workdir: Data work dir; empty: the config's.
    """
    return train_medsam2(source=None, config=config, overrides=overrides, workdir=workdir, only_if_new_labels=True)


@flow(name="validate-data", log_prints=True)
@reported
def validate_data(workdir: str = ".medsam2/work") -> dict:
    """The great-expectations suite over the manifest; fails the run with a readable report on bad data.

    Args:
        workdir: Data work dir (manifest + cache).
    """
    res = validate_task(workdir)
    publish("validate", f"# Validation of `{workdir}`\n- passed; Data Docs: `{res.get('data_docs')}`",
            {k: v for k, v in (res.get("statistics") or {}).items()})
    return res


@flow(name="sweep-medsam2", log_prints=True)
@reported
def sweep_medsam2(space: str = "smoke", num_samples: Annotated[int, Field(ge=1)] = 4, address: str | None = None,
                  config: str | None = "configs/demo.yaml", overrides: list[Override] | None = None) -> dict:
    """Ray Tune ASHA sweep (local Ray, or the cluster at ``address`` / RAY_ADDRESS); writes best_config.yaml,
    which ``train-medsam2`` takes as its ``config`` parameter (or set its ``sweep`` parameter instead).

    Args:
        space: Registered search space (tuning.spaces), e.g. smoke, gpu_h100.
        num_samples: Number of trials.
        address: Ray cluster address; empty: RAY_ADDRESS or a local Ray.
        config: Base YAML config, relative to the project root.
        overrides: Dotted key=value overrides (a sampled key named here is pinned).
    """
    check_ray(address)
    check_mlflow((parse_overrides(overrides).get("tracking") or {}).get("tracking_uri"))
    path = config_path(config)
    res = sweep_task(space, num_samples, address, str(path) if path else None, overrides)
    publish("sweep", "\n".join([
        f"# Sweep `{space}`",
        f"- MLflow sweep run: {run_link(res.get('parent_run_id'))}",
        f"- best val Dice {res.get('best_val_dice')}; best config `{res.get('best_config')}`",
        f"- {res.get('trials')} trials, {res.get('stopped_early')} stopped early, {res.get('errored')} errored",
    ]), {k: res.get(k) for k in ("best_val_dice", "trials", "stopped_early", "errored", "wall_s")})
    return res
