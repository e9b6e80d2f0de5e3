"""Failure flags: a per-image confidence calibrated to the Dice it predicts, and how well it flags failures.

SAM's predicted IoU ranks masks but is not a Dice: a fine-tuned model's head still says 0.9 for a miss. An
**isotonic regression** (pool-adjacent-violators, non-decreasing) fitted on the *val* rows maps predicted IoU to
the expected actual Dice; that is the image's ``confidence`` in [0, 1]. An image whose confidence is below
``review_below`` is marked **needs review**. On the test rows the report gives:

- **ECE** (expected calibration error): over ``n_bins`` equal-width confidence bins, Σ (n_b / N) ·
  |mean confidence_b − mean Dice_b|, for the raw predicted IoU and for the calibrated confidence;
- **Spearman** ρ between confidence and Dice (how well it ranks);
- the **flags' precision and recall** against actual failures, a failure being Dice < ``review_below``:
  precision = flagged failures / flagged images, recall = flagged failures / failures (NaN when undefined);
- the reliability curve (per bin: mean confidence, mean Dice, n), which the HTML report plots.

Fitted with scikit-learn's ``IsotonicRegression``; the calibrator keeps its two knot lists (``x``, ``y``),
applied with linear interpolation between them and clipped outside (as ``out_of_bounds="clip"`` does), as JSON
(``calibration.json`` beside an evaluation report; ``medsam2 predict --calibration`` reads it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.stats import spearmanr
from sklearn.isotonic import IsotonicRegression


class CalibrationCfg(BaseModel):
    """Settings of the failure flags (frozen)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    review_below: float = Field(0.7, gt=0, lt=1)
    """An image whose calibrated confidence (expected Dice) is below this needs review; an actual Dice below it
    is a failure the flags should catch."""
    n_bins: int = Field(10, ge=2)
    """Equal-width confidence bins of the ECE and the reliability curve."""
    min_fit: int = Field(5, ge=2)
    """Fewest val images to fit on; with fewer the evaluation reports no calibration."""


@dataclass(frozen=True)
class Calibrator:
    """Predicted IoU → expected Dice: knots ``x`` (non-decreasing) and ``y`` (non-decreasing, in [0, 1])."""

    x: tuple[float, ...]
    y: tuple[float, ...]
    n_fit: int
    review_below: float

    def __call__(self, iou_pred: np.ndarray | float) -> np.ndarray:
        """Confidence in [0, 1] of each predicted IoU (any shape, same shape out)."""
        return np.clip(np.interp(np.asarray(iou_pred, np.float64), self.x, self.y), 0.0, 1.0)

    def needs_review(self, iou_pred: np.ndarray | float) -> np.ndarray:
        return self(iou_pred) < self.review_below

    def to_dict(self) -> dict[str, Any]:
        return {"method": "isotonic", "input": "iou_pred", "x": list(self.x), "y": list(self.y),
                "n_fit": self.n_fit, "review_below": self.review_below}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibrator:
        if d.get("method") != "isotonic" or len(d.get("x", ())) != len(d.get("y", ())) or not d.get("x"):
            raise ValueError("not an isotonic calibration (method, x and y of equal non-zero length expected)")
        return cls(tuple(map(float, d["x"])), tuple(map(float, d["y"])), int(d["n_fit"]),
                   float(d["review_below"]))

    @classmethod
    def load(cls, path: str | Path) -> Calibrator:
        """From a ``calibration.json`` (its ``calibrator`` entry, or the calibrator itself)."""
        d = json.loads(Path(path).read_text())
        return cls.from_dict(d.get("calibrator", d))


def fit_isotonic(iou_pred: np.ndarray, dice: np.ndarray, review_below: float = 0.7) -> Calibrator:
    """Fit on (N,) predicted IoUs and (N,) actual Dice values (NaN pairs dropped) with scikit-learn's
    ``IsotonicRegression`` (pool-adjacent-violators); its thresholds are the calibrator's knots."""
    x = np.asarray(iou_pred, np.float64).reshape(-1)
    y = np.asarray(dice, np.float64).reshape(-1)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size == 0:
        raise ValueError("no (predicted IoU, Dice) pairs to calibrate on")
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(x, y)
    kx, ky = iso.X_thresholds_.tolist(), iso.y_thresholds_.tolist()
    return Calibrator(tuple(kx), tuple(ky), int(x.size), float(review_below))


