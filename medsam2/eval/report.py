"""Evaluation report: JSON summary with bootstrap CIs, PNG plots, and one self-contained HTML page.

Input is a per-(image, condition) results table, the output of the evaluation loop:

====================  =========================================================================
column                meaning
====================  =========================================================================
image_id, dataset     which image (``(dataset, image_id)`` identifies it); required
dice                  required; ``iou, precision, recall, hd95`` are summarised when present
modality              optional, default ``"unknown"``
condition             ``"clean"`` or a corruption name (:mod:`medsam2.eval.robustness`); default clean
severity              int 0..5; default 0
method                e.g. ``"model"``, ``"ellipse_in_box"``, ``"fill_box"``; default ``"model"``
train_dataset         optional; when present the cross-dataset matrix is train_dataset × dataset
====================  =========================================================================

Clean rows are those with condition ``"clean"`` (or, if there are none, severity 0). Means, CIs, the
per-dataset / per-modality breakdowns and the histogram use clean rows; severity curves use all rows.
NaN metric values are ignored and stored as JSON ``null``; the JSON is strict (no NaN/Infinity tokens).
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medsam2.eval.robustness import severity_drop
from medsam2.eval.stats import paired_bootstrap
from medsam2.metrics import METRIC_NAMES, summarize

REFERENCE_METHOD = "model"
GALLERY_MAX = 16


def _prepare(results: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(results, pd.DataFrame):
        raise TypeError(f"results must be a pandas DataFrame, got {type(results).__name__}")
    if len(results) == 0:
        raise ValueError("write_report needs at least one result row")
    missing = [c for c in ("image_id", "dataset", "dice") if c not in results.columns]
    if missing:
        raise KeyError(f"results lack required column(s) {missing}")
    df = results.copy()
    defaults = {"condition": "clean", "severity": 0, "method": REFERENCE_METHOD, "modality": "unknown"}
    for col, value in defaults.items():
        if col not in df.columns:
            df[col] = value
    df["severity"] = df["severity"].fillna(0).astype(int)
    for col in ("condition", "method", "modality", "dataset", "image_id"):
        df[col] = df[col].astype(str)
    return df


def _clean_rows(df: pd.DataFrame) -> pd.DataFrame:
    clean = df[df["condition"] == "clean"]
    return clean if len(clean) else df[df["severity"] == 0]


def _jsonable(x: Any) -> Any:
    """Plain JSON types: numpy scalars → Python, NaN/inf → None, tuple keys → "a@b" strings."""
    if isinstance(x, dict):
        return {
            ("@".join(map(str, k)) if isinstance(k, tuple) else str(k)): _jsonable(v) for k, v in x.items()
        }
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _stats_by(df: pd.DataFrame, key: str, metrics: list[str], n_boot: int, seed: int) -> dict:
    return {
        str(k): {str(m): summarize(g, metrics, n_boot=n_boot, seed=seed) for m, g in gk.groupby("method")}
        for k, gk in df.groupby(key, sort=True)
    }


def _comparisons(clean: pd.DataFrame, n_boot: int, seed: int) -> dict:
    """Paired bootstrap of the reference method's Dice against every other method, on shared images."""
    methods = sorted(clean["method"].unique())
    if REFERENCE_METHOD not in methods or len(methods) < 2:
        return {}
    keyed = clean.groupby(["method", "dataset", "image_id"])["dice"].mean()
    ref = keyed.loc[REFERENCE_METHOD]
    out = {}
    for other in methods:
        if other == REFERENCE_METHOD:
            continue
        joined = pd.concat([keyed.loc[other].rename("a"), ref.rename("b")], axis=1, join="inner").dropna()
        if len(joined):
            res = paired_bootstrap(joined["a"].to_numpy(), joined["b"].to_numpy(), n_boot=n_boot, seed=seed)
            out[f"{REFERENCE_METHOD}_vs_{other}"] = {"metric": "dice", **res}
    return out


def _severity_curves(df: pd.DataFrame, clean: pd.DataFrame) -> tuple[dict, dict]:
    curves: dict[str, dict[str, dict[str, float]]] = {}
    drops: dict[str, dict[str, dict[str, float]]] = {}
    for method, g in df.groupby("method", sort=True):
        corrupted = g[g["condition"] != "clean"]
        if not len(corrupted):
            continue
        clean_mean = float(clean[clean["method"] == method]["dice"].mean())
        curves[method] = {}
        for name, gc in corrupted.groupby("condition", sort=True):
            pts = {"0": clean_mean} | {str(s): float(r["dice"].mean()) for s, r in gc.groupby("severity")}
            curves[method][name] = dict(sorted(pts.items(), key=lambda kv: int(kv[0])))
        both = pd.concat([clean[clean["method"] == method], corrupted])
        drops[method] = {}
        for (name, sev), value in severity_drop(both, "dice", column="condition").items():
            drops[method].setdefault(name, {})[str(sev)] = value
    return curves, drops


