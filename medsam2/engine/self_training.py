"""Self-training rounds as library functions: teacher → pseudo-labels → student → repeat while val improves.

Round r (``run_self_training``):

1. The teacher (round 1: the given checkpoint; later: the last improving student) predicts every image of the
   unlabelled train pool at its original resolution (``engine.predict``); a confidence score per image
   (``semisup.confidence``) decides which pseudo-masks are kept (``score ≥ semisup.threshold``).
2. A *round work dir* gets its own ``manifest.parquet``: the source manifest with absolute ``image_uri`` /
   ``mask_uri`` (``load_cached`` joins ``workdir / uri``, and an absolute uri wins in pathlib), the pool's
   rows turned unlabelled (``label_kind`` none, mask hidden) and the accepted ones relabelled with their
   pseudo-mask (``label_kind`` mask, ``flags`` + ``pseudo_label``, ``mask_sha256`` of the pseudo-mask, so the
   round's data version differs). With ``data.weak_labels`` the rows whose mask ``data.label_fraction`` hid are
   not in the pool but box-only labelled rows: they stay box-only in the round manifest, their mask hidden too.
   No cache is copied. ``train(cfg)`` then runs unchanged on that work dir with ``data.label_fraction = 1``:
   labelled ∪ weak ∪ accepted pseudo-labels — never a ground-truth mask the selection hid.
3. The student starts from the configured base weights (``model.checkpoint``, as the teacher did — a fresh
   student, as in noisy-student training) and trains ``train.max_steps`` steps.
4. The student is evaluated on the val rows (Dice at original resolution); rounds go on only while val Dice
   improves on the best so far (the teacher's val Dice to begin with). Without val rows no comparison is
   possible and every round runs.

Prompts for pool images (box/point models): the row's manifest ``box`` (a given weak box, e.g. Kvasir's bbox
JSON), else the box of the row's hidden mask, else the full image; points: the most interior point of the
hidden mask, else the box centre. The hidden mask is read only for that and for ``pseudo_dice``, the quality
of the accepted pseudo-labels (for reporting; it never decides acceptance).

Pure library: no MLflow here. ``callbacks_factory(round) -> list[Callback]`` lets the flow wrap each round's
training in a child run.
"""

from __future__ import annotations

import gc
import hashlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medsam2.config import ExperimentCfg, with_overrides
from medsam2.data.dataset import load_cached
from medsam2.data.manifest import (
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    atomic_save_npy,
    read_manifest,
    write_table,
)
from medsam2.data.prompts import mask_box, sample_points
from medsam2.data.selection import select_rows
from medsam2.engine.callbacks import Callback
from medsam2.engine.checkpoint import load_model
from medsam2.engine.predict import Prediction, predict
from medsam2.engine.runtime import pick_device

log = logging.getLogger(__name__)
PSEUDO_FLAG = "pseudo_label"


