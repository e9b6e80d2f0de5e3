"""Pipeline stages as plain functions: library call + MLflow bookkeeping. The CLI and the Prefect flows both
call these (one function per arrow of the pipeline), so a stage behaves the same however it is started.

Each returns a JSON-serialisable dict (what ``--json`` prints and what flow tasks pass on: paths, URIs, ids).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from medsam2.config import ExperimentCfg, config_hash, with_overrides
from medsam2.errors import UsageError
from medsam2.home import medsam2_home

log = logging.getLogger(__name__)


def run_ingest(source: str, workdir: str, *, labels: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Ingest images (+ masks), or with ``labels`` (or a ``.json`` source: a Label Studio export) the labels of
    images already in ``workdir`` (:func:`medsam2.data.returned_labels.ingest_labels`)."""
    from medsam2.data.ingest import ingest
    from medsam2.data.sample import resolve_source

    if labels or str(source).lower().endswith(".json"):
        from medsam2.data.returned_labels import ingest_labels

        return ingest_labels(source, workdir).to_dict()
    return ingest(resolve_source(source), workdir, **kwargs).to_dict()


def run_validate(workdir: str, data_docs_dir: str | None = None) -> dict[str, Any]:
    from medsam2.data.validate import validate

    docs = data_docs_dir or str(Path(workdir) / "data_docs")
    return validate(workdir, data_docs_dir=docs).to_dict()


def model_card(cfg: ExperimentCfg, result: Any, modality: str = "see manifest") -> str:
    m = cfg.model
    return f"""# MedSAM2 model card

- **Model**: SAM2 {m.sam2_version} {m.backbone}, adapter `{m.adapter}`, decoder `{m.decoder}`, prompt `{m.prompt}`,
  input {m.image_size}×{m.image_size} RGB (grayscale replicated), ImageNet-normalised after windowing to [0,1].
- **Base weights**: {result.base_weights['source']} (sha256 {result.base_weights['sha256'][:16]})
  {'— RANDOM INIT: no pretrained weights were used.' if result.base_weights['source'] == 'none' else ''}
- **Training data version**: {result.data_version}; datasets: {cfg.data.train_datasets or 'all in manifest'}
- **Config hash**: {result.config_hash}; steps: {result.steps}; params trainable/total:
  {result.trainable_params:,}/{result.total_params:,}
- **Output**: one binary mask per prompt (foreground = the prompted structure, probability > 0.5).
- **Intended use**: research on {modality} segmentation; not a medical device; a clinician reviews every mask.
- **Metrics**: see the evaluation run linked by the model version's `eval_run_id` tag.
- **Limitations**: trained on the listed datasets only; performance on other scanners, modalities or
  populations is unknown until evaluated (use `medsam2 evaluate --cross-dataset`).
"""


def run_train(cfg: ExperimentCfg, *, parent_run_id: str | None = None, run_name: str | None = None,
              callbacks: list | None = None, run_id: str | None = None) -> dict:
    """Train inside an MLflow run (nested under ``parent_run_id`` if given; ``run_id``: continue that run, as
    rank 0 of a distributed run does, every attempt into the one run its launcher made) and log the model as a
    pyfunc."""
    from medsam2 import tracking
    from medsam2.engine.train import train

    tracking.setup(cfg)
    with tracking.active_run(run_name=run_name or f"train-{config_hash(cfg)}", parent_run_id=parent_run_id,
                             run_id=run_id, system_metrics=True) as run_id:
        result = train(cfg, callbacks=[tracking.MlflowCallback(), *(callbacks or [])])
        model_uri = tracking.log_model(result.checkpoint, model_card(cfg, result))
        return {"run_id": run_id, "model_uri": model_uri, **result.to_dict()}


