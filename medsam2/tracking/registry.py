"""The model registry: versions, the ``champion`` / ``challenger`` / ``previous`` aliases, the promotion gate's
inputs (per-image selection results) and its decisions stored as version tags, and rollback."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import mlflow.data
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from medsam2.tracking.artifacts import tracking_uri
from medsam2.tracking.runs import _client

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"


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

