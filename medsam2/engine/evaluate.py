"""Evaluate a model on the frozen test rows: per-image Dice/IoU/precision/recall/HD95 at each image's own
resolution, the ellipse-in-box and fill-box baselines beside it, optional robustness (corruption × severity)
and cross-dataset results, and an HTML/JSON report with an overlay gallery.

Metrics are computed on the original (H,W) grid of the cached image, never at model resolution, so numbers are
comparable with published ones. Empty-mask rule: see ``medsam2.metrics``.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medsam2.config import ExperimentCfg
from medsam2.data.dataset import load_cached
from medsam2.data.prompts import mask_box, sample_points
from medsam2.data.selection import cross_dataset_rows, select_rows
from medsam2.engine.predict import predict
from medsam2.eval.baselines import BASELINES, PROMPT_BASELINES, mean_mask_baseline
from medsam2.eval.calibration import (
    CalibrationCfg,
    Calibrator,
    assess,
    choose_flag_threshold,
    choose_input,
    finite_metrics,
    fit_isotonic,
    input_values,
)
from medsam2.eval.report import write_report
from medsam2.eval.robustness import IMAGE_CORRUPTIONS, PROMPT_CORRUPTIONS, apply_corruption, severity_drop
from medsam2.metrics import segmentation_metrics, summarize
from medsam2.model.segmenter import Segmenter

log = logging.getLogger(__name__)
ROBUSTNESS_SEVERITIES = (1, 3, 5)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    """Flat, MLflow-ready: ``test_dice``, ``test_dice_ci_low``, …, ``baseline_ellipse_in_box_dice``, …"""
    per_image: pd.DataFrame
    report: dict[str, Any] = field(default_factory=dict)
    n_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "n_images": self.n_images,
                "report": self.report.get("files", {}).get("html")}


def _prompt_for(model: Segmenter, mask: np.ndarray) -> dict[str, Any]:
    """Deterministic evaluation prompt from the ground truth at original resolution."""
    mode = model.cfg.prompt
    if mode == "box":
        box = mask_box(mask)
        return {"box": box if box is not None else np.array([0, 0, mask.shape[1], mask.shape[0]], np.float32)}
    if mode == "points":
        n_pos, n_neg = model.cfg.num_pos_points, model.cfg.num_neg_points
        pts, labels = sample_points(mask, n_pos, n_neg, None)
        return {"points": pts, "point_labels": labels}
    return {}


def _run(model, images, prompts, precision, batch_size, agreement: bool = False):
    return predict(
        model, images,
        boxes=[p.get("box") for p in prompts] if model.cfg.prompt == "box" else None,
        points=[p.get("points") for p in prompts] if model.cfg.prompt == "points" else None,
        point_labels=[p.get("point_labels") for p in prompts] if model.cfg.prompt == "points" else None,
        precision=precision, batch_size=batch_size, agreement=agreement,
    )


#: Manifest columns copied into every per-image result row: the group for cluster bootstraps (``patient_id``: a
#: CVC-ClinicDB video sequence, a DICOM patient) and the content identity of image and mask, so stored results
#: are only compared with results on the very same pixels and labels.
IDENTITY_COLUMNS = ("patient_id", "split", "pixel_sha256", "mask_pixel_sha256")


def _row(meta: pd.Series, method: str, condition: str, severity: int, pred, target) -> dict[str, Any]:
    ident = {c: (str(meta[c]) if c in meta.index and pd.notna(meta[c]) else "") for c in IDENTITY_COLUMNS}
    return {"image_id": meta["image_id"], "dataset": meta["dataset"], "modality": meta["modality"], **ident,
            "method": method, "condition": condition, "severity": severity,
            **segmentation_metrics(pred, target)}


def baseline_fns(prompt: str, train_rows: pd.DataFrame | None, workdir: str | Path) -> dict[str, Any]:
    """Name → ``fn(target (H,W)) -> bool (H,W)`` for the trivial baselines of a prompt mode (``PROMPT_BASELINES``);
    ``mean_mask`` is fitted on ``train_rows``' masks (skipped without them)."""
    fns: dict[str, Any] = {}
    for name in PROMPT_BASELINES[prompt]:
        if name == "mean_mask":
            masks = []
            for _, meta in (train_rows if train_rows is not None else pd.DataFrame()).iterrows():
                mask = load_cached(Path(workdir), meta)[1]
                if mask is not None:
                    masks.append(np.asarray(mask))
            fn = mean_mask_baseline(masks)
            if fn is not None:
                fns[name] = fn
        else:
            fns[name] = BASELINES.get(name)
    return fns


