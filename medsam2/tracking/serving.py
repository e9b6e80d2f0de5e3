"""The served model: the MLflow pyfunc (typed records in, encoded masks out), its signature and requirements.

``mlflow models serve -m models:/medsam2@champion --env-manager local`` serves :class:`MedSAM2PyFunc`. A request
is ``{"inputs": [{"image": <base64 PNG/JPEG/TIFF/DICOM>, "box": [x0, y0, x1, y1]}, …], "params": {"format":
"png" | "rle"}}``; the records, their limits and encodings are :mod:`medsam2.engine.serve`. A request the server
refuses answers its own HTTP status (413, 422, 403) with one sentence, ``{"error_code": …, "message": "record 0:
box required for a box-prompted model …"}``, and no traceback; an unexpected failure answers 500 with a generic
sentence, its traceback going to the server's log only.
"""

from __future__ import annotations

import base64
import io
import logging
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from medsam2.engine.serve import RequestError, ServeLimits, ServeRecord, ServeResult, serve

log = logging.getLogger(__name__)


class RequestRejected(MlflowException):
    """A refused request as MLflow's scoring server returns it: our status and our one sentence.

    The server rewrites the message of any ``MlflowException`` from ``predict`` as "Failed to predict data
    '<the whole input>'. Error: …" (``mlflow.pyfunc.scoring_server.invocations``), which would echo the request's
    images back and bury the sentence; the message is therefore set once, here, and later assignments are
    ignored. ``get_http_status_code`` answers the status the check chose (MLflow maps its error codes to 400/500
    only)."""

    def __init__(self, status: int, message: str) -> None:
        self._status = status
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):
            self._message = value

    def get_http_status_code(self) -> int:
        return self._status


class MedSAM2PyFunc(mlflow.pyfunc.PythonModel):
    """Serve a checkpoint. ``predict`` takes a list of :class:`~medsam2.engine.serve.ServeRecord` (or dicts of
    its fields) and returns one :class:`~medsam2.engine.serve.ServeResult` per record, the mask at the image's
    own size. Its type hints are the model's signature (the MLflow UI shows the schema)."""

    def load_context(self, context) -> None:
        from medsam2.engine.checkpoint import load_model

        # the base weights logged with the model (sha256-checked), not the training machine's file
        self.model, self.cfg = load_model(context.artifacts["checkpoint"],
                                          base_weights=context.artifacts.get("base_weights"))
        self.limits = ServeLimits.from_env()

    def predict(self, context: Any, model_input: list[ServeRecord], params: dict[str, Any] | None = None
                ) -> list[ServeResult]:
        try:
            return serve(self.model, self.cfg.model.prompt, model_input, params, self.limits)
        except RequestError as e:
            raise RequestRejected(e.status, e.message) from None
        except Exception:  # noqa: BLE001 (the client gets one sentence; the traceback stays in the server log)
            log.exception("medsam2 serving: prediction failed")
            raise RequestRejected(500, "the model failed on this request; the server's log has the details"
                                  ) from None


SERVING_EXCLUDE = {"prefect", "ray", "optuna", "great-expectations", "typer", "rich", "mlflow"}
"""Dependencies of the medsam2 package that serving a model does not need (orchestration, CLI; mlflow adds
itself)."""


def serving_requirements() -> list[str]:
    """pip requirements of a logged model: medsam2's own pinned dependencies minus :data:`SERVING_EXCLUDE`.
    medsam2 itself travels as code (``code_paths``), it is not on PyPI."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    try:
        reqs = [Requirement(r) for r in requires("medsam2") or []]
    except PackageNotFoundError:  # running from a model's code copy: the essentials
        import torch

        return [f"torch=={torch.__version__.split('+')[0]}", "sam2==1.1.0", "pycocotools==2.0.11"]
    return [str(r) for r in reqs if r.marker is None and r.name.lower() not in SERVING_EXCLUDE]


def input_example(prompt: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A request for the model's signature and the UI: one 32×32 grey PNG with the prompt the model needs, and
    the ``format`` parameter (MLflow derives the params schema from it)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(buf, format="PNG")
    record: dict[str, Any] = {"image": base64.b64encode(buf.getvalue()).decode("ascii")}
    if prompt == "box":
        record["box"] = [4.0, 4.0, 28.0, 28.0]
    elif prompt == "points":
        record.update(points=[[16.0, 16.0]], point_labels=[1])
    return [record], {"format": "png"}


def log_model(checkpoint: str | Path, model_card: str | None = None) -> str:
    """Log the checkpoint as an MLflow pyfunc model in the active run; returns its model URI.

    Self-contained: the medsam2 package goes with it as code, and a checkpoint that holds only its trainable
    tensors gets the base-weights file it was trained on as the ``base_weights`` artifact (sha256-checked here
    and again when the model loads), so ``models:/…`` loads where the training machine's files are not. The
    signature comes from ``predict``'s type hints plus an input example in the model's prompt mode (MLflow runs
    the model on it once, so a model that cannot serve fails to log visibly).
    """
    import medsam2
    from medsam2.engine.checkpoint import base_weights_file, checkpoint_meta

    artifacts = {"checkpoint": str(checkpoint)}
    base = base_weights_file(checkpoint)
    if base is not None:
        artifacts["base_weights"] = str(base)
    prompt = checkpoint_meta(checkpoint)["config"]["model"]["prompt"]
    info = mlflow.pyfunc.log_model(
        name="model", python_model=MedSAM2PyFunc(), artifacts=artifacts, input_example=input_example(prompt),
        code_paths=[str(Path(medsam2.__file__).resolve().parent)], pip_requirements=serving_requirements(),
    )
    if info.signature is None or info.signature.params is None:
        log.warning("the logged model has no complete signature (the input example failed); see the log above")
    if model_card:
        mlflow.log_text(model_card, "model/MODEL_CARD.md")
    return info.model_uri