def _cross_matrix(clean: pd.DataFrame) -> dict | None:
    if clean["dataset"].nunique() < 2:
        return None
    row_key = "train_dataset" if "train_dataset" in clean.columns else "method"
    table = clean.assign(**{row_key: clean[row_key].astype(str)}).pivot_table(
        index=row_key, columns="dataset", values="dice", aggfunc="mean"
    )
    return {
        "rows_are": row_key,
        "rows": list(map(str, table.index)),
        "columns": list(map(str, table.columns)),
        "dice": table.to_numpy(dtype=float).tolist(),
    }


# ----------------------------------------------------------------------------------------------- plots


def _save(fig: Figure, path: Path) -> str:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _plot_histogram(clean: pd.DataFrame, path: Path) -> str:
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    bins = np.linspace(0, 1, 21)
    for method, g in clean.groupby("method", sort=True):
        ax.hist(g["dice"].dropna(), bins=bins, alpha=0.5, label=f"{method} (n={g['dice'].notna().sum()})")
    ax.set(xlabel="Dice", ylabel="images", title="Dice per image (clean)", xlim=(0, 1))
    ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_severity(curves: dict, path: Path) -> str:
    names = sorted({n for per in curves.values() for n in per})
    ncols = min(4, len(names))
    nrows = -(-len(names) // ncols)
    fig = Figure(figsize=(3.2 * ncols, 2.6 * nrows))
    for i, name in enumerate(names):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for method, per in sorted(curves.items()):
            if name in per:
                xs = [int(s) for s in per[name]]
                ax.plot(xs, list(per[name].values()), marker="o", label=method)
        ax.set(title=name, xlabel="severity", ylabel="mean Dice", ylim=(0, 1.02))
        ax.set_xticks(range(0, 6))
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _plot_heatmap(clean: pd.DataFrame, matrix: dict | None, path: Path) -> str:
    if matrix is None:
        table = clean.pivot_table(index="method", columns="dataset", values="dice", aggfunc="mean")
        matrix = {
            "rows_are": "method",
            "rows": list(map(str, table.index)),
            "columns": list(map(str, table.columns)),
            "dice": table.to_numpy(dtype=float).tolist(),
        }
    values = np.array(matrix["dice"], dtype=float)
    fig = Figure(figsize=(1.4 * values.shape[1] + 2.5, 0.6 * values.shape[0] + 1.8))
    ax = fig.add_subplot()
    im = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(values.shape[1]), matrix["columns"], rotation=30, ha="right")
    ax.set_yticks(range(values.shape[0]), matrix["rows"])
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="white" if v < 0.6 else "black")
    ax.set(xlabel="evaluated on", ylabel=matrix["rows_are"], title="mean Dice (clean)")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


TITLE_CHARS = 24
"""Longest image id in a gallery title; longer ids keep their start and end around an ellipsis."""


def short_title(image_id: Any, dice: float, limit: int = TITLE_CHARS) -> str:
    """A gallery title: the id (its last path part, middle elided beyond ``limit`` characters) over its Dice, on
    two lines, so neighbouring titles never run into each other."""
    text = str(image_id).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or str(image_id)
    if len(text) > limit:
        head = (limit - 1) // 2
        text = text[:head] + "…" + text[len(text) - (limit - 1 - head):]
    return f"{text}\nDice {dice:.3f}"