def load_for_eval(model: str, cfg_overrides: list[str] | None = None, workdir: str | None = None):
    """A checkpoint path or MLflow model URI → (model, cfg). Data/eval settings come from the checkpoint's
    config with ``--set`` overrides and ``--workdir`` applied on top."""
    from medsam2.config import parse_overrides
    from medsam2.engine.checkpoint import load_model
    from medsam2.engine.runtime import pick_device

    if Path(model).exists():
        net, cfg = load_model(model, pick_device("auto"))
    else:  # an MLflow model: its checkpoint and the base weights logged with it
        from medsam2.tracking import downloaded_model

        with downloaded_model(model) as files:
            net, cfg = load_model(files["checkpoint"], pick_device("auto"), base_weights=files.get("base_weights"))
    sections = parse_overrides(cfg_overrides)
    if workdir:
        sections.setdefault("data", {})["workdir"] = workdir
    if sections:
        cfg = with_overrides(cfg, **sections)
    return net, cfg


def run_export(model: str, out: str | Path, *, quantize: str | None = None) -> dict[str, Any]:
    """Export ``model`` (checkpoint path or MLflow URI) to ONNX in ``out``; an MLflow model also gets the export
    logged beside it (:mod:`medsam2.tracking.exports`). Returns the manifest's summary + where it was logged."""
    from medsam2.engine.export import export_onnx

    registered = not Path(model).exists()
    source = model
    if registered:
        from medsam2.tracking.exports import resolved_version

        source = resolved_version(model)
    net, cfg = load_for_eval(source)
    manifest = export_onnx(net, cfg, out, source=source, quantize=quantize)
    res = {"out": str(out), "source": source, "files": sorted(manifest["files"]),
           "parity_fp32": manifest["parity_fp32"], "export_s": manifest["export_s"],
           "quantized": (manifest.get("quantized") or {}).get("kind")}
    if registered:
        from medsam2.tracking.exports import log_onnx_export

        res["logged"] = log_onnx_export(source, out, quantized=quantize is not None)
    return res


def load_engine(model: str, engine: str = "torch", precision: str | None = None):
    """The engine ``medsam2 predict`` runs: the PyTorch model of a checkpoint / MLflow URI (``torch``; its
    precision is chosen per predict call), or the ONNX Runtime engine of an export directory or of the export
    logged beside an MLflow model (``onnx``; ``precision`` ``int8`` picks its quantised graphs). Returns
    ``(engine, cleanup)``."""
    from medsam2.errors import InputDataError

    if engine == "torch":
        return load_for_eval(model)[0], lambda: None
    if engine != "onnx":
        raise InputDataError(f"--engine {engine!r} is not one of torch, onnx")
    import shutil

    from medsam2.engine.export import OnnxEngine

    precision = "int8" if precision == "int8" else "fp32"
    path = Path(model)
    if path.is_dir():
        return OnnxEngine(path, precision), lambda: None
    if path.exists():
        raise InputDataError(f"--engine onnx takes an export directory or a registered model, not the file {model}",
                             f"export it first: medsam2 export --model {model} --format onnx --out DIR")
    from medsam2.tracking.exports import download_onnx_export, resolved_version

    local = download_onnx_export(model)
    want = resolved_version(model)
    eng = OnnxEngine(local, precision)
    if eng.manifest["source"] != want:
        shutil.rmtree(local, ignore_errors=True)
        raise InputDataError(f"the ONNX export logged for {model} was made from {eng.manifest['source']}, not "
                             f"{want}: it does not match the model", f"re-export: medsam2 export --model {want} "
                             "--format onnx --out DIR")
    return eng, lambda: shutil.rmtree(local, ignore_errors=True)


