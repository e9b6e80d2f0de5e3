"""MLflow: runs, params, metrics, artifacts, the pyfunc model, registry aliases and the promotion gate.

The only module of the library that imports mlflow. Tracking URI: ``tracking.tracking_uri`` in the config,
else ``MLFLOW_TRACKING_URI``, else a SQLite store under ``$MEDSAM2_HOME`` (default ``.medsam2/``).
Registry: model name ``medsam2``; aliases ``champion`` (serving), ``challenger`` (last candidate),
``previous`` (the champion before the current one; ``rollback`` restores it). Stages are never used.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import mlflow.data
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from medsam2.config import ExperimentCfg, config_hash
from medsam2.engine.callbacks import Callback, TrainStart
from medsam2.home import medsam2_home
from medsam2.tracking.artifacts import (  # noqa: F401 (part of tracking's API)
    download_model_checkpoint,
    download_model_files,
    downloaded_model,
    tracking_uri,
)
from medsam2.tracking.serving import (  # noqa: F401 (part of tracking's API)
    SERVING_EXCLUDE,
    MedSAM2PyFunc,
    log_model,
    serving_requirements,
)

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"


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


# ----------------------------------------------------------------------------------------------- registry
def _client() -> MlflowClient:
    uri = tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def alias_version(name: str, alias: str):
    """The ModelVersion holding ``alias``, or None."""
    try:
        return _client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


SELECTION_ARTIFACT = "selection/per_image.csv"
"""Per-image results on ``promotion.selection_split`` (what the gate decides on), beside ``eval/per_image.csv``
(the frozen test split: reported, never decided on)."""
REPORTED_TEST_METRICS = ("test_dice", "test_dice_ci_low", "test_dice_ci_high", "test_iou",
                         "baseline_ellipse_in_box_dice", "baseline_empty_dice", "baseline_mean_mask_dice")


def per_image_results(run_id: str, artifact: str = "eval/per_image.csv") -> pd.DataFrame | None:
    """Per-image evaluation table stored with a run, or None."""
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact,
                                                   tracking_uri=tracking_uri())
    except (MlflowException, OSError):
        return None
    return pd.read_csv(path, dtype={c: str for c in ("image_id", "patient_id", "split", "pixel_sha256",
                                                         "mask_pixel_sha256")})


def log_selection_results(run_id: str, per_image: pd.DataFrame, *, split: str, prompt: str,
                          artifact: str = SELECTION_ARTIFACT) -> None:
    """Store the gate's per-image results on the selection split with ``run_id`` (the evaluation run), with
    tags naming the split, the prompt mode and the identity of the images and masks, and their mean metrics
    (``selection_dice``, ``selection_baseline_<method>_dice``) for the UI."""
    from medsam2.promotion import identity_digest, result_identity

    client = _client()
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / Path(artifact).name
        per_image.to_csv(local, index=False)
        client.log_artifact(run_id, str(local), str(Path(artifact).parent))
    if artifact != SELECTION_ARTIFACT:
        return
    ident = result_identity(per_image)
    for k, v in {"selection_split": split, "selection_prompt": prompt,
                 "selection_identity": identity_digest(ident),
                 "selection_n_images": str(len(ident) if ident is not None else 0)}.items():
        client.set_tag(run_id, k, v)
    clean = per_image[per_image["condition"] == "clean"] if "condition" in per_image.columns else per_image
    for method, rows in clean.groupby("method"):
        name = "selection_dice" if method == "model" else f"selection_baseline_{method}_dice"
        value = float(rows["dice"].mean())
        if np.isfinite(value):
            client.log_metric(run_id, name, value)


def registered_version(name: str, model_uri: str):
    """The version of ``name`` already registered from ``model_uri`` (lowest number if several), or None."""
    try:
        versions = _client().search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    same = [mv for mv in versions
            if mv.source == model_uri or (model_id and getattr(mv, "model_id", None) == model_id)]
    return min(same, key=lambda mv: int(mv.version)) if same else None


def _prompt_of(run, cfg) -> str:
    """The candidate's prompt mode: stored with its selection results, else its logged config, else ``cfg``'s."""
    return (run.data.tags.get("selection_prompt") or run.data.params.get("model.prompt") or cfg.model.prompt)


def promote(
    model_uri: str, eval_run_id: str, cfg, *, tags: dict[str, str] | None = None, reevaluate=None,
    prompt: str | None = None,
) -> dict[str, Any]:
    """Register ``model_uri`` as a new version of ``cfg.promotion.model_name`` and gate it (``promotion.decide``).

    The gate reads the candidate's per-image results on the selection split (``selection/per_image.csv`` of
    ``eval_run_id``, see :func:`log_selection_results`), never the test results (``eval/per_image.csv``, whose
    metrics are only copied to the version's tags). The version always gets alias ``challenger``. If the gate
    passes, the old champion moves to ``previous`` and the new version becomes ``champion``. Decision, reasons,
    the selection split and the identity of its images/masks are stored as version tags.

    The champion's stored selection results are reused only if their ``(image_id, pixel_sha256,
    mask_pixel_sha256)`` set equals the candidate's; otherwise ``reevaluate`` (``fn(champion_model_uri) ->
    per-image DataFrame`` on the selection split) is called, and its results are stored with ``eval_run_id``
    as ``selection/champion_v<N>_per_image.csv``. Without ``reevaluate`` a mismatch rejects the candidate.

    Idempotent (a retried task must not register a duplicate): a ``model_uri`` already registered reuses its
    version — if that version is the champion already, its stored decision is returned and nothing moves;
    otherwise the gate runs again against the current champion and tags and aliases are re-applied.
    """
    from medsam2.promotion import decide, identity_complete, identity_digest, result_identity

    pc = cfg.promotion
    client = _client()
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_registry_uri(tracking_uri())
    challenger = per_image_results(eval_run_id, SELECTION_ARTIFACT)
    if challenger is None:
        raise FileNotFoundError(f"run {eval_run_id} has no {SELECTION_ARTIFACT}: the gate decides on the "
                                f"'{pc.selection_split}' split (steps.run_promote evaluates it first)")
    eval_run = mlflow.get_run(eval_run_id)
    prompt = prompt or _prompt_of(eval_run, cfg)
    existing = registered_version(pc.model_name, model_uri)
    champ = alias_version(pc.model_name, CHAMPION)
    if existing is not None and champ is not None and champ.version == existing.version:
        # the champion alias moves last, so every earlier step of that promotion went through
        log.info("%s is already version %s, the champion: promotion was done before", model_uri, existing.version)
        return _stored_decision(pc.model_name, champ)
    ident = result_identity(challenger)
    champ_df, champ_source = None, "none"
    if champ is not None:
        champ_run = champ.tags.get("eval_run_id")
        champ_df = per_image_results(champ_run, SELECTION_ARTIFACT) if champ_run else None
        champ_source = "stored"
        if result_identity(champ_df) != ident or not identity_complete(ident):
            champ_source = "mismatch"
            if reevaluate is not None:  # other images or mask versions: compare on the candidate's set only
                log.info("re-evaluating champion v%s on the candidate's %s set", champ.version, pc.selection_split)
                champ_df = reevaluate(f"models:/{pc.model_name}/{champ.version}")
                champ_source = "reevaluated"
                log_selection_results(eval_run_id, champ_df, split=pc.selection_split, prompt=prompt,
                                      artifact=f"selection/champion_v{champ.version}_per_image.csv")
            elif champ_df is None:
                champ_df = challenger.iloc[0:0]
    decision = decide(challenger, champ_df, pc, prompt=prompt,
                      champion_name=f"champion v{champ.version}" if champ is not None else "the champion")
    mv = existing if existing is not None else mlflow.register_model(model_uri, pc.model_name)
    version_tags = {
        **(tags or {}), "eval_run_id": eval_run_id, "gate_decision": "promoted" if decision.promote else "rejected",
        "gate_summary": decision.summary[:4900], "gate_reasons": json.dumps(decision.reasons)[:4900],
        "gate_prompt": prompt, "gate_selection_split": pc.selection_split,
        "gate_selection_identity": identity_digest(ident), "gate_champion_results": champ_source,
        "gate_champion_version": str(champ.version) if champ is not None else "",
        **{f"gate_{k}": f"{v:.6g}" if isinstance(v, float) else str(v) for k, v in decision.stats.items()},
    }
    test_metrics = {k: eval_run.data.metrics[k] for k in REPORTED_TEST_METRICS if k in eval_run.data.metrics}
    version_tags.update({k: f"{v:.6f}" for k, v in test_metrics.items()})  # reported beside, never decided on
    for k, v in version_tags.items():
        client.set_model_version_tag(pc.model_name, mv.version, k, v)
    client.set_registered_model_alias(pc.model_name, CHALLENGER, mv.version)
    if decision.promote:
        if champ is not None:
            client.set_registered_model_alias(pc.model_name, PREVIOUS, champ.version)
        client.set_registered_model_alias(pc.model_name, CHAMPION, mv.version)
    return {"model_name": pc.model_name, "version": int(mv.version), "promoted": decision.promote,
            "alias": CHAMPION if decision.promote else CHALLENGER, "summary": decision.summary,
            "reasons": decision.reasons, "stats": decision.stats,
            "previous_champion": int(champ.version) if champ else None,
            "selection": {"split": pc.selection_split, "n_images": len(ident or ()),
                          "identity": identity_digest(ident), "champion_results": champ_source},
            "test_metrics": test_metrics}


def _stored_decision(name: str, mv) -> dict[str, Any]:
    """``promote``'s answer rebuilt from the tags of a version that was promoted earlier."""
    try:
        reasons = json.loads(mv.tags.get("gate_reasons", "[]"))
    except json.JSONDecodeError:  # cut at the tag size limit
        reasons = [mv.tags["gate_reasons"]]
    meta = {"gate_decision", "gate_reasons", "gate_summary", "gate_prompt", "gate_selection_split",
            "gate_selection_identity", "gate_champion_results", "gate_champion_version"}
    stats: dict[str, Any] = {}
    for k, v in mv.tags.items():
        if k.startswith("gate_") and k not in meta:
            try:
                stats[k.removeprefix("gate_")] = float(v)
            except ValueError:
                stats[k.removeprefix("gate_")] = v
    prev = alias_version(name, PREVIOUS)
    return {"model_name": name, "version": int(mv.version), "promoted": True, "alias": CHAMPION,
            "summary": mv.tags.get("gate_summary", ""), "reasons": reasons, "stats": stats,
            "previous_champion": int(prev.version) if prev else None,
            "selection": {"split": mv.tags.get("gate_selection_split"),
                          "n_images": int(float(mv.tags.get("gate_n_images", 0) or 0)),
                          "identity": mv.tags.get("gate_selection_identity"),
                          "champion_results": mv.tags.get("gate_champion_results")},
            "test_metrics": {k: float(mv.tags[k]) for k in REPORTED_TEST_METRICS if k in mv.tags}}


