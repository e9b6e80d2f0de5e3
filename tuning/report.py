"""Sweep outputs: one row per trial (params, outcome, Dice) and a parallel-coordinates plot of the table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

STATUSES = ("COMPLETED", "STOPPED_EARLY", "ENDED_BY_TRAINER", "ERROR", "NO_RESULT")
"""STOPPED_EARLY: ASHA stopped the trial; ENDED_BY_TRAINER: its own time budget or patience did
(``tuning.trainable.ENDED_BY_TRAINER``)."""


def _outcome(result) -> str:
    if result.error is not None:
        return "ERROR"
    step, max_steps = result.metrics.get("step"), result.metrics.get("max_steps")
    if step is None:
        return "NO_RESULT"
    if result.metrics.get("ended_by_trainer"):
        return "ENDED_BY_TRAINER"
    return "COMPLETED" if max_steps is None or step >= max_steps else "STOPPED_EARLY"


def _by_step(hist: pd.DataFrame | None) -> dict[int, float]:
    if hist is None or "val_dice" not in hist or "step" not in hist:
        return {}
    return {int(s): round(float(v), 6) for s, v in zip(hist["step"], hist["val_dice"], strict=True)}


def results_table(grid) -> pd.DataFrame:
    """``ResultGrid`` → DataFrame: trial_id, status, val_dice (last), best_val_dice (over all reports), step,
    resumed_from, reports, error, path, then one column per sampled parameter (dotted key)."""
    rows: list[dict[str, Any]] = []
    for r in grid:
        m = r.metrics or {}
        hist = r.metrics_dataframe
        vals = hist["val_dice"].dropna() if hist is not None and "val_dice" in hist else pd.Series([], dtype=float)
        rows.append(
            {
                "trial_id": Path(r.path).name.removeprefix("trial_"),  # see tuning.sweep.trial_dirname
                "status": _outcome(r),
                "val_dice": m.get("val_dice", math.nan),
                "best_val_dice": float(vals.max()) if len(vals) else math.nan,
                "step": m.get("step", 0),
                "resumed_from": int(hist["resumed_from"].max()) if hist is not None and "resumed_from" in hist else 0,
                "reports": len(vals),
                "val_dice_by_step": json.dumps(_by_step(hist)),
                "error": str(r.error)[:300] if r.error is not None else "",
                "path": r.path,
                **{k: v for k, v in (r.config or {}).items()},
            }
        )
    cols = [
        "trial_id",
        "status",
        "val_dice",
        "best_val_dice",
        "step",
        "resumed_from",
        "reports",
        "error",
        "path",
    ]
    return pd.DataFrame(rows, columns=cols + sorted({k for row in rows for k in row} - set(cols)))


def _axis(values: pd.Series) -> tuple[np.ndarray, list[str] | None, str]:
    """Column → positions in [0, 1], tick labels for categorical axes, and an axis-label suffix."""
    num = pd.to_numeric(values, errors="coerce")
    if num.notna().all() and values.nunique() > 1 and not values.map(lambda v: isinstance(v, bool)).any():
        log = (num > 0).all() and num.max() / num.min() > 20
        x = np.log10(num.to_numpy(float)) if log else num.to_numpy(float)
        lo, hi = float(np.min(x)), float(np.max(x))
        return (x - lo) / (hi - lo), None, " (log10)" if log else ""
    cats = sorted(values.astype(str).unique())
    pos = values.astype(str).map({c: i for i, c in enumerate(cats)}).to_numpy(float)
    return pos / max(1, len(cats) - 1), cats, ""


def parallel_coordinates(table: pd.DataFrame, path: Path, metric: str = "best_val_dice") -> Path | None:
    """One line per trial across the sampled parameters and ``metric``, coloured by ``metric``; dashed lines
    are trials ASHA stopped early. Returns the PNG path, or None when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = [c for c in table.columns if "." in c and table[c].notna().all()]
    data = table.dropna(subset=[metric])
    if data.empty or not params:
        return None
    axes = [*params, metric]
    coords, labels = [], {}
    for i, col in enumerate(axes):
        pos, cats, suffix = _axis(data[col])
        coords.append(pos)
        labels[i] = (col + suffix, cats)
    coords = np.stack(coords, axis=1)
    score = data[metric].to_numpy(float)
    lo, hi = float(score.min()), float(score.max())
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(1.8 * len(axes) + 2, 4.5))
    for row, s, status in zip(coords, score, data["status"], strict=True):
        colour = cmap((s - lo) / (hi - lo) if hi > lo else 0.5)
        ax.plot(range(len(axes)), row, color=colour, alpha=0.8, ls="--" if status == "STOPPED_EARLY" else "-")
    for i, (_label, cats) in labels.items():
        ax.axvline(i, color="0.6", lw=0.8)
        if cats:
            for j, c in enumerate(cats):
                ax.text(i + 0.03, j / max(1, len(cats) - 1), c, fontsize=7, va="center")
    ax.set_xticks(range(len(axes)), [lab for lab, _ in labels.values()], rotation=20, ha="right", fontsize=8)
    ax.set_yticks([])
    ax.set_title(f"sweep: {len(data)} trials, colour = {metric} ({lo:.3f}–{hi:.3f}); dashed = stopped early")
    fig.colorbar(plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(lo, hi)), ax=ax, label=metric)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
