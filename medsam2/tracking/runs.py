"""MLflow runs: the experiment, params, metrics, datasets, evaluation artifacts and the training callbacks
(one run per training, child runs per self-training round and Tune trial), and the client every part of
``tracking`` shares."""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import mlflow.data
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from medsam2.config import ExperimentCfg, config_hash
from medsam2.engine.callbacks import Callback, TrainStart
from medsam2.home import medsam2_home
from medsam2.tracking.artifacts import tracking_uri

log = logging.getLogger(__name__)


def setup(cfg: ExperimentCfg) -> str:
    """Point mlflow at the store and experiment; returns the experiment id."""
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        mlflow.set_experiment(cfg.tracking.experiment)
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:"):  # a bare SQLite store needs somewhere local for artifacts
        artifact_location = (medsam2_home() / "mlartifacts").as_uri()
    try:
        exp_id = mlflow.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location)
    except MlflowException:  # created concurrently by another process
        exp_id = mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def log_config(cfg: ExperimentCfg, data_version: str | None = None) -> None:
    """Params (flattened config), tags (config hash, git commit, data version) and the config as YAML."""
    import yaml

    mlflow.log_params({k: str(v)[:500] for k, v in _flatten(cfg.model_dump(mode="json")).items()})
    tags = {"config_hash": config_hash(cfg), "git_commit": git_commit()}
    if data_version:
        tags["data_version"] = data_version
    mlflow.set_tags(tags)
    mlflow.log_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config/resolved.yaml")


class MlflowCallback(Callback):
    """Logs a training run into the active MLflow run: params at start, loss/LR/throughput per log step,
    validation Dice per evaluation, parameter counts and whether the base was randomly initialised."""

    def on_train_start(self, info: TrainStart) -> None:
        log_config(info.config, info.data_version)
        random_init = info.base_weights["source"] == "none"
        mlflow.set_tags({
            "base_weights": info.base_weights["source"], "base_weights_sha256": info.base_weights["sha256"],
            "random_init": str(random_init).lower(), "device": info.device,
            "resumed_from_step": str(info.resumed_from), "precision_effective": info.precision,
            "encoder_compiled": str(info.compiled).lower(), "num_workers": str(info.num_workers),
        })
        if info.compile_error:
            mlflow.set_tag("compile_error", info.compile_error[:500])
        mlflow.log_params({"trainable_params": info.trainable_params, "total_params": info.total_params,
                           "train_images": info.train_images, "val_images": info.val_images,
                           "unlabelled_images": info.unlabelled_images})
        log_dataset(info.config, info.data_version)
        if random_init:
            mlflow.set_tag("mlflow.note.content",
                           "RANDOM INIT: no pretrained SAM2 weights were loaded (model.checkpoint=none).")

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        mlflow.log_metrics({f"train_{k}" if not k.startswith("train") else k: v for k, v in logs.items()}, step=step)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics(metrics, step=step)

    def on_train_end(self, result: Any) -> None:
        mlflow.log_metrics({f"final_{k}" if not k.startswith(("final", "best", "last")) else k: v
                            for k, v in result.metrics.items() if np.isfinite(v)})
        mlflow.log_metric("train_wall_s", result.wall_s)
        _log_loss_curve(result.history)


def log_dataset(cfg: ExperimentCfg, data_version: str) -> None:
    """The training manifest rows as an MLflow dataset input (name = data version), visible in the run's UI."""
    from medsam2.data.manifest import read_manifest

    df = read_manifest(cfg.data.workdir)
    if cfg.data.train_datasets:
        df = df[df["dataset"].isin(cfg.data.train_datasets)]
    cols = ["image_id", "dataset", "split", "label_kind", "modality", "width", "height", "sha256"]
    df = df[df["split"].isin(["train", "val"])][cols].astype(str).reset_index(drop=True)
    ds = mlflow.data.from_pandas(df, source=str(Path(cfg.data.workdir).resolve() / "manifest.parquet"),
                                 name=f"manifest-{data_version}")
    mlflow.log_input(ds, context="training")
    docs = Path(cfg.data.workdir) / "data_docs"
    if (docs / "index.html").exists():  # the great-expectations report of the data this run trained on
        mlflow.log_artifacts(str(docs), "data_docs")


def _log_loss_curve(history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*pts, strict=True), label="train loss")
    vals = [(h["step"], h["val_dice"]) for h in history if "val_dice" in h]
    if vals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*vals, strict=True), "o-", color="tab:green", label="val Dice")
        ax2.set_ylabel("val Dice")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    fig.tight_layout()
    mlflow.log_figure(fig, "plots/learning_curve.png")
    plt.close(fig)