def run_evaluate(
    model: str, cfg_overrides: list[str] | None = None, *, workdir: str | None = None, run_id: str | None = None,
    report_dir: str | None = None, parent_run_id: str | None = None, flags: bool = True,
    review_below: float | None = None, flag_below: float | None = None, confidence_input: str | None = None,
) -> dict[str, Any]:
    """Evaluate a model, write the report, and log metrics + report into ``run_id`` (else a new eval run).

    ``flags``: on the test split (not cross-dataset) also calibrate failure flags on val
    (:func:`medsam2.engine.evaluate.fit_flags`; ``review_below`` overrides the Dice of a failure, and
    ``flag_below`` the needs-review threshold, else chosen on val; ``confidence_input`` what is calibrated, a
    name in :data:`~medsam2.eval.calibration.CONFIDENCE_INPUTS`, else chosen on val)."""
    from medsam2 import tracking
    from medsam2.engine.evaluate import evaluate
    from medsam2.eval.calibration import CalibrationCfg

    net, cfg = load_for_eval(model, cfg_overrides, workdir)
    tracking.setup(cfg)
    out = Path(report_dir or Path(medsam2_home()) / "reports" / (run_id or "latest"))
    if not cfg.eval.images and not cfg.eval.volumes:
        raise UsageError("eval.images=false leaves nothing to evaluate", "list volumes in eval.volumes (or "
                         "--volumes FILE), or keep eval.images=true")
    with tracking.active_run(run_id=run_id, run_name="evaluate", parent_run_id=parent_run_id) as active:
        context = {"model": model, "run_id": active, "config_hash": config_hash(cfg)}
        res: dict[str, Any] = {"run_id": active, "report_dir": str(out), "metrics": {}, "n_images": 0}
        if cfg.eval.images:
            calibration = None
            if flags and cfg.eval.split == "test" and not cfg.eval.cross_dataset:
                given = {"review_below": review_below, "flag_below": flag_below, "input": confidence_input}
                try:
                    calibration = CalibrationCfg(**{k: v for k, v in given.items() if v is not None})
                except ValueError as e:  # pydantic's ValidationError: an unknown input, a threshold outside (0, 1)
                    raise UsageError(f"failure-flag settings: {e}") from e
            result = evaluate(net, cfg, out, title=f"MedSAM2 evaluation — {model}", calibration=calibration,
                              context=context)
            tracking.log_evaluation(result, out)
            res.update(result.to_dict())
        if cfg.eval.volumes:
            from medsam2.engine.volume_eval import evaluate_volumes

            vres = evaluate_volumes(net, cfg, out / "volumes", title=f"MedSAM2 3-D evaluation — {model}",
                                    context=context)
            tracking.log_volume_evaluation(vres, out / "volumes")
            res["metrics"] = {**res["metrics"], **vres.metrics}
            res.update(n_volumes=vres.report["n_volumes"], volume_report=vres.report["files"]["html"])
        tracking.set_tags({"evaluated_model": model})
        return res


def run_suggest(model: str, workdir: str, budget: int, out: str | Path, *, score: str = "entropy", seed: int = 0,
                cap_budget: bool = False, label: str = "lesion", image_url_prefix: str | None = None
                ) -> dict[str, Any]:
    """Rank the unlabelled pool of ``workdir`` with the acquisition ``score`` and write the labelling queue of the
    top ``budget`` images into ``out`` (:mod:`medsam2.active`). An empty pool is an
    :class:`~medsam2.active.pool.EmptyPoolError`, a budget larger than the pool a UsageError (unless
    ``cap_budget``: then the whole pool is queued)."""
    from medsam2.active.pool import EmptyPoolError, labelled_rows, pool_rows, rank_pool
    from medsam2.active.queue import write_queue
    from medsam2.active.scores import ACQUISITIONS
    from medsam2.errors import UsageError

    if score not in ACQUISITIONS:
        raise UsageError(f"--score {score!r} is not one of {', '.join(ACQUISITIONS.names())}")
    if budget < 1:
        raise UsageError(f"--budget must be at least 1, got {budget}")
    pool = pool_rows(workdir)
    if pool.empty:
        raise EmptyPoolError(f"nothing to suggest: the unlabelled pool of {workdir} is empty (every train image "
                             "has a mask; val and test images are never suggested)",
                             "ingest new unlabelled images into this work dir first")
    if budget > len(pool) and not cap_budget:
        raise UsageError(f"--budget {budget} is larger than the unlabelled pool ({len(pool)} images)",
                         f"use --budget {len(pool)} to queue the whole pool")
    budget = min(budget, len(pool))
    net, cfg = load_for_eval(model, workdir=workdir)
    items = rank_pool(net, pool, workdir, score, budget, labelled=labelled_rows(workdir), seed=seed,
                      precision=cfg.train.precision)
    res = write_queue(items, workdir, out, score=score, model=model, label=label, image_url_prefix=image_url_prefix)
    return {**{k: v for k, v in res.items() if k != "items"}, "pool": len(pool),
            "items": [{k: it[k] for k in ("rank", "image_id", "score")} for it in res["items"]]}


