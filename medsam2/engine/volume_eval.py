"""3-D evaluation (``eval.volumes``): per volume, Dice, HD95 and NSD in mm of three ways to segment it.

* ``memory``: the key slice (the slice with the largest target area) gets the evaluation prompt of the
  ground truth (:func:`medsam2.engine.evaluate._prompt_for`: its box, or its sampled points, by the model's
  prompt mode), and SAM2's memory propagates it through the volume (:func:`medsam2.engine.volume.segment_volume`);
* ``oracle_slice_prompts``: the image path on every slice with that slice's own ground-truth prompt; slices
  without target are predicted empty (an oracle knows where the object is: an upper reference, not a rival);
* ``key_prompt_every_slice``: the image path on every slice with the key slice's prompt, no memory: what a
  user gets from one prompt without SAM2's memory.

Metrics come from :func:`medsam2.metrics.volume_metrics` with the volume's spacing; the means and bootstrap
CIs, paired differences and a strip of slices per volume are :func:`medsam2.eval.report.write_volume_report`'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medsam2.config import ExperimentCfg, VolumeCaseCfg
from medsam2.data.volumes import Volume, read_nifti_labels, read_volume
from medsam2.engine.evaluate import _prompt_for
from medsam2.engine.predict import predict
from medsam2.engine.volume import SlicePrompt, check_memory_model, segment_volume
from medsam2.eval.volume_report import write_volume_report
from medsam2.metrics import volume_metrics
from medsam2.model.segmenter import Segmenter

log = logging.getLogger(__name__)
METHODS = ("memory", "oracle_slice_prompts", "key_prompt_every_slice")
STRIP_SLICES = 7


@dataclass
class VolumeEvalResult:
    metrics: dict[str, float]
    """Flat, MLflow-ready: ``volume_memory_dice``, ``volume_memory_dice_ci_low``, …, one set per method."""
    per_volume: pd.DataFrame
    """One row per (volume, method): volume, method, dice, hd95, nsd, key_slice, slices, target_slices."""
    report: dict[str, Any] = field(default_factory=dict)


def _slice_prompt(prompt: dict[str, Any]) -> SlicePrompt:
    """:func:`_prompt_for`'s dict → :class:`SlicePrompt` (same box or points)."""
    if "box" in prompt:
        return SlicePrompt(box=np.asarray(prompt["box"], np.float32))
    return SlicePrompt(points=np.asarray(prompt["points"], np.float32), labels=np.asarray(prompt["point_labels"]))


def _image_path(model: Segmenter, vol: Volume, prompts: dict[int, dict[str, Any]], batch_size: int) -> np.ndarray:
    """(Z, H, W) bool: the image path on the slices in ``prompts``, each with its prompt; other slices empty."""
    out = np.zeros((len(vol), *vol.hw), bool)
    zs = sorted(prompts)
    if not zs:
        return out
    kw: dict[str, list] = {}
    for key in ("box", "points", "point_labels"):
        if key in prompts[zs[0]]:
            kw[{"box": "boxes"}.get(key, key)] = [prompts[z][key] for z in zs]
    preds = predict(model, [vol.slices[z] for z in zs], batch_size=batch_size, precision="fp32", **kw)
    for z, p in zip(zs, preds, strict=True):
        out[z] = p.mask
    return out


def _target(case: VolumeCaseCfg, vol: Volume) -> np.ndarray:
    lab = read_nifti_labels(Path(case.label), vol)
    return np.isin(lab, case.labels) if case.labels else lab > 0


def evaluate_case(model: Segmenter, case: VolumeCaseCfg, *, tolerance_mm: float = 2.0, batch_size: int = 8
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One volume → (a metrics row per method, a strip item for the report: slices, target, memory masks)."""
    vol = read_volume(Path(case.image))
    target = _target(case, vol)
    area = target.sum(axis=(1, 2))
    if not area.any():
        raise ValueError(f"{case.label}: no voxel of labels {list(case.labels) or 'non-zero'}")
    key = int(np.argmax(area))
    key_prompt = _prompt_for(model, target[key])
    preds = {
        "memory": segment_volume(model, vol.slices, {key: _slice_prompt(key_prompt)}).masks,
        "oracle_slice_prompts": _image_path(
            model, vol, {z: _prompt_for(model, target[z]) for z in np.flatnonzero(area)}, batch_size),
        "key_prompt_every_slice": _image_path(model, vol, {z: key_prompt for z in range(len(vol))}, batch_size),
    }
    name = case.name or Path(case.image).name
    base = {"volume": name, "key_slice": key, "slices": len(vol), "target_slices": int((area > 0).sum()),
            "spacing_mm": "x".join(f"{s:g}" for s in vol.spacing)}
    rows = [{**base, "method": m, **volume_metrics(p, target, vol.spacing, tolerance_mm)} for m, p in preds.items()]
    around = np.flatnonzero(area)
    zs = np.unique(np.linspace(around[0], around[-1], STRIP_SLICES).round().astype(int))
    strip = {"volume": name, "slices": [int(z) for z in zs], "images": vol.slices[zs], "target": target[zs],
             "pred": preds["memory"][zs], "key_slice": key, "dice": rows[0]["dice"]}
    return rows, strip


def evaluate_volumes(model: Segmenter, cfg: ExperimentCfg, out_dir: Path, *, title: str,
                     context: dict[str, Any] | None = None) -> VolumeEvalResult:
    """Every case of ``cfg.eval.volumes`` → per-volume table (``volumes.csv``), ``volumes.html`` /
    ``volumes.json`` in ``out_dir`` and flat metrics. The report says when the weights are random."""
    check_memory_model(model)
    ec = cfg.eval
    rows, strips = [], []
    for case in ec.volumes:
        r, s = evaluate_case(model, case, tolerance_mm=ec.nsd_tolerance_mm, batch_size=ec.batch_size)
        rows += r
        strips.append(s)
        log.info("volume %s: memory Dice %.4f", r[0]["volume"], r[0]["dice"])
    per_volume = pd.DataFrame(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_volume.to_csv(out_dir / "volumes.csv", index=False)
    random_init = str(cfg.model.checkpoint).lower() in ("none", "")
    ctx = {**(context or {}), "weights": "RANDOM INIT (no pretrained weights)" if random_init else cfg.model.checkpoint,
           "nsd_tolerance_mm": ec.nsd_tolerance_mm}
    report = write_volume_report(per_volume, strips, out_dir, title=title, context=ctx, seed=cfg.train.seed)
    metrics: dict[str, float] = {}
    for method, stats in report["overall"].items():
        for metric, st in stats.items():
            metrics[f"volume_{method}_{metric}"] = st["mean"]
            metrics[f"volume_{method}_{metric}_ci_low"] = st["ci_low"]
            metrics[f"volume_{method}_{metric}_ci_high"] = st["ci_high"]
    return VolumeEvalResult(metrics=metrics, per_volume=per_volume, report=report)