def evaluate_rows(
    model: Segmenter, rows: pd.DataFrame, workdir: str | Path, *, baselines: bool | dict[str, Any] = True,
    robustness: bool = False, precision: str = "auto", batch_size: int = 8, gallery_size: int = 8,
    agreement: bool = False,
) -> tuple[pd.DataFrame, list[dict]]:
    """Per-image results (one row per image × method × condition) and gallery items for ``rows``.

    ``baselines``: True = the prompt mode's parameter-free baselines, or a dict from :func:`baseline_fns`.
    ``agreement``: the model's clean rows also get ``flip_agreement`` (a mirrored second pass)."""
    records, gallery = [], []
    workdir = Path(workdir)
    if baselines is True:
        baselines = baseline_fns(model.cfg.prompt, None, workdir)
    for start in range(0, len(rows), batch_size):
        chunk = rows.iloc[start:start + batch_size]
        images, masks = [], []
        for _, meta in chunk.iterrows():
            image, mask = load_cached(workdir, meta)
            images.append(np.asarray(image))
            masks.append(np.asarray(mask) > 0)
        prompts = [_prompt_for(model, m) for m in masks]
        preds = _run(model, images, prompts, precision, batch_size, agreement)
        for (_, meta), img, gt, pr in zip(chunk.iterrows(), images, masks, preds, strict=True):
            rec = {**_row(meta, "model", "clean", 0, pr.mask, gt), "iou_pred": pr.iou_pred}
            if pr.flip_agreement is not None:
                rec["flip_agreement"] = pr.flip_agreement
            if pr.stability is not None:
                rec["stability"] = pr.stability
            records.append(rec)
            if gallery_size:
                gallery.append({"image_id": meta["image_id"], "image": img, "target": gt, "pred": pr.mask,
                                "dice": rec["dice"]})
            if baselines:
                for name, fn in baselines.items():
                    records.append(_row(meta, name, "clean", 0, fn(gt), gt))
        if robustness:
            records += _robustness(model, chunk, images, masks, prompts, precision, batch_size)
    if gallery_size and len(gallery) > gallery_size:  # keep the worst and best halves only
        gallery.sort(key=lambda g: g["dice"])
        half = gallery_size // 2
        gallery = gallery[:half] + gallery[-(gallery_size - half):]
    return pd.DataFrame.from_records(records), gallery


def _robustness(model, chunk, images, masks, prompts, precision, batch_size) -> list[dict]:
    """Model results under each image corruption, and each prompt corruption that fits the prompt mode."""
    recs = []
    prompt_kinds = {"box": ("box_jitter", "box_scale"), "points": ("point_shift",)}.get(model.cfg.prompt, ())
    for name in IMAGE_CORRUPTIONS + tuple(c for c in PROMPT_CORRUPTIONS if c in prompt_kinds):
        for sev in ROBUSTNESS_SEVERITIES:
            c_imgs, c_prompts = [], []
            for k, (img, pr) in enumerate(zip(images, prompts, strict=True)):
                seed = zlib.crc32(f"{name}:{sev}:{k}".encode())
                if name in IMAGE_CORRUPTIONS:
                    c_imgs.append(apply_corruption(name, image=img, severity=sev, seed=seed).image)
                    c_prompts.append(pr)
                else:
                    c_imgs.append(img)
                    out = apply_corruption(name, box=pr.get("box"), points=pr.get("points"), severity=sev,
                                           seed=seed, image_size=img.shape[:2])
                    c_prompts.append({**pr, **({"box": out.box} if "box" in pr else {"points": out.points})})
            preds = _run(model, c_imgs, c_prompts, precision, batch_size)
            for (_, meta), gt, p in zip(chunk.iterrows(), masks, preds, strict=True):
                recs.append(_row(meta, "model", name, sev, p.mask, gt))
    return recs