def _plot_gallery(gallery: list[dict], path: Path) -> str:
    items = sorted(gallery, key=lambda g: float(g["dice"]))
    if len(items) > GALLERY_MAX:  # keep the worst and the best halves
        half = GALLERY_MAX // 2
        items = items[:half] + items[-half:]
    ncols = min(4, len(items))
    nrows = -(-len(items) // ncols)
    fig = Figure(figsize=(3.2 * ncols, 3.5 * nrows + 0.4), layout="constrained")
    for i, item in enumerate(items):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        image = np.asarray(item["image"])
        target = np.asarray(item["target"], dtype=bool)
        pred = np.asarray(item["pred"], dtype=bool)
        if target.shape != image.shape[:2] or pred.shape != image.shape[:2]:
            raise ValueError(
                f"gallery item {item.get('image_id')!r}: image {image.shape}, target {target.shape}"
                f" and pred {pred.shape} must share (H, W)"
            )
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        ax.imshow(np.ma.masked_where(~pred, pred), cmap="autumn", alpha=0.4, vmin=0, vmax=1)
        for mask, color in ((target, "lime"), (pred, "red")):
            if mask.any() and not mask.all():
                ax.contour(mask.astype(float), levels=[0.5], colors=color, linewidths=1)
        ax.set_title(short_title(item.get("image_id", i), float(item["dice"])), fontsize=8)
        ax.axis("off")
    fig.suptitle("worst → best (green: target, red: prediction)", fontsize=9)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------ HTML


def _plot_reliability(calibration: dict, path: Path) -> str:
    """Mean Dice against mean confidence per bin, raw predicted IoU and calibrated, on the evaluated split."""
    res = calibration[calibration["split"]]
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect")
    for key, label in (("reliability_raw", f"predicted IoU (ECE {res['ece_raw']:.3f})"),
                       ("reliability", f"calibrated (ECE {res['ece']:.3f})")):
        bins = res[key]
        ax.plot([b["confidence"] for b in bins], [b["dice"] for b in bins], marker="o", label=label)
    flag = res.get("flag_below", res["review_below"])
    ax.axvline(flag, color="red", lw=1, label=f"needs review < {flag:.2f}")
    ax.set(xlabel="confidence", ylabel="actual Dice", xlim=(0, 1), ylim=(0, 1),
           title=f"Reliability on {calibration['split']} (fit on {calibration['fit_split']})")
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def _flags_html(calibration: dict) -> list[str]:
    split = calibration["split"]
    rows = []
    for name in (calibration["fit_split"], split):
        r = calibration[name]
        rows.append({"split": name, "n": r["n"], "ECE raw": r["ece_raw"], "ECE calibrated": r["ece"],
                     "Spearman": r["spearman"], "flagged": r["flags"]["n_flagged"],
                     "failures": r["flags"]["n_failures"], "precision": r["flags"]["precision"],
                     "recall": r["flags"]["recall"]})
    table = pd.DataFrame(rows).to_html(index=False, border=0, classes="t", float_format="%.3f", na_rep="–")
    r = calibration[split]
    return [f"<h2>Failure flags (needs review: calibrated confidence &lt; {r.get('flag_below', r['review_below']):.2f}"
            f", chosen on {calibration['fit_split']} by cross-fitting; failure: Dice "
            f"&lt; {r['review_below']:.2f}; calibrated on {calibration['fit_split']}; input "
            f"{calibration.get('calibrator', {}).get('input', 'iou_pred')})</h2>", table]


def _fmt(stats: dict) -> str:
    if stats.get("mean") is None or not math.isfinite(stats["mean"]):
        return "–"
    if stats.get("ci_low") is None or not math.isfinite(stats["ci_low"]):
        return f"{stats['mean']:.3f}"
    return f"{stats['mean']:.3f} [{stats['ci_low']:.3f}, {stats['ci_high']:.3f}]"


def _stats_table(by_method: dict, metrics: list[str], index_name: str) -> str:
    rows = []
    for key, per_method in by_method.items():
        for method, stats in per_method.items():
            n = max((s["n"] for s in stats.values()), default=0)
            rows.append({index_name: key, "method": method, "n": n} | {m: _fmt(stats[m]) for m in metrics})
    return pd.DataFrame(rows).to_html(index=False, border=0, classes="t")


def _html(title: str, summary: dict, metrics: list[str], images: dict[str, str]) -> str:
    esc = html.escape
    parts = [
        f"<h1>{esc(title)}</h1>",
        f"<p>{summary['n_rows']} rows · {summary['n_images']} images · datasets: "
        f"{esc(', '.join(summary['datasets']))} · methods: {esc(', '.join(summary['methods']))}</p>",
    ]
    if summary.get("context"):
        ctx = pd.DataFrame(
            [(k, json.dumps(v, default=str)) for k, v in summary["context"].items()], columns=["key", "value"]
        )
        parts += ["<h2>Run</h2>", ctx.to_html(index=False, border=0, classes="t")]
    parts += [
        "<h2>Overall (clean, mean [95% bootstrap CI])</h2>",
        _stats_table({"all": summary["overall"]}, metrics, "scope"),
        "<h2>Per dataset</h2>",
        _stats_table(summary["by_dataset"], metrics, "dataset"),
        "<h2>Per modality</h2>",
        _stats_table(summary["by_modality"], metrics, "modality"),
    ]
    if summary["comparisons"]:
        comp = pd.DataFrame(
            [
                {"comparison": k} | {m: v[m] for m in ("n", "mean_diff", "ci_low", "ci_high", "p_improve")}
                for k, v in summary["comparisons"].items()
            ]
        )
        parts += [
            "<h2>Paired comparison (Dice, model − other)</h2>",
            comp.to_html(index=False, border=0, classes="t", float_format="%.4f"),
        ]
    if summary.get("calibration"):
        parts += _flags_html(summary["calibration"])
    for name, b64 in images.items():
        parts.append(f'<h2>{esc(name)}</h2><img alt="{esc(name)}" src="data:image/png;base64,{b64}">')
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1200px}"
        "table.t{border-collapse:collapse;font-size:13px}"
        "table.t td,table.t th{padding:3px 8px;border-bottom:1px solid #ddd}img{max-width:100%}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
    )


