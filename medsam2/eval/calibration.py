"""Failure flags: a per-image confidence calibrated to the Dice it predicts, and how well it flags failures.

SAM's predicted IoU ranks masks but is not a Dice: a fine-tuned model's head still says 0.9 for a miss. An
**isotonic regression** (pool-adjacent-violators, non-decreasing) fitted on the *val* rows maps a per-image
**input** score to the expected actual Dice; that is the image's ``confidence`` in [0, 1]. The inputs are
:data:`CONFIDENCE_INPUTS` (the one source of their names): ``iou_pred`` (SAM's predicted IoU), ``flip_agreement``
(Dice between the masks of the image and of its mirror image, :class:`~medsam2.engine.predict.Prediction`),
``iou_flip`` (their mean) and ``stability`` (SAM's stability score: the IoU of the masks thresholded at logit +1
and −1, what SAM's automatic mask generator ranks masks by; no second pass). Unless the settings name one,
the input with the highest Spearman ρ against Dice on val is used (:func:`choose_input`; test is never
looked at). The fit is **centred** isotonic regression (Oron & Flournoy 2017): each flat step of the fit
becomes one knot at its centre, so the confidence rises strictly
between knots and keeps the input's ranking instead of tying every image of a step (on the 20261203 active-
learning benchmark those ties cut test Spearman from 0.54 to 0.36). A **failure** is an actual Dice below
``review_below``. An image whose confidence is below the calibrator's ``flag_below`` is marked **needs review**:
the threshold is chosen on val by cross-fitting (:func:`choose_flag_threshold`: out-of-fold confidences, the
threshold with the best F1 at catching val failures), because an expected Dice is a mean and stays above
``review_below`` for most images that fail (a threshold at ``review_below`` itself flagged none of the Kvasir
test failures). On the test rows the report gives:

- **ECE** (expected calibration error): over ``n_bins`` equal-width confidence bins, Σ (n_b / N) ·
  |mean confidence_b − mean Dice_b|, for the raw predicted IoU and for the calibrated confidence;
- **Spearman** ρ between confidence and Dice (how well it ranks);
- the **flags' precision and recall** against actual failures, a failure being Dice < ``review_below``:
  precision = flagged failures / flagged images, recall = flagged failures / failures (NaN when undefined);
- the reliability curve (per bin: mean confidence, mean Dice, n), which the HTML report plots.

Fitted with scikit-learn's ``IsotonicRegression``; the calibrator keeps its input's name and two knot lists
(``x``, ``y``), applied with linear interpolation between them and clipped outside (as
``out_of_bounds="clip"`` does), as JSON
(``calibration.json`` beside an evaluation report; ``medsam2 predict --calibration`` reads it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from scipy.stats import spearmanr
from sklearn.isotonic import IsotonicRegression

from medsam2.registry import Registry


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
    flag_below: float | None = Field(None, gt=0, le=1)
    """Needs review below this confidence; None: chosen on val (:func:`choose_flag_threshold`)."""
    folds: int = Field(5, ge=2)
    """Folds of the cross-fitting that chooses ``flag_below`` on val."""
    input: str | None = None
    """The calibrated score, a name in :data:`CONFIDENCE_INPUTS`; None: chosen on val (:func:`choose_input`)."""

    @property
    def may_need_flip(self) -> bool:
        """The input may read ``flip_agreement`` (it is chosen on val, or it reads it): predict both views."""
        return self.input is None or CONFIDENCE_INPUTS.get(self.input).needs_flip

    @field_validator("input")
    @classmethod
    def _known_input(cls, v: str | None) -> str | None:
        return None if v is None else check_input(v)


@dataclass(frozen=True)
class ConfidenceInput:
    """A per-image score the calibrator maps to expected Dice: ``of(iou_pred, flip_agreement, stability) ->
    (N,)`` in [0, 1] (the last two None where not given); ``needs_flip``: it reads ``flip_agreement`` (a second,
    mirrored pass of the model)."""

    needs_flip: bool
    of: Callable[[np.ndarray, np.ndarray | None, np.ndarray | None], np.ndarray]


CONFIDENCE_INPUTS: Registry = Registry("confidence input")
"""Name → :class:`ConfidenceInput` (the settings' ``input``, the calibration JSON's ``input``)."""


def check_input(name: str) -> str:
    """``name`` if it is in :data:`CONFIDENCE_INPUTS`, else a ValueError that lists the names."""
    if name not in CONFIDENCE_INPUTS:
        raise ValueError(f"unknown confidence input {name!r}; use one of {CONFIDENCE_INPUTS.names()}")
    return name


_HOW = {"flip_agreement": "predict with agreement=True",
        "stability": "predictions record it; results written before it was added do not"}


def _need(v: np.ndarray | None, name: str) -> np.ndarray:
    if v is None:
        raise ValueError(f"this confidence input needs {name} ({_HOW[name]})")
    return np.asarray(v, np.float64)


CONFIDENCE_INPUTS.register("iou_pred")(ConfidenceInput(False, lambda iou, flip, stab: np.asarray(iou, np.float64)))
CONFIDENCE_INPUTS.register("flip_agreement")(ConfidenceInput(
    True, lambda iou, flip, stab: _need(flip, "flip_agreement")))
CONFIDENCE_INPUTS.register("iou_flip")(ConfidenceInput(
    True, lambda iou, flip, stab: (np.asarray(iou, np.float64) + _need(flip, "flip_agreement")) / 2))
CONFIDENCE_INPUTS.register("stability")(ConfidenceInput(False, lambda iou, flip, stab: _need(stab, "stability")))


def input_values(name: str, iou_pred, flip_agreement=None, stability=None) -> np.ndarray:
    """(N,) values of the input ``name`` from (N,) predicted IoUs, (N,) flip agreements (None if not run) and
    (N,) stability scores (None if not recorded), clipped to [0, 1]."""
    iou = np.asarray(iou_pred, np.float64).reshape(-1)
    flip = None if flip_agreement is None else np.asarray(flip_agreement, np.float64).reshape(-1)
    stab = None if stability is None else np.asarray(stability, np.float64).reshape(-1)
    return np.clip(CONFIDENCE_INPUTS.get(name).of(iou, flip, stab), 0.0, 1.0)


def choose_input(iou_pred, flip_agreement, dice, stability=None) -> tuple[str, dict[str, float | None]]:
    """The input of :data:`CONFIDENCE_INPUTS` with the highest Spearman ρ against ``dice`` on these (val) rows
    (ties and undefined ρ: the earlier name, ``iou_pred`` first, which needs no second pass) → (name, ρ per
    input). Inputs needing ``flip_agreement`` are skipped when it is None, ``stability`` when that is None."""
    rho: dict[str, float | None] = {}
    for name in CONFIDENCE_INPUTS.names():
        if CONFIDENCE_INPUTS.get(name).needs_flip and flip_agreement is None:
            continue
        if name == "stability" and stability is None:
            continue
        x = input_values(name, iou_pred, flip_agreement, stability)
        y = np.asarray(dice, np.float64).reshape(-1)
        keep = np.isfinite(x) & np.isfinite(y)
        rho[name] = _num(_spearman(x[keep], y[keep]))
    best = max(rho, key=lambda k: -2.0 if rho[k] is None else rho[k])  # max keeps the first of equals
    return best, rho


@dataclass(frozen=True)
class Calibrator:
    """Input score → expected Dice: knots ``x`` (non-decreasing) and ``y`` (non-decreasing, in [0, 1]).

    Called on values of its ``input`` (:func:`input_values`); :meth:`confidence` takes the prediction fields."""

    x: tuple[float, ...]
    y: tuple[float, ...]
    n_fit: int
    review_below: float
    """A failure: actual Dice below this."""
    flag_below: float | None = None
    """Needs review: confidence below this (None: ``review_below``)."""
    input: str = "iou_pred"
    """The calibrated score, a name in :data:`CONFIDENCE_INPUTS`."""

    @property
    def needs_flip(self) -> bool:
        """The input reads ``flip_agreement``: predict with ``agreement=True``."""
        return CONFIDENCE_INPUTS.get(self.input).needs_flip

    def confidence(self, iou_pred, flip_agreement=None, stability=None) -> np.ndarray:
        """(N,) confidences from (N,) predicted IoUs, flip agreements (None unless :attr:`needs_flip`) and
        stability scores (read only by the ``stability`` input)."""
        return self(input_values(self.input, iou_pred, flip_agreement, stability))

    @property
    def flag_threshold(self) -> float:
        return self.review_below if self.flag_below is None else self.flag_below

    def __call__(self, iou_pred: np.ndarray | float) -> np.ndarray:
        """Confidence in [0, 1] of each predicted IoU (any shape, same shape out)."""
        return np.clip(np.interp(np.asarray(iou_pred, np.float64), self.x, self.y), 0.0, 1.0)

    def needs_review(self, iou_pred: np.ndarray | float) -> np.ndarray:
        return self(iou_pred) < self.flag_threshold

    def to_dict(self) -> dict[str, Any]:
        return {"method": "isotonic", "input": self.input, "x": list(self.x), "y": list(self.y),
                "n_fit": self.n_fit, "review_below": self.review_below, "flag_below": self.flag_threshold}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibrator:
        if d.get("method") != "isotonic" or len(d.get("x", ())) != len(d.get("y", ())) or not d.get("x"):
            raise ValueError("not an isotonic calibration (method, x and y of equal non-zero length expected)")
        flag = d.get("flag_below")  # absent in calibrations written before it was chosen on val
        name = check_input(str(d.get("input", "iou_pred")))
        return cls(tuple(map(float, d["x"])), tuple(map(float, d["y"])), int(d["n_fit"]),
                   float(d["review_below"]), None if flag is None else float(flag), name)

    @classmethod
    def load(cls, path: str | Path) -> Calibrator:
        """From a ``calibration.json`` (its ``calibrator`` entry, or the calibrator itself)."""
        d = json.loads(Path(path).read_text())
        return cls.from_dict(d.get("calibrator", d))


def _pairs(iou_pred: np.ndarray, dice: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(iou_pred, np.float64).reshape(-1)
    y = np.asarray(dice, np.float64).reshape(-1)
    keep = np.isfinite(x) & np.isfinite(y)
    if not keep.any():
        raise ValueError("no (predicted IoU, Dice) pairs to calibrate on")
    return x[keep], y[keep]


def _centre_steps(kx: list[float], ky: list[float]) -> tuple[list[float], list[float]]:
    """Centred isotonic knots: each run of equal ``ky`` (a flat step) becomes one knot at the middle of its
    ``kx`` span."""
    cx, cy, i = [], [], 0
    while i < len(kx):
        j = i
        while j + 1 < len(kx) and ky[j + 1] == ky[i]:
            j += 1
        cx.append((kx[i] + kx[j]) / 2)
        cy.append(ky[i])
        i = j + 1
    return cx, cy


def fit_isotonic(values: np.ndarray, dice: np.ndarray, review_below: float = 0.7,
                 flag_below: float | None = None, *, input: str = "iou_pred", centred: bool = True) -> Calibrator:
    """Fit on (N,) input values (predicted IoUs by default) and (N,) actual Dice values (NaN pairs dropped)
    with scikit-learn's ``IsotonicRegression`` (pool-adjacent-violators); its thresholds are the knots, each
    flat step collapsed to its centre when ``centred`` (see the module)."""
    x, y = _pairs(values, dice)
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(x, y)
    kx, ky = iso.X_thresholds_.tolist(), iso.y_thresholds_.tolist()
    if centred:
        kx, ky = _centre_steps(kx, ky)
    return Calibrator(tuple(kx), tuple(ky), int(x.size), float(review_below),
                      None if flag_below is None else float(flag_below), input)


def choose_flag_threshold(values: np.ndarray, dice: np.ndarray, review_below: float = 0.7, folds: int = 5,
                          seed: int = 0) -> float:
    """The needs-review threshold on the calibrated confidence, chosen on val without fitting and choosing on
    the same images: each of ``folds`` folds gets confidences from a calibrator fitted on the other folds, and
    the threshold ``t`` (flag = out-of-fold confidence < t) with the best F1 at catching failures (Dice <
    ``review_below``) wins; ties go to the smaller ``t`` (fewer flags). ``review_below`` when val has no
    failure, or too few images for the folds."""
    x, y = _pairs(values, dice)
    failed = y < review_below
    k = min(folds, int(x.size) // 2)
    if not failed.any() or k < 2:
        return float(review_below)
    fold = np.random.default_rng(seed).permutation(x.size) % k
    conf = np.empty_like(x)
    for f in range(k):
        held = fold == f
        conf[held] = fit_isotonic(x[~held], y[~held], review_below)(x[held])
    levels = np.unique(conf)
    cuts = np.append((levels[:-1] + levels[1:]) / 2, levels[-1] + 1e-6)  # between levels, and above them all
    best, best_f1 = float(review_below), -1.0
    for t in cuts:
        flagged = conf < t
        tp = int((flagged & failed).sum())
        f1 = 2 * tp / (int(flagged.sum()) + int(failed.sum()))
        if f1 > best_f1 + 1e-12:
            best, best_f1 = float(min(t, 1.0)), f1
    return best


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


def assess(cal: Calibrator, iou_pred: np.ndarray, dice: np.ndarray, n_bins: int = 10,
           flip_agreement: np.ndarray | None = None, stability: np.ndarray | None = None) -> dict[str, Any]:
    """How ``cal`` does on held-out (N,) predicted IoUs (and flip agreements or stability scores, if its input
    reads them) and Dice
    values: ECE raw (the predicted IoU as a Dice) / calibrated, Spearman raw / calibrated, the flags' precision
    and recall, and the calibrated reliability curve (strict JSON: an undefined value is None)."""
    x = np.clip(np.asarray(iou_pred, np.float64), 0, 1)
    y = np.asarray(dice, np.float64)
    conf = cal.confidence(x, flip_agreement, stability)
    flags = flag_quality(conf < cal.flag_threshold, y < cal.review_below)
    return {"n": int(x.size), "input": cal.input, "review_below": cal.review_below, "flag_below": cal.flag_threshold,
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
            "flag_rate": assessed["flags"]["n_flagged"] / max(1, assessed["flags"]["n"]),
            "flag_below": assessed.get("flag_below")}
    return {f"{prefix}_{k}": float(v) for k, v in vals.items() if v is not None and math.isfinite(v)}