def rollback(model_name: str = "medsam2") -> dict[str, Any]:
    """Give ``champion`` back to the ``previous`` version (the demoted one becomes ``previous``)."""
    client = _client()
    prev, champ = alias_version(model_name, PREVIOUS), alias_version(model_name, CHAMPION)
    if prev is None:
        raise LookupError(f"model {model_name!r} has no '{PREVIOUS}' version to roll back to")
    client.set_registered_model_alias(model_name, CHAMPION, prev.version)
    if champ is not None:
        client.set_registered_model_alias(model_name, PREVIOUS, champ.version)
        client.set_model_version_tag(model_name, champ.version, "rolled_back", "true")
    return {"model_name": model_name, "champion": int(prev.version),
            "previous": int(champ.version) if champ else None}


def _gate_view(mv) -> dict[str, Any]:
    try:
        reasons = json.loads(mv.tags.get("gate_reasons", "[]"))
    except json.JSONDecodeError:
        reasons = [mv.tags.get("gate_reasons", "")]
    return {"version": int(mv.version), "gate_decision": mv.tags.get("gate_decision"),
            "gate_summary": mv.tags.get("gate_summary") or "; ".join(reasons), "gate_reasons": reasons}


def champion_summary(model_name: str = "medsam2") -> dict[str, Any] | None:
    """Version, tags, gate decision and reported test metrics of the current champion (None if there is
    none), and the last challenger's gate decision when it is another version (e.g. a rejected candidate)."""
    mv = alias_version(model_name, CHAMPION)
    if mv is None:
        return None
    metrics = {}
    if mv.tags.get("eval_run_id"):
        metrics = mlflow.get_run(mv.tags["eval_run_id"]).data.metrics
    out = {"model_name": model_name, "version": int(mv.version), "tags": dict(mv.tags), **_gate_view(mv),
           "metrics": {k: metrics[k] for k in sorted(metrics) if k.startswith(("test_", "baseline_", "selection_"))}}
    last = alias_version(model_name, CHALLENGER)
    out["last_challenger"] = _gate_view(last) if last is not None and last.version != mv.version else None
    return out


def last_challenger(model_name: str = "medsam2") -> dict[str, Any] | None:
    """The version holding ``challenger`` (the last candidate) with its gate decision and reasons, or None."""
    mv = alias_version(model_name, CHALLENGER)
    if mv is None:
        return None
    return {"model_name": model_name, **_gate_view(mv), "tags": dict(mv.tags)}


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
