"""The MLflow store's address and fetching a logged or registered model's files: the part of ``tracking`` that
the engine needs to load weights from ``models:/…`` and ``runs:/…`` (a lower layer than the rest of ``tracking``,
which logs runs and gates the registry and imports the engine)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow

from medsam2.config import ExperimentCfg
from medsam2.home import medsam2_home


def tracking_uri(cfg: ExperimentCfg | None = None) -> str:
    if cfg is not None and cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    home = medsam2_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def download_model_files(uri: str, dest: str | Path | None = None) -> dict[str, Path]:
    """``models:/medsam2@champion`` / ``runs:/<id>/model`` / ``models:/m-…`` → local files (under ``dest``, else a
    new temporary folder) by artifact name: ``checkpoint`` and, for a checkpoint that needs one, ``base_weights``."""
    import yaml

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_registry_uri(tracking_uri())
    dest = dest or tempfile.mkdtemp(prefix="medsam2-model-")
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    if local.is_file():
        return {"checkpoint": local}
    for mlmodel in sorted(local.rglob("MLmodel")):
        flavor = (yaml.safe_load(mlmodel.read_text()).get("flavors") or {}).get("python_function") or {}
        files = {name: mlmodel.parent / a["path"] for name, a in (flavor.get("artifacts") or {}).items()}
        if "checkpoint" in files:
            return files
    found = sorted(local.rglob("*.pt"))
    if not found:
        raise FileNotFoundError(f"no checkpoint inside model {uri}")
    return {"checkpoint": found[0]}


def download_model_checkpoint(uri: str) -> Path:
    """The checkpoint file of an MLflow model (see :func:`download_model_files`); the caller owns its folder."""
    return download_model_files(uri)["checkpoint"]


@contextmanager
def downloaded_model(uri: str) -> Iterator[dict[str, Path]]:
    """:func:`download_model_files` into a temporary folder that is removed when the ``with`` ends (a model with
    its base weights is hundreds of MB: every evaluation would otherwise leave a copy behind)."""
    dest = tempfile.mkdtemp(prefix="medsam2-model-")
    try:
        yield download_model_files(uri, dest)
    finally:
        shutil.rmtree(dest, ignore_errors=True)