def log_evaluation(result, out_dir: Path, prefix: str = "eval") -> None:
    """Metrics of an ``EvalResult`` and its report folder (HTML, JSON, plots, per-image CSV) to the active run."""
    mlflow.log_metrics({k: v for k, v in result.metrics.items() if v is not None and np.isfinite(v)})
    mlflow.log_artifacts(str(out_dir), prefix)
    try:
        clean = result.per_image[result.per_image["condition"] == "clean"]
        table = clean.pivot_table(index="method", values=["dice", "iou", "precision", "recall"], aggfunc="mean")
        mlflow.log_table(table.reset_index(), f"{prefix}/summary_table.json")
    except (KeyError, ValueError):
        pass


def log_volume_evaluation(result, out_dir: Path, prefix: str = "eval/volumes") -> None:
    """Metrics of a ``VolumeEvalResult`` (``volume_<method>_<metric>``), its report folder and a per-method
    mean table, to the active run."""
    mlflow.log_metrics({k: v for k, v in result.metrics.items() if v is not None and np.isfinite(v)})
    mlflow.log_artifacts(str(out_dir), prefix)
    table = result.per_volume.pivot_table(index="method", values=["dice", "hd95", "nsd"], aggfunc="mean")
    mlflow.log_table(table.reset_index(), f"{prefix}/summary_table.json")


def write_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str))



def _client() -> MlflowClient:
    uri = tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)



@contextmanager
def active_run(*, run_name: str | None = None, run_id: str | None = None, parent_run_id: str | None = None,
               system_metrics: bool = False) -> Iterator[str]:
    """An active MLflow run (a new one, nested under ``parent_run_id`` if given, or ``run_id`` resumed) for the
    pipeline stages in ``medsam2.steps``; yields its run id and ends it on exit (FAILED on an exception)."""
    tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id and not run_id else None
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=tags,
                          log_system_metrics=system_metrics or None) as run:
        yield run.info.run_id


def set_tags(tags: dict[str, str]) -> None:
    """Tags on the active run."""
    mlflow.set_tags(tags)


def run_tags(run_id: str) -> dict[str, str]:
    """The tags of a run."""
    return dict(mlflow.get_run(run_id).data.tags)


def log_run_results(run_id: str, metrics: dict[str, Any], tags: dict[str, str] | None = None) -> None:
    """Finite numeric ``metrics`` and ``tags`` onto a (finished or running) run, by id."""
    client = _client()
    for k, v in metrics.items():
        if isinstance(v, int | float) and v == v:
            client.log_metric(run_id, k, float(v))
    for k, v in (tags or {}).items():
        client.set_tag(run_id, k, v)


def start_parent_run(cfg, name: str, tags: dict[str, str] | None = None) -> str:
    """Create (not activate) a pipeline parent run; stages nest under it via ``mlflow.parentRunId``."""
    exp_id = setup(cfg)
    run = _client().create_run(exp_id, run_name=name, tags={"medsam2.kind": "pipeline", **(tags or {})})
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED", tags: dict[str, str] | None = None) -> None:
    client = _client()
    for k, v in (tags or {}).items():
        client.set_tag(run_id, k, v)
    client.set_terminated(run_id, status)


def run_url(run_id: str) -> str | None:
    """Link to a run in the MLflow UI when tracking goes to a server."""
    uri = tracking_uri()
    if not uri.startswith("http"):
        return None
    run = _client().get_run(run_id)
    return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"


class ChildRunCallback(MlflowCallback):
    """Opens a child run (under ``parent_run_id``) when training starts and closes it when it ends: one MLflow
    run per self-training round, created by the training loop the round calls."""

    def __init__(self, parent_run_id: str | None, name: str, extra_metrics: dict[str, float] | None = None):
        self.parent, self.name, self.extra = parent_run_id, name, dict(extra_metrics or {})
        self.run_id: str | None = None

    def on_train_start(self, info: TrainStart) -> None:
        tags = {"mlflow.parentRunId": self.parent} if self.parent else {}
        self.run_id = mlflow.start_run(run_name=self.name, tags=tags, nested=mlflow.active_run() is not None
                                       ).info.run_id
        super().on_train_start(info)

    def on_train_end(self, result: Any) -> None:
        super().on_train_end(result)
        mlflow.end_run()