def write_report(
    results: pd.DataFrame,
    out_dir: Path | str,
    *,
    title: str,
    summary: dict | None = None,
    gallery: list[dict] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    calibration: dict | None = None,
) -> dict:
    """Write ``report.json``, ``report.html`` (plots embedded as base64) and the PNGs into ``out_dir``.

    Args:
        results: per-(image, condition) rows, columns as in the module docstring.
        out_dir: created if missing; existing report files are overwritten.
        title: report heading.
        summary: optional run context (run id, config hash, data version, ...) shown at the top and stored
            under ``"context"``; must be JSON-serialisable (other values are stringified).
        gallery: optional overlay items ``{image_id, image uint8 (H, W, 3), target bool (H, W),
            pred bool (H, W), dice}``; shown worst to best (at most 16: the 8 worst and 8 best).
        n_boot, seed: bootstrap settings for all CIs.
        calibration: optional failure-flag results (``calibration.json`` of
            :func:`medsam2.engine.evaluate.apply_flags`): a "Failure flags" table and a reliability plot.

    Returns:
        The JSON-serialisable summary written to ``report.json``: ``title, n_rows, n_images, datasets,
        methods, modalities, conditions, metrics, overall {method: {metric: {mean, ci_low, ci_high, n}}},
        by_dataset {dataset: {method: ...}}, by_modality, comparisons, severity_curves
        {method: {corruption: {severity: mean dice}}}, severity_drop, cross_dataset (or None), context,
        files {html, json, plots: {name: path}}``.
    """
    df = _prepare(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = [m for m in METRIC_NAMES if m in df.columns]
    clean = _clean_rows(df)
    if not len(clean):
        raise ValueError("results have no clean rows (condition 'clean' or severity 0) to summarise")
    curves, drops = _severity_curves(df, clean)
    cross = _cross_matrix(clean)
    report: dict[str, Any] = {
        "title": title,
        "n_rows": len(df),
        "n_images": int(df[["dataset", "image_id"]].drop_duplicates().shape[0]),
        "datasets": sorted(df["dataset"].unique()),
        "methods": sorted(df["method"].unique()),
        "modalities": sorted(df["modality"].unique()),
        "conditions": sorted(df["condition"].unique()),
        "metrics": metrics,
        "overall": {m: summarize(g, metrics, n_boot=n_boot, seed=seed) for m, g in clean.groupby("method")},
        "by_dataset": _stats_by(clean, "dataset", metrics, n_boot, seed),
        "by_modality": _stats_by(clean, "modality", metrics, n_boot, seed),
        "comparisons": _comparisons(clean, n_boot, seed),
        "severity_curves": curves,
        "severity_drop": drops,
        "cross_dataset": cross,
        "context": summary or {},
        "calibration": calibration,
    }
    report = _jsonable(json.loads(json.dumps(_jsonable(report), default=str)))

    plots: dict[str, Path] = {
        "Dice histogram": out / "dice_hist.png",
        "Datasets": out / "dataset_heatmap.png",
    }
    images = {
        "Dice histogram": _plot_histogram(clean, plots["Dice histogram"]),
        "Datasets": _plot_heatmap(clean, cross, plots["Datasets"]),
    }
    if curves:
        plots["Dice vs severity"] = out / "severity.png"
        images["Dice vs severity"] = _plot_severity(curves, plots["Dice vs severity"])
    if calibration:
        plots["Reliability"] = out / "reliability.png"
        images["Reliability"] = _plot_reliability(calibration, plots["Reliability"])
    if gallery:
        plots["Gallery"] = out / "gallery.png"
        images["Gallery"] = _plot_gallery(gallery, plots["Gallery"])

    html_path, json_path = out / "report.html", out / "report.json"
    report["files"] = {
        "html": str(html_path),
        "json": str(json_path),
        "plots": {name: str(p) for name, p in plots.items()},
    }
    html_path.write_text(_html(title, report, metrics, images), encoding="utf-8")
    json_path.write_text(json.dumps(report, indent=2, allow_nan=False), encoding="utf-8")
    return report