def flat_metrics(per_image: pd.DataFrame, prefix: str = "test") -> dict[str, float]:
    """Means + 95 % CIs of the clean model rows, baseline means, and robustness drops, as flat names."""
    clean = per_image[per_image["condition"] == "clean"]
    out: dict[str, float] = {}
    model_rows = clean[clean["method"] == "model"]
    for metric, s in summarize(model_rows).items():
        out[f"{prefix}_{metric}"] = s["mean"]
        out[f"{prefix}_{metric}_ci_low"] = s["ci_low"]
        out[f"{prefix}_{metric}_ci_high"] = s["ci_high"]
    for name in sorted(set(clean["method"]) - {"model"}):
        rows = clean[clean["method"] == name]
        if len(rows):
            out[f"baseline_{name}_dice"] = float(rows["dice"].mean())
            out[f"baseline_{name}_iou"] = float(rows["iou"].mean())
    for ds, rows in model_rows.groupby("dataset"):
        out[f"{prefix}_dice_{ds}"] = float(rows["dice"].mean())
    robust = per_image[(per_image["method"] == "model")]
    if (robust["condition"] != "clean").any():
        for (name, sev), drop in severity_drop(robust, column="condition").items():
            out[f"robust_drop_{name}_s{sev}"] = float(drop)
        sev3 = [v for (n, s), v in severity_drop(robust, column="condition").items() if s == 3]
        out["robust_drop_s3_max"] = float(np.nanmax(sev3)) if sev3 else float("nan")
    return out


def leakage(cfg: ExperimentCfg, *, near_duplicates: bool) -> pd.DataFrame:
    """Train/val ↔ test pairs sharing content (sha256) or, optionally, near-identical pixels (dHash)."""
    from medsam2.data.manifest import read_manifest
    from medsam2.eval.leakage import find_leaks

    workdir = Path(cfg.data.workdir)
    return find_leaks(read_manifest(workdir), near_duplicates=near_duplicates,
                      image_loader=lambda uri: np.load(workdir / uri, mmap_mode="r"))


@dataclass
class FittedFlags:
    """Failure flags fitted on val (:func:`fit_flags`): the calibrator, val's per-image rows and each input's
    val Spearman ρ."""

    cal: Calibrator
    val: pd.DataFrame
    val_rho: dict[str, float | None]


def _flips(df: pd.DataFrame) -> np.ndarray | None:
    return df["flip_agreement"].to_numpy(float) if "flip_agreement" in df else None


def _stabilities(df: pd.DataFrame) -> np.ndarray | None:
    return df["stability"].to_numpy(float) if "stability" in df else None


def fit_flags(model: Segmenter, cfg: ExperimentCfg, ccfg: CalibrationCfg) -> FittedFlags | None:
    """Failure flags (:mod:`medsam2.eval.calibration`) fitted on the val rows: the input (``ccfg.input``, else
    the one that ranks val Dice best), the cross-fitted threshold and the input → Dice calibrator. Fewer than
    ``ccfg.min_fit`` val rows: None (and a warning). Val is mirrored only when an input may need it."""
    if cfg.eval.split == "val":
        raise ValueError("failure flags are fitted on val: evaluate them on another split (eval.split test)")
    val, _ = select_rows(cfg.data, "val", seed=cfg.train.seed)
    if len(val) < ccfg.min_fit:
        log.warning("no failure flags: %d val rows, %d needed to calibrate", len(val), ccfg.min_fit)
        return None
    val_pi, _ = evaluate_rows(model, val, cfg.data.workdir, baselines=False, precision=cfg.train.precision,
                              batch_size=cfg.eval.batch_size, gallery_size=0, agreement=ccfg.may_need_flip)
    name, val_rho = choose_input(val_pi["iou_pred"], _flips(val_pi), val_pi["dice"], _stabilities(val_pi))
    name = ccfg.input or name
    x_val = input_values(name, val_pi["iou_pred"], _flips(val_pi), _stabilities(val_pi))
    flag = ccfg.flag_below
    if flag is None:  # cross-fitted on val: the threshold is not chosen on the images it was fitted on
        flag = choose_flag_threshold(x_val, val_pi["dice"], ccfg.review_below, ccfg.folds, seed=cfg.train.seed)
    return FittedFlags(fit_isotonic(x_val, val_pi["dice"], ccfg.review_below, flag, input=name), val_pi, val_rho)