@dataclass
class RoundResult:
    round: int
    teacher_checkpoint: str
    checkpoint: str
    """The student's ``final.pt``."""
    workdir: str
    """The round work dir (its manifest holds labelled ∪ accepted pseudo-labelled rows)."""
    pseudo: dict[str, float]
    train: dict[str, Any]
    val_dice: float
    best_before: float
    improved: bool
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def confidence_score(pred: Prediction, kind: str) -> float:
    """Confidence of one prediction in [0, 1] (higher = surer).

    ``mean_prob``: mean over pixels of max(p, 1 − p), in [0.5, 1]. ``entropy``: 1 − mean binary entropy in
    bits (1 = every pixel certain, 0 = every pixel at p = 0.5). ``pred_iou``: SAM's predicted IoU, clipped to
    [0, 1].
    """
    p = np.clip(pred.prob.astype(np.float64), 1e-7, 1 - 1e-7)
    if kind == "mean_prob":
        return float(np.maximum(p, 1 - p).mean())
    if kind == "entropy":
        ent = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
        return float(1.0 - ent.mean())
    if kind == "pred_iou":
        return float(np.clip(pred.iou_pred, 0.0, 1.0))
    raise ValueError(f"unknown confidence {kind!r}; use mean_prob, entropy or pred_iou")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Hard Dice of two (H,W) bool masks; both empty → 1 (medsam2.metrics' empty-mask rule)."""
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def row_prompt(mode: str, row: pd.Series, hw: tuple[int, int], mask: np.ndarray | None) -> dict[str, Any]:
    """Prompt for a pool image in its own pixels (see the module docstring for the order of preference)."""
    h, w = hw
    box = row.get("box")
    box = np.asarray(box, np.float32) if box is not None and len(box) == 4 else None
    if box is None and mask is not None:
        box = mask_box(mask)
    if box is None:
        box = np.array([0, 0, w, h], np.float32)
    if mode == "box":
        return {"box": box}
    if mode == "points":
        if mask is not None and mask.any():
            pts, labels = sample_points(mask, 1, 0, None)
        else:
            pts = np.array([[(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]], np.float32)
            labels = np.ones(1, np.int32)
        return {"points": pts[:1], "point_labels": labels[:1]}
    return {}


def pseudo_label(
    model: torch.nn.Module,
    rows: pd.DataFrame,
    workdir: str | Path,
    *,
    confidence: str,
    threshold: float,
    out_dir: str | Path,
    precision: str = "auto",
    batch_size: int = 8,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Pseudo-label ``rows`` (manifest rows of ``workdir``) with ``model``; keep those with score ≥ threshold.

    Writes each accepted mask to ``out_dir/<image_id>.pseudo.npy`` — uint8 (H, W) {0, 1} at the image's own
    resolution (the cache format). Returns (accepted rows: the input rows with absolute ``image_uri``,
    ``mask_uri`` → the pseudo-mask, ``label_kind`` mask, ``flags`` + ``pseudo_label``, ``mask_sha256`` of the
    pseudo-mask and a ``pseudo_confidence`` column; stats: ``n``, ``accepted``, ``acceptance_rate``,
    ``mean_confidence``, ``pseudo_dice`` (mean Dice of accepted pseudo-masks vs the pool's hidden masks, NaN
    when none has one) and ``pseudo_dice_all`` (same over every pool image)).
    """
    workdir, out_dir = Path(workdir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mode = model.cfg.prompt
    accepted, scores, dice_acc, dice_all = [], [], [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows.iloc[start : start + batch_size]
        images, masks, prompts = [], [], []
        for _, row in chunk.iterrows():
            image, mask = load_cached(workdir, row)
            image = np.asarray(image)
            mask = None if mask is None else np.asarray(mask) > 0
            images.append(image)
            masks.append(mask)
            prompts.append(row_prompt(mode, row, image.shape[:2], mask))
        preds = predict(
            model,
            images,
            boxes=[p["box"] for p in prompts] if mode == "box" else None,
            points=[p["points"] for p in prompts] if mode == "points" else None,
            point_labels=[p["point_labels"] for p in prompts] if mode == "points" else None,
            precision=precision,
            batch_size=batch_size,
        )
        for (_, row), pred, gt in zip(chunk.iterrows(), preds, masks, strict=True):
            score = confidence_score(pred, confidence)
            scores.append(score)
            d = None if gt is None else _dice(pred.mask, gt)
            if d is not None:
                dice_all.append(d)
            if score < threshold:
                continue
            pseudo = pred.mask.astype(np.uint8)
            path = out_dir / f"{row['image_id']}.pseudo.npy"
            atomic_save_npy(path, pseudo, fsync=False)
            new = row.copy()
            new["image_uri"] = str((workdir / row["image_uri"]).resolve())
            new["mask_uri"] = str(path.resolve())
            new["label_kind"] = "mask"
            new["mask_sha256"] = hashlib.sha256(pseudo.tobytes()).hexdigest()
            new["mask_fraction"] = float(pseudo.mean())
            new["flags"] = ",".join(
                sorted({f for f in str(row.get("flags") or "").split(",") if f} | {PSEUDO_FLAG})
            )
            new["pseudo_confidence"] = score
            accepted.append(new)
            if d is not None:
                dice_acc.append(d)
    n = len(rows)
    empty = rows.iloc[:0].assign(pseudo_confidence=pd.Series(dtype=float))
    acc = pd.DataFrame(accepted) if accepted else empty
    stats = {
        "n": float(n),
        "accepted": float(len(accepted)),
        "acceptance_rate": len(accepted) / n if n else 0.0,
        "mean_confidence": float(np.mean(scores)) if scores else float("nan"),
        "pseudo_dice": float(np.mean(dice_acc)) if dice_acc else float("nan"),
        "pseudo_dice_all": float(np.mean(dice_all)) if dice_all else float("nan"),
    }
    return acc.reset_index(drop=True), stats


#: Manifest columns that carry (or identify) a row's ground-truth mask; a hidden row loses all of them.
_MASK_COLUMNS = ("mask_uri", "mask_sha256", "mask_pixel_sha256", "mask_source_uri")


def _hide_masks(df: pd.DataFrame, hide: pd.Series, label_kind: str | pd.Series) -> None:
    """In place: rows ``hide`` lose every trace of their mask (uris, hashes, foreground fraction)."""
    df.loc[hide, list(_MASK_COLUMNS)] = None
    df.loc[hide, "mask_fraction"] = 0.0
    df.loc[hide, "label_kind"] = label_kind


def write_round_manifest(
    src_workdir: str | Path,
    dst_workdir: str | Path,
    pool: pd.DataFrame,
    accepted: pd.DataFrame,
    labelled: pd.DataFrame | None = None,
) -> Path:
    """Write ``dst_workdir/manifest.parquet``: the source manifest with absolute uris, ``pool`` rows made
    unlabelled (mask hidden), ``labelled`` rows whose mask the selection hid turned weak, and ``accepted`` rows
    substituted (matched on ``image_id``).

    ``pool`` and ``labelled`` are :func:`~medsam2.data.selection.select_rows`' train rows for the source config.
    The round trains at ``label_fraction`` 1, so the manifest itself must hide every mask ``label_fraction``
    hid: with ``data.weak_labels`` the hidden rows are *labelled* rows of kind ``box`` without a mask (not pool
    rows), and they stay box-only here — their true mask is never reachable from the round's work dir.
    """
    src, dst = Path(src_workdir).resolve(), Path(dst_workdir)
    dst.mkdir(parents=True, exist_ok=True)
    df = read_manifest(src)
    absolute = lambda u: u if not isinstance(u, str) or not u else str(src / u)  # noqa: E731
    df["image_uri"] = df["image_uri"].map(absolute)
    df["mask_uri"] = df["mask_uri"].map(absolute)
    _hide_masks(df, df["image_id"].isin(pool["image_id"]), "none")
    if labelled is not None and len(labelled):
        weak = labelled[labelled["mask_uri"].isna() | (labelled["label_kind"] != "mask")]
        kind_of = dict(zip(weak["image_id"], weak["label_kind"], strict=True))
        demote = df["image_id"].isin(kind_of) & df["mask_uri"].notna()
        _hide_masks(df, demote, df.loc[demote, "image_id"].map(kind_of))
    df = df[~df["image_id"].isin(accepted["image_id"])]
    add = accepted.drop(columns=[c for c in accepted.columns if c not in df.columns])
    df = pd.concat([df, add], ignore_index=True).sort_values("image_id")
    path = dst / MANIFEST_NAME
    write_table(df, path, MANIFEST_COLUMNS)
    return path


def val_dice(model: torch.nn.Module, cfg: ExperimentCfg) -> float:
    """Mean Dice (original resolution) on the val rows of ``cfg.data``; NaN when there are none."""
    from medsam2.engine.evaluate import evaluate_rows

    rows, _ = select_rows(cfg.data, "val", seed=cfg.train.seed)
    if rows.empty:
        return float("nan")
    per_image, _ = evaluate_rows(
        model,
        rows,
        cfg.data.workdir,
        baselines=False,
        gallery_size=0,
        precision=cfg.train.precision,
        batch_size=cfg.eval.batch_size,
    )
    return float(per_image.loc[per_image["method"] == "model", "dice"].mean())


def run_self_training(
    cfg: ExperimentCfg,
    rounds: int,
    teacher_checkpoint: str | Path,
    callbacks_factory: Callable[[int], list[Callback]] | None = None,
    *,
    work_root: str | Path | None = None,
) -> list[RoundResult]:
    """Up to ``rounds`` teacher → pseudo-label → student rounds (module docstring); stops at the first round
    whose student does not beat the best val Dice so far. Returns one :class:`RoundResult` per round run (the
    last may have ``improved`` False: its student is not better; use the last improving round's checkpoint).
    """
    from medsam2.engine.train import output_dir_of, train

    device = pick_device(cfg.train.device)
    root = Path(work_root or output_dir_of(cfg) / "self_training")
    teacher_ckpt = str(teacher_checkpoint)
    best = float("nan")
    results: list[RoundResult] = []
    for r in range(1, rounds + 1):
        rdir = root / f"round_{r}"
        teacher, _ = load_model(teacher_ckpt, device)
        if r == 1:
            best = val_dice(teacher, cfg)
        labelled, pool = select_rows(cfg.data, "train", seed=cfg.train.seed)
        accepted, stats = pseudo_label(
            teacher,
            pool,
            cfg.data.workdir,
            confidence=cfg.semisup.confidence,
            threshold=cfg.semisup.threshold,
            out_dir=rdir / "pseudo",
            precision=cfg.train.precision,
            batch_size=cfg.eval.batch_size,
        )
        log.info("round %d: accepted %d/%d pseudo-labels", r, int(stats["accepted"]), int(stats["n"]))
        write_round_manifest(cfg.data.workdir, rdir / "work", pool, accepted, labelled)
        del teacher
        gc.collect()
        rcfg = with_overrides(
            cfg,
            data={"workdir": str(rdir / "work"), "label_fraction": 1.0},
            train={"output_dir": str(rdir / "train")},
            semisup={"self_training_rounds": 0},
        )
        tres = train(rcfg, callbacks_factory(r) if callbacks_factory else None)
        student, _ = load_model(tres.checkpoint, device)
        vd = val_dice(student, cfg)
        improved = bool(np.isnan(vd) or np.isnan(best) or vd > best)
        results.append(
            RoundResult(
                round=r,
                teacher_checkpoint=teacher_ckpt,
                checkpoint=tres.checkpoint,
                workdir=str(rdir / "work"),
                pseudo=stats,
                train=tres.to_dict(),
                val_dice=vd,
                best_before=best,
                improved=improved,
                metrics={
                    **{k if k.startswith("pseudo") else f"pseudo_{k}": v for k, v in stats.items()},
                    "val_dice": vd,
                },
            )
        )
        if not improved:
            log.info("round %d: val Dice %.4f did not beat %.4f; stopping", r, vd, best)
            break
        best = vd if not np.isnan(vd) else best
        teacher_ckpt = tres.checkpoint
        del student
    return results


def best_checkpoint(results: list[RoundResult], teacher_checkpoint: str | Path) -> str:
    """The checkpoint to keep: the last improving round's student, else the original teacher."""
    good = [r for r in results if r.improved]
    return good[-1].checkpoint if good else str(teacher_checkpoint)