def selection_cfg(model_cfg: ExperimentCfg, cfg: ExperimentCfg, workdir: str | None = None) -> ExperimentCfg:
    """The evaluation settings of the promotion gate: ``model_cfg`` (a checkpoint's config) on ``cfg``'s data
    (or ``workdir``), split ``promotion.selection_split``, with baselines, without gallery and robustness."""
    data = {**cfg.data.model_dump(), "workdir": workdir or cfg.data.workdir}
    ev = {**cfg.eval.model_dump(), "split": cfg.promotion.selection_split, "gallery_size": 0, "robustness": False,
          "cross_dataset": False, "baselines": True}
    return with_overrides(model_cfg, data=data, eval=ev)


def selection_identity(cfg: ExperimentCfg, workdir: str | None = None) -> frozenset[tuple[str, str, str]]:
    """``(image_id, pixel_sha256, mask_pixel_sha256)`` of the rows ``evaluate`` would score on the selection
    split now (the same selection and cap as ``medsam2.engine.evaluate.evaluate``)."""
    import pandas as pd

    from medsam2.data.selection import select_rows

    dc = cfg.data.model_copy(update={"workdir": workdir or cfg.data.workdir})
    rows, _ = select_rows(dc, cfg.promotion.selection_split, seed=cfg.train.seed)
    if dc.max_eval_images is not None:
        rows = rows.iloc[: dc.max_eval_images]

    def text(v) -> str:
        return "" if v is None or (not isinstance(v, str) and pd.isna(v)) else str(v)

    return frozenset((text(r["image_id"]), text(r.get("pixel_sha256")), text(r.get("mask_pixel_sha256")))
                     for _, r in rows.iterrows())


def evaluate_selection(model: str, cfg: ExperimentCfg, workdir: str | None = None, label: str = "selection"):
    """Per-image results of ``model`` (checkpoint or MLflow URI) on the selection split, and its prompt mode."""
    from medsam2.engine.evaluate import evaluate

    net, mcfg = load_for_eval(model, workdir=workdir or cfg.data.workdir)
    scfg = selection_cfg(mcfg, cfg, workdir)
    reports = Path(medsam2_home()) / "reports"
    reports.mkdir(parents=True, exist_ok=True)  # one folder per call: promotions may run concurrently
    out = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=reports))
    result = evaluate(net, scfg, out, title=f"MedSAM2 {scfg.eval.split} evaluation (promotion gate) — {model}")
    return result.per_image, mcfg.model.prompt