def reliability(conf: np.ndarray, actual: np.ndarray, n_bins: int = 10) -> list[dict[str, float]]:
    """Per equal-width bin of ``conf`` ((N,) in [0,1]): ``low``, ``high``, ``n``, ``confidence`` (mean) and
    ``dice`` (mean ``actual``); empty bins are left out."""
    conf, actual = np.asarray(conf, np.float64), np.asarray(actual, np.float64)
    idx = np.clip((conf * n_bins).astype(int), 0, n_bins - 1)
    return [{"low": b / n_bins, "high": (b + 1) / n_bins, "n": int((idx == b).sum()),
             "confidence": float(conf[idx == b].mean()), "dice": float(actual[idx == b].mean())}
            for b in range(n_bins) if (idx == b).any()]


def ece(conf: np.ndarray, actual: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error of ``conf`` against ``actual`` ((N,) each, in [0, 1]); see the module."""
    bins = reliability(conf, actual, n_bins)
    n = sum(b["n"] for b in bins)
    return float(sum(b["n"] / n * abs(b["confidence"] - b["dice"]) for b in bins)) if n else float("nan")


def flag_quality(flagged: np.ndarray, failed: np.ndarray) -> dict[str, float]:
    """Precision and recall of the (N,) bool ``flagged`` against the (N,) bool ``failed``; NaN when undefined."""
    flagged, failed = np.asarray(flagged, bool), np.asarray(failed, bool)
    tp = int((flagged & failed).sum())
    return {"precision": tp / int(flagged.sum()) if flagged.any() else float("nan"),
            "recall": tp / int(failed.sum()) if failed.any() else float("nan"),
            "n_flagged": int(flagged.sum()), "n_failures": int(failed.sum()), "n": int(flagged.size)}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _num(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def assess(cal: Calibrator, iou_pred: np.ndarray, dice: np.ndarray, n_bins: int = 10) -> dict[str, Any]:
    """How ``cal`` does on held-out (N,) predicted IoUs and Dice values: ECE raw / calibrated, Spearman raw /
    calibrated, the flags' precision and recall, and the calibrated reliability curve (strict JSON: an
    undefined value is None)."""
    x = np.clip(np.asarray(iou_pred, np.float64), 0, 1)
    y = np.asarray(dice, np.float64)
    conf = cal(x)
    flags = flag_quality(conf < cal.review_below, y < cal.review_below)
    return {"n": int(x.size), "review_below": cal.review_below,
            "ece_raw": _num(ece(x, y, n_bins)), "ece": _num(ece(conf, y, n_bins)),
            "spearman_raw": _num(_spearman(x, y)), "spearman": _num(_spearman(conf, y)),
            "flags": {k: _num(v) if isinstance(v, float) else v for k, v in flags.items()},
            "reliability": reliability(conf, y, n_bins), "reliability_raw": reliability(x, y, n_bins)}


def finite_metrics(prefix: str, assessed: dict[str, Any]) -> dict[str, float]:
    """The MLflow-ready scalars of :func:`assess` (``{prefix}_confidence_ece``, …), finite values only."""
    vals = {"confidence_ece": assessed["ece"], "confidence_ece_raw": assessed["ece_raw"],
            "confidence_spearman": assessed["spearman"], "confidence_spearman_raw": assessed["spearman_raw"],
            "flag_precision": assessed["flags"]["precision"],
            "flag_recall": assessed["flags"]["recall"],
            "flag_rate": assessed["flags"]["n_flagged"] / max(1, assessed["flags"]["n"])}
    return {f"{prefix}_{k}": float(v) for k, v in vals.items() if v is not None and math.isfinite(v)}
