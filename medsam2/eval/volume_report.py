"""3-D evaluation report: ``volumes.json`` and ``volumes.html`` (means with bootstrap CIs per method, paired
differences of SAM2-memory propagation against each baseline, the per-volume table, a strip of slices per
volume with the target and the memory prediction).

Input: one row per (volume, method) with columns ``volume, method, dice, hd95, nsd`` (more columns are shown
in the per-volume table), as :func:`medsam2.engine.volume_eval.evaluate_volumes` writes them.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from medsam2.eval.report import _fmt, _jsonable, _save
from medsam2.eval.stats import paired_bootstrap
from medsam2.metrics import VOLUME_METRIC_NAMES, summarize

REFERENCE = "memory"


def _paired(df: pd.DataFrame, n_boot: int, seed: int) -> dict[str, dict[str, Any]]:
    """Paired bootstrap of each metric, ``memory`` − every other method, over the volumes both have."""
    out: dict[str, dict[str, Any]] = {}
    if REFERENCE not in set(df["method"]):
        return out
    wide = {m: df.pivot_table(index="volume", columns="method", values=m) for m in VOLUME_METRIC_NAMES}
    for other in sorted(set(df["method"]) - {REFERENCE}):
        for metric, table in wide.items():
            pair = table[[other, REFERENCE]].dropna()
            if len(pair):
                res = paired_bootstrap(pair[other].to_numpy(), pair[REFERENCE].to_numpy(), n_boot=n_boot, seed=seed)
                out.setdefault(f"{REFERENCE}_vs_{other}", {})[metric] = res
    return out


def _plot_strips(strips: list[dict[str, Any]], path: Path) -> str:
    """One row per volume: its strip of slices, target in green, memory prediction in red (key slice marked)."""
    ncols = max(len(s["slices"]) for s in strips)
    fig = Figure(figsize=(2.0 * ncols, 2.3 * len(strips) + 0.4), layout="constrained")
    for r, s in enumerate(strips):
        for c, z in enumerate(s["slices"]):
            ax = fig.add_subplot(len(strips), ncols, r * ncols + c + 1)
            ax.imshow(np.asarray(s["images"][c]))
            for mask, color in ((np.asarray(s["target"][c], bool), "lime"), (np.asarray(s["pred"][c], bool), "red")):
                if mask.any() and not mask.all():
                    ax.contour(mask.astype(float), levels=[0.5], colors=color, linewidths=0.8)
            key = " (key)" if z == s["key_slice"] else ""
            ax.set_title(f"{s['volume'][:18]} z={z}{key}" if c == 0 else f"z={z}{key}", fontsize=7)
            ax.axis("off")
    fig.suptitle("SAM2 memory from the key slice's prompt (green: target, red: prediction)", fontsize=9)
    return _save(fig, path)


def _html(title: str, report: dict[str, Any], per_volume: pd.DataFrame, strip_b64: str | None) -> str:
    esc = html.escape
    ctx = pd.DataFrame([(k, json.dumps(v, default=str)) for k, v in report["context"].items()],
                       columns=["key", "value"])
    overall = pd.DataFrame([{"method": m, "n": max(st["n"] for st in stats.values())}
                            | {k: _fmt(stats[k]) for k in VOLUME_METRIC_NAMES}
                            for m, stats in report["overall"].items()])
    comp = pd.DataFrame([{"comparison": k, "metric": metric} | {f: v[f] for f in ("n", "mean_diff", "ci_low",
                                                                                   "ci_high", "p_improve")}
                         for k, per in report["comparisons"].items() for metric, v in per.items()])
    parts = [f"<h1>{esc(title)}</h1>", "<h2>Run</h2>", ctx.to_html(index=False, border=0, classes="t"),
             f"<h2>Per volume, mean [95% bootstrap CI] over {report['n_volumes']} volumes "
             "(HD95 in mm; NSD at the tolerance above)</h2>", overall.to_html(index=False, border=0, classes="t")]
    if len(comp):
        parts += ["<h2>Paired differences (memory − other; HD95: lower is better)</h2>",
                  comp.to_html(index=False, border=0, classes="t", float_format="%.4f")]
    parts += ["<h2>Volumes</h2>", per_volume.to_html(index=False, border=0, classes="t", float_format="%.4f")]
    if strip_b64:
        parts.append(f'<h2>Slices</h2><img alt="slices" src="data:image/png;base64,{strip_b64}">')
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table.t{border-collapse:collapse;"
             "font-size:13px}table.t td,table.t th{padding:3px 8px;border-bottom:1px solid #ddd}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>\n")


def write_volume_report(per_volume: pd.DataFrame, strips: list[dict[str, Any]], out_dir: Path, *, title: str,
                        context: dict[str, Any] | None = None, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Write ``volumes.json``, ``volumes.html`` and ``volume_strips.png`` into ``out_dir``.

    ``strips``: per volume ``{volume, slices: [z…], images (n,H,W,3) uint8, target (n,H,W) bool, pred (n,H,W)
    bool, key_slice}``. Returns the JSON summary: ``title, n_volumes, methods, overall {method: {metric: {mean,
    ci_low, ci_high, n}}}, comparisons {memory_vs_X: {metric: paired bootstrap}}, context, files``.
    """
    if not len(per_volume):
        raise ValueError("no volumes to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "title": title, "n_volumes": int(per_volume["volume"].nunique()),
        "methods": sorted(per_volume["method"].unique()),
        "overall": {m: summarize(g, VOLUME_METRIC_NAMES, n_boot=n_boot, seed=seed)
                    for m, g in per_volume.groupby("method")},
        "comparisons": _paired(per_volume, n_boot, seed), "context": context or {},
    }
    report = _jsonable(json.loads(json.dumps(_jsonable(report), default=str)))
    strip_png = out / "volume_strips.png"
    b64 = _plot_strips(strips, strip_png) if strips else None
    html_path, json_path = out / "volumes.html", out / "volumes.json"
    report["files"] = {"html": str(html_path), "json": str(json_path), "strips": str(strip_png) if b64 else None}
    html_path.write_text(_html(title, report, per_volume, b64), encoding="utf-8")
    json_path.write_text(json.dumps(report, indent=2, allow_nan=False), encoding="utf-8")
    return report