def run_promote(model_uri: str, eval_run_id: str, cfg: ExperimentCfg, workdir: str | None = None) -> dict:
    """Gate the candidate on the selection split (never the test split) and move aliases accordingly.

    The candidate is evaluated on ``promotion.selection_split`` and the per-image table is stored with the
    evaluation run as ``selection/per_image.csv`` (a retry reuses it while the split's images and masks are
    unchanged); the champion is re-evaluated on the same set when its stored selection results differ. The
    evaluation run's test results are reported beside the decision only (see ``tracking.promote``).
    """
    from medsam2 import tracking
    from medsam2.promotion import identity_digest, result_identity

    tracking.setup(cfg)
    run_tags = tracking.run_tags(eval_run_id)
    tags = {k: run_tags[k] for k in ("data_version", "config_hash", "git_commit") if k in run_tags}
    split = cfg.promotion.selection_split
    stored = tracking.per_image_results(eval_run_id, tracking.SELECTION_ARTIFACT)
    prompt = run_tags.get("selection_prompt")
    current = selection_identity(cfg, workdir)
    if stored is None or prompt is None or result_identity(stored) != current:
        per_image, prompt = evaluate_selection(model_uri, cfg, workdir, label=f"selection-{eval_run_id}")
        tracking.log_selection_results(eval_run_id, per_image, split=split, prompt=prompt)
    else:
        log.info("reusing the %s results stored with run %s (same images and masks)", split, eval_run_id)
    tags["selection_data_version"] = identity_digest(current)  # which images and masks the gate saw

    def reevaluate(champion_uri: str):
        return evaluate_selection(champion_uri, cfg, workdir, label=f"champion-reeval-{eval_run_id}")[0]

    return tracking.promote(model_uri, eval_run_id, cfg, tags=tags, reevaluate=reevaluate, prompt=prompt)


def labels_changed_since_champion(cfg: ExperimentCfg) -> dict[str, Any]:
    """Retrain only if the labelled-data version is new: neither the champion nor the last challenger was
    trained on it (so a rejected challenger is not retrained on the same data every night)."""
    from medsam2 import tracking
    from medsam2.data.selection import training_data_version

    tracking.setup(cfg)
    current = training_data_version(cfg.data)
    seen = {}
    for alias in (tracking.CHAMPION, tracking.CHALLENGER):
        mv = tracking.alias_version(cfg.promotion.model_name, alias)
        seen[alias] = mv.tags.get("data_version") if mv is not None else None
    return {"retrain": current not in seen.values(), "data_version": current,
            "champion_data_version": seen[tracking.CHAMPION], "challenger_data_version": seen[tracking.CHALLENGER]}


def run_self_training(cfg: ExperimentCfg, teacher_checkpoint: str, *, parent_run_id: str | None = None) -> dict:
    """Self-training rounds; each round is an MLflow child run with pseudo-label count, acceptance rate and
    (where the pool's masks are hidden ground truth) pseudo-label Dice. The best model is logged as a pyfunc in a
    ``self-training-best`` run tagged with the data version of ``cfg.data`` (as a training run is)."""
    from medsam2 import tracking
    from medsam2.data.selection import training_data_version
    from medsam2.engine.self_training import best_checkpoint
    from medsam2.engine.self_training import run_self_training as rounds_fn

    tracking.setup(cfg)
    data_version = training_data_version(cfg.data)  # the labelled data, before any round adds pseudo-labels
    cbs: dict[int, tracking.ChildRunCallback] = {}

    def factory(r: int):
        cbs[r] = tracking.ChildRunCallback(parent_run_id, f"self-train-round-{r}")
        return [cbs[r]]

    results = rounds_fn(cfg, cfg.semisup.self_training_rounds, teacher_checkpoint, factory)
    for res in results:
        tracking.log_run_results(cbs[res.round].run_id, res.metrics, {"improved": str(res.improved).lower()})
    best = best_checkpoint(results, teacher_checkpoint)
    if best == teacher_checkpoint:
        return {"improved": False, "rounds": [r.to_dict() for r in results], "checkpoint": best, "model_uri": None}
    with tracking.active_run(run_name="self-training-best", parent_run_id=parent_run_id) as best_run_id:
        # the same data_version tag and dataset input as a training run: promotion copies the tag to the model
        # version, and labels_changed_since_champion compares it with the current labelled data
        tracking.log_config(cfg, data_version)
        tracking.log_dataset(cfg, data_version)
        tracking.set_tags({"self_training": "true", "teacher_checkpoint": str(teacher_checkpoint)})
        model_uri = tracking.log_model(best)
    return {"improved": True, "rounds": [r.to_dict() for r in results], "checkpoint": best,
            "model_uri": model_uri, "run_id": best_run_id}
