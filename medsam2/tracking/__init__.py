"""MLflow: runs, params, metrics, artifacts, the pyfunc model, registry aliases and the promotion gate.

The only package of the library that imports mlflow. Tracking URI: ``tracking.tracking_uri`` in the config,
else ``MLFLOW_TRACKING_URI``, else a SQLite store under ``$MEDSAM2_HOME`` (default ``.medsam2/``).
Registry: model name ``medsam2``; aliases ``champion`` (serving), ``challenger`` (last candidate),
``previous`` (the champion before the current one; ``rollback`` restores it). Stages are never used.

One module per job, all re-exported here (callers write ``tracking.promote``, ``tracking.active_run``):

- ``artifacts``: the store's URI and fetching a logged or registered model's files (what the engine needs);
- ``runs``: experiments, runs, params, metrics, evaluation artifacts and the training callbacks;
- ``registry``: model versions, aliases, the gate's inputs and decisions, rollback;
- ``serving``: the served pyfunc model; ``exports``: ONNX exports logged beside a model version.
"""

from medsam2.tracking.artifacts import (
    download_model_checkpoint,
    download_model_files,
    downloaded_model,
    tracking_uri,
)
from medsam2.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    REPORTED_TEST_METRICS,
    SELECTION_ARTIFACT,
    alias_version,
    champion_summary,
    last_challenger,
    log_selection_results,
    per_image_results,
    promote,
    registered_version,
    rollback,
)
from medsam2.tracking.runs import (
    ChildRunCallback,
    MlflowCallback,
    _client,
    active_run,
    end_run,
    git_commit,
    log_config,
    log_dataset,
    log_evaluation,
    log_run_results,
    log_volume_evaluation,
    run_tags,
    run_url,
    set_tags,
    setup,
    start_parent_run,
    write_json,
)
from medsam2.tracking.serving import SERVING_EXCLUDE, MedSAM2PyFunc, log_model, serving_requirements

__all__ = [
    "CHALLENGER", "CHAMPION", "PREVIOUS", "REPORTED_TEST_METRICS", "SELECTION_ARTIFACT", "SERVING_EXCLUDE",
    "ChildRunCallback", "MedSAM2PyFunc", "MlflowCallback", "_client", "active_run", "alias_version",
    "champion_summary", "download_model_checkpoint", "download_model_files", "downloaded_model", "end_run",
    "git_commit", "last_challenger", "log_config", "log_dataset", "log_evaluation", "log_model",
    "log_run_results", "log_selection_results", "log_volume_evaluation", "per_image_results", "promote",
    "registered_version", "rollback", "run_tags", "run_url", "serving_requirements", "set_tags", "setup",
    "start_parent_run", "tracking_uri", "write_json",
]
