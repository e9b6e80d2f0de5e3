"""``suggest-labels``: after a promotion, rank the unlabelled pool with the new champion and publish the labelling
queue (``medsam2 suggest``) as Prefect artifacts: a markdown summary with the queue's files and a table of the
images to label next. The ``after-promotion`` deployment runs it on every ``medsam2.model.promoted`` event
(emitted by the promotion task of ``train-medsam2`` and ``promote-model``). An empty pool is not a failure: the
run says there is nothing to label."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Annotated, Any

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from pydantic import Field

from flows.artifacts import publish
from flows.failures import reported
from flows.tasks import suggest_task
from medsam2.active.pool import EmptyPoolError
from medsam2.home import medsam2_home
from medsam2.services import check_mlflow


def queue_dir(model: str) -> Path:
    """``$MEDSAM2_HOME/queues/<model>-<time>``: one folder per run (a later queue never overwrites one being
    labelled)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", model.split("://")[-1].replace("models:/", "")).strip("_")
    return medsam2_home() / "queues" / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}-{str(flow_run.id or 'local')[:8]}"


@flow(name="suggest-labels", log_prints=True)
@reported
def suggest_labels(model: str = "models:/medsam2@champion", workdir: str = ".medsam2/work",
                   budget: Annotated[int, Field(ge=1)] = 20, score: str = "entropy",
                   out: str | None = None) -> dict[str, Any]:
    """Which unlabelled images to label next, ranked by the model; the queue is published as artifacts.

    Args:
        model: MLflow model URI (the promoted version) or checkpoint path.
        workdir: Data work dir whose unlabelled train images are ranked.
        budget: Images to queue (the whole pool when it is smaller).
        score: Acquisition score (medsam2.active.scores: entropy, pred_iou, tta_flip, kcenter, random).
        out: Queue folder; empty: $MEDSAM2_HOME/queues/<model>-<time>-<run>.
    """
    if model.lower().startswith(("models:", "runs:")):
        check_mlflow()
    dest = out or str(queue_dir(model))
    try:
        res = suggest_task(model, workdir, budget, dest, score)
    except EmptyPoolError as e:
        publish("suggest-labels", f"# Labelling queue of `{model}`\n- nothing to label: {e.message}", {"queued": 0})
        return {"n": 0, "pool": 0, "model": model, "out": None, "items": []}
    lines = [f"# Labelling queue of `{model}`",
             f"- {res['n']} of {res['pool']} unlabelled images, ranked by `{score}`",
             f"- Folder: `{res['out']}` (queue.csv; labelstudio.json to import into Label Studio with "
             "labelstudio_config.xml; overlays/)",
             f"- When labelled: `medsam2 ingest EXPORT.json --workdir {workdir}` (or a folder of masks with --labels)"]
    publish("suggest-labels", "\n".join(lines), {"queued": res["n"], "pool": res["pool"]})
    create_table_artifact(res["items"] or [{"rank": None, "image_id": "(none)", "score": None}],
                          key="suggest-labels-queue", description=f"images to label next ({score})")
    return res
