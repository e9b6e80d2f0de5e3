"""ONNX exports beside the registered model: logged into the run that produced the model version, and found
again from the model URI (``medsam2 predict --model models:/medsam2@champion --engine onnx``).

An export of version V of model M is logged as the artifacts ``onnx/v<V>`` of the version's run, and the version
gets the tag ``onnx_export`` (the artifact URI) and ``onnx_export_quantized`` (``int8`` or ``none``). For a
``runs:/RUN/…`` model the export goes to ``onnx/`` of that run, with the run tag ``onnx_export``.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from medsam2.errors import InputDataError
from medsam2.tracking.artifacts import tracking_uri

_MODELS = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")
_RUNS = re.compile(r"^runs:/(?P<run>[0-9a-f]+)(?:/.*)?$")
TAG = "onnx_export"


def _client() -> MlflowClient:
    uri = tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _target(model_uri: str) -> dict[str, Any]:
    """Where an export of ``model_uri`` lives: ``{"run_id", "artifact_path", "name"?, "version"?}``."""
    if m := _RUNS.match(model_uri):
        return {"run_id": m["run"], "artifact_path": "onnx"}
    m = _MODELS.match(model_uri)
    if m is None:
        raise InputDataError(f"{model_uri!r} is not a registered model or run URI, so an ONNX export cannot be "
                             "logged beside it", "use models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN/model")
    client = _client()
    try:
        mv = (client.get_model_version(m["name"], m["version"]) if m["version"]
              else client.get_model_version_by_alias(m["name"], m["alias"]))
    except MlflowException:
        raise InputDataError(f"model {model_uri} is not in the registry",
                             "list versions with: medsam2 champion --json") from None
    return {"run_id": mv.run_id, "artifact_path": f"onnx/v{mv.version}", "name": mv.name,
            "version": str(mv.version), "tags": dict(mv.tags or {})}


def log_onnx_export(model_uri: str, export_dir: str | Path, quantized: bool) -> dict[str, Any]:
    """Log ``export_dir`` beside ``model_uri``'s model; returns ``{"run_id", "artifact_uri", "model_version"?}``."""
    t = _target(model_uri)
    client = _client()
    client.log_artifacts(t["run_id"], str(export_dir), t["artifact_path"])
    uri = f"runs:/{t['run_id']}/{t['artifact_path']}"
    if "version" in t:
        client.set_model_version_tag(t["name"], t["version"], TAG, uri)
        client.set_model_version_tag(t["name"], t["version"], f"{TAG}_quantized", "int8" if quantized else "none")
    else:
        client.set_tag(t["run_id"], TAG, uri)
    out = {"run_id": t["run_id"], "artifact_uri": uri}
    if "version" in t:
        out["model_version"] = f"models:/{t['name']}/{t['version']}"
    return out


def download_onnx_export(model_uri: str, dest: str | Path | None = None) -> Path:
    """The local copy of the ONNX export logged for ``model_uri`` (into ``dest``, else a new temp folder)."""
    t = _target(model_uri)
    uri = t.get("tags", {}).get(TAG) if "version" in t else _client().get_run(t["run_id"]).data.tags.get(TAG)
    if not uri:
        raise InputDataError(f"no ONNX export is logged for {model_uri}",
                             f"export it first: medsam2 export --model {model_uri} --format onnx --out DIR")
    dest = Path(dest or tempfile.mkdtemp(prefix="medsam2-onnx-"))
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest),
                                                    tracking_uri=tracking_uri())
    except (MlflowException, OSError) as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise InputDataError(f"the ONNX export of {model_uri} ({uri}) could not be downloaded: {e}",
                             f"re-export it: medsam2 export --model {model_uri} --format onnx --out DIR") from None
    return Path(local)


def resolved_version(model_uri: str) -> str:
    """``models:/NAME@ALIAS`` → ``models:/NAME/VERSION`` (what an export records as its source); other URIs
    unchanged."""
    m = _MODELS.match(model_uri)
    if m is None or m["version"]:
        return model_uri
    t = _target(model_uri)
    return f"models:/{t['name']}/{t['version']}"
