"""Prefect artifacts of the flows: each run publishes a markdown summary (with links to its MLflow run and
model version where it has them) and a table of its metrics. Only string formatting here: the MLflow lookups
are ``medsam2.tracking``'s."""

from __future__ import annotations

import math
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from medsam2 import tracking


def run_link(run_id: str | None) -> str:
    """Markdown link to an MLflow run in the UI when tracking goes to a server, else the bare run id."""
    if not run_id:
        return "—"
    try:
        url = tracking.run_url(run_id)
    except Exception:  # a run the store cannot return (deleted, other store): still name it
        url = None
    return f"[{run_id}]({url})" if url else f"`{run_id}`"


def model_version_url(name: str, version: int | str) -> str | None:
    uri = tracking.tracking_uri()
    return f"{uri.rstrip('/')}/#/models/{name}/versions/{version}" if uri.startswith("http") else None


def model_version_link(name: str, version: int | str | None) -> str:
    if version is None:
        return "—"
    url = model_version_url(name, version)
    return f"[{name} v{version}]({url})" if url else f"`models:/{name}/{version}`"


def metric_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """``{name: number}`` → table rows (NaN as empty; non-numbers left out)."""
    rows = []
    for k, v in sorted(metrics.items()):
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        rows.append({"metric": k, "value": None if isinstance(v, float) and math.isnan(v) else round(v, 5)})
    return rows or [{"metric": "(none)", "value": None}]


def publish(key: str, markdown: str, metrics: dict[str, Any]) -> None:
    """``{key}-summary`` (markdown) and ``{key}-metrics`` (table) artifacts of the current flow run."""
    create_markdown_artifact(markdown, key=f"{key}-summary")
    create_table_artifact(metric_rows(metrics), key=f"{key}-metrics")


def gate_lines(promotion: dict[str, Any]) -> list[str]:
    """The promotion gate's decision, its one-line summary (which baseline or champion, by what margin), the
    reasons, the selection split it decided on, and the registered version (``tracking.promote``'s result)."""
    decision = "promoted" if promotion["promoted"] else "not promoted (rejected, stays challenger)"
    sel = promotion.get("selection") or {}
    test = promotion.get("test_metrics") or {}
    lines = [
        f"- Model version: {model_version_link(promotion['model_name'], promotion['version'])} "
        f"(alias **{promotion['alias']}**; previous champion "
        f"{model_version_link(promotion['model_name'], promotion.get('previous_champion'))})",
        f"- Gate decision: **{decision}**" + (f" — {promotion['summary']}" if promotion.get("summary") else ""),
    ]
    if sel:
        lines.append(f"- Decided on the `{sel.get('split')}` split: {sel.get('n_images')} images, images+masks "
                     f"`{sel.get('identity')}`, champion results {sel.get('champion_results')}")
    if "test_dice" in test:
        lines.append(f"- Frozen test split (reported, not decided on): Dice {test['test_dice']:.4f}")
    return [*lines, "- Gate reasons:", *(f"  - {r}" for r in promotion.get("reasons") or ["(none given)"])]


def gate_metrics(promotion: dict[str, Any]) -> dict[str, Any]:
    stats = {f"gate_{k}": v for k, v in (promotion.get("stats") or {}).items()}
    return {"gate_promoted": int(bool(promotion["promoted"])), "model_version": promotion["version"], **stats}
