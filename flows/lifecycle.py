"""Flows around the model lifecycle: ``ingest-data`` (emits ``medsam2.labels.arrived`` when the labelled set
changes), ``validate-data``, ``evaluate-model``, ``promote-model``, ``retrain-on-new-labels`` and
``sweep-medsam2``."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from flows.tasks import evaluate_task, ingest_task, promote_task, sweep_task, validate_task
from flows.train import resolve_cfg, train_medsam2

LABELS_ARRIVED = "medsam2.labels.arrived"


@flow(name="ingest-data", log_prints=True)
def ingest_data(source: str, workdir: str = ".medsam2/work") -> dict[str, Any]:
    """Ingest a folder or s3:// prefix; emit ``medsam2.labels.arrived`` if the labelled set's version changed."""
    res = ingest_task(source, workdir)
    lines = [f"# Ingest of `{res.get('dataset')}`", f"- added {res['added']}, unchanged {res['unchanged']}, "
             f"updated {res.get('updated', 0)}, rows {res['rows']}, dataset version `{res['dataset_version']}`",
             "", "| quarantine reason | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(res["quarantined"].items())] or ["| (none) | 0 |"]
    create_markdown_artifact("\n".join(lines), key="ingest-summary")
    if res.get("labels_changed"):
        emit_event(LABELS_ARRIVED, resource={"prefect.resource.id": f"medsam2.workdir.{workdir}"},
                   payload={"dataset_version": res["dataset_version"], "workdir": workdir,
                            "added": res["added"]})
    return res


@flow(name="evaluate-model", log_prints=True)
def evaluate_model(model: str = "models:/medsam2@champion", overrides: list[str] | None = None) -> dict:
    return evaluate_task(model, None, overrides)


@flow(name="promote-model", log_prints=True)
def promote_model(model_uri: str, eval_run_id: str, config: str | None = "configs/demo.yaml") -> dict:
    return promote_task(model_uri, eval_run_id, resolve_cfg(config, None, None))


@flow(name="retrain-on-new-labels", log_prints=True)
def retrain_on_new_labels(config: str | None = "configs/demo.yaml", overrides: list[str] | None = None,
                          workdir: str | None = None) -> dict:
    """Retrain only when the labelled-data version differs from the champion's (else 'skipped')."""
    return train_medsam2(source=None, config=config, overrides=overrides, workdir=workdir, only_if_new_labels=True)


@flow(name="validate-data", log_prints=True)
def validate_data(workdir: str = ".medsam2/work") -> dict:
    """The great-expectations suite over the manifest; fails the run with a readable report on bad data."""
    res = validate_task(workdir)
    create_markdown_artifact(f"validation passed; Data Docs: `{res.get('data_docs')}`", key="validate-summary")
    return res


@flow(name="sweep-medsam2", log_prints=True)
def sweep_medsam2(space: str = "smoke", num_samples: int = 4, address: str | None = None,
                  config: str | None = "configs/demo.yaml", overrides: list[str] | None = None) -> dict:
    """Ray Tune ASHA sweep (local Ray, or the cluster at ``address`` / RAY_ADDRESS); writes best_config.yaml,
    which ``train-medsam2`` takes as its ``config`` parameter."""
    res = sweep_task(space, num_samples, address, config, overrides)
    create_markdown_artifact(f"best val Dice {res.get('best_val_dice')}; best config `{res.get('best_config')}`; "
                             f"{res.get('trials')} trials, {res.get('stopped_early')} stopped early",
                             key="sweep-summary")
    return res