def apply_flags(fitted: FittedFlags, cfg: ExperimentCfg, per_image: pd.DataFrame, ccfg: CalibrationCfg,
                out_dir: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """Add ``confidence`` and ``needs_review`` to ``per_image``'s clean model rows (in place; NaN / False for
    other rows; ``per_image`` has ``flip_agreement`` when the calibrator needs it), write
    ``out_dir/calibration.json`` and return (its content, flat metrics)."""
    cal, val_pi = fitted.cal, fitted.val
    per_image["confidence"] = np.nan
    per_image["needs_review"] = False
    rows = (per_image["method"] == "model") & (per_image["condition"] == "clean")
    split_pi = per_image.loc[rows]
    per_image.loc[rows, "confidence"] = cal.confidence(split_pi["iou_pred"].to_numpy(float), _flips(split_pi),
                                                       _stabilities(split_pi))
    per_image.loc[rows, "needs_review"] = per_image.loc[rows, "confidence"] < cal.flag_threshold
    on_val = assess(cal, val_pi["iou_pred"], val_pi["dice"], ccfg.n_bins, _flips(val_pi), _stabilities(val_pi))
    on_split = assess(cal, split_pi["iou_pred"], split_pi["dice"], ccfg.n_bins, _flips(split_pi),
                      _stabilities(split_pi))
    res = {"calibrator": cal.to_dict(), "fit_split": "val", "split": cfg.eval.split, "settings": ccfg.model_dump(),
           "input_spearman_val": fitted.val_rho, "val": on_val, cfg.eval.split: on_split}
    (out_dir / "calibration.json").write_text(json.dumps(res, indent=2, allow_nan=False))
    return res, {**finite_metrics(cfg.eval.split, on_split), **finite_metrics("val", on_val)}


def evaluate(
    model: Segmenter, cfg: ExperimentCfg, out_dir: str | Path, *, rows: pd.DataFrame | None = None,
    title: str = "MedSAM2 evaluation", context: dict | None = None, calibration: CalibrationCfg | None = None,
) -> EvalResult:
    """Evaluate on ``cfg.eval.split`` rows of the eval datasets (or ``rows``); write the report to ``out_dir``.

    ``calibration``: also fit failure flags on the val rows (:func:`fit_flags`, before the evaluated rows, so
    these are predicted mirrored only if the chosen input needs it) and report their ECE and precision/recall on
    the evaluated rows (:func:`apply_flags`)."""
    ec = cfg.eval
    if rows is None and ec.cross_dataset:
        rows = cross_dataset_rows(cfg.data)
    elif rows is None:
        rows, _ = select_rows(cfg.data, ec.split, seed=cfg.train.seed)
        if cfg.data.max_eval_images is not None:
            rows = rows.iloc[: cfg.data.max_eval_images]
    if rows.empty:
        raise ValueError(f"no labelled {ec.split!r} rows to evaluate in {cfg.data.workdir}")
    needs_train = "mean_mask" in PROMPT_BASELINES[model.cfg.prompt]  # only that baseline reads training masks
    train_rows = select_rows(cfg.data, "train", seed=cfg.train.seed)[0] if ec.baselines and needs_train else None
    fns = baseline_fns(model.cfg.prompt, train_rows, cfg.data.workdir) if ec.baselines else {}
    fitted = fit_flags(model, cfg, calibration) if calibration is not None else None  # first: does it mirror?
    per_image, gallery = evaluate_rows(
        model, rows, cfg.data.workdir, baselines=fns, robustness=ec.robustness,
        precision=cfg.train.precision, batch_size=ec.batch_size, gallery_size=ec.gallery_size,
        agreement=fitted is not None and fitted.cal.needs_flip,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flags, flag_metrics = None, {}
    if fitted is not None:
        flags, flag_metrics = apply_flags(fitted, cfg, per_image, calibration, out_dir)
    elif calibration is not None:  # too few val rows: the columns are there, empty
        per_image["confidence"], per_image["needs_review"] = np.nan, False
    per_image.to_csv(out_dir / "per_image.csv", index=False)
    leaks = leakage(cfg, near_duplicates=ec.cross_dataset)
    leaks.to_csv(out_dir / "leakage.csv", index=False)
    report = write_report(per_image, out_dir, title=title, summary=context, gallery=gallery, calibration=flags)
    metrics = {**flat_metrics(per_image), **flag_metrics}
    metrics["leakage_exact_pairs"] = float((leaks["kind"] == "exact").sum()) if len(leaks) else 0.0
    metrics["leakage_near_pairs"] = float((leaks["kind"] == "near").sum()) if len(leaks) else 0.0
    if len(leaks):
        log.warning("%d train/test leak pairs found (see leakage.csv)", len(leaks))
    log.info("test dice %.4f on %d images", metrics.get("test_dice", float("nan")), len(rows))
    return EvalResult(metrics=metrics, per_image=per_image, report=report, n_images=len(rows))
