"""Where weights come from: ``model.checkpoint`` → a local file. A local path, ``s3://bucket/key``,
``https://…``, a release name such as ``sam2.1_hiera_tiny`` (Meta's URL, cached under
``$MEDSAM2_WEIGHTS_CACHE`` or ``$MEDSAM2_HOME/weights``), or an MLflow model (``models:/name@alias``, ``runs:/…``,
fetched by ``tracking.artifacts``). Loading the file into a model is ``engine.checkpoint.build_sam2``'s job."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medsam2.home import medsam2_home
from medsam2.model.backbone import release_url
from medsam2.tracking.artifacts import download_model_checkpoint, downloaded_model


def _cache_dir() -> Path:
    home = medsam2_home()
    return Path(os.environ.get("MEDSAM2_WEIGHTS_CACHE", home / "weights"))


def _download(url: str, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 (https release URLs only)
                shutil.copyfileobj(resp, tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        except Exception:
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, dest)
    return dest


def resolve_checkpoint(source: str) -> Path | None:
    """Turn ``model.checkpoint`` into a local file (downloading / fetching into the weights cache if needed).

    Returns None for ``none``. Raises ``FileNotFoundError`` with the source named when it cannot be had
    (e.g. offline and not cached).
    """
    if source in ("none", "", None):
        return None
    url = release_url(source)
    if url is not None:
        dest = _cache_dir() / f"{source}.pt"
        if dest.exists():
            return dest
        try:
            return _download(url, dest)
        except OSError as exc:
            raise FileNotFoundError(
                f"release {source!r} is not cached at {dest} and could not be downloaded from {url}: {exc}. "
                "Copy the file there, or pass a local path."
            ) from exc
    if source.startswith(("https://", "http://")):
        dest = _cache_dir() / hashlib.sha256(source.encode()).hexdigest()[:16] / Path(source).name
        return dest if dest.exists() else _download(source, dest)
    if source.startswith("s3://"):
        import boto3

        bucket, _, key = source[5:].partition("/")
        dest = _cache_dir() / "s3" / bucket / key
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            endpoint = os.environ.get("MEDSAM2_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
            boto3.client("s3", endpoint_url=endpoint).download_file(bucket, key, str(dest))
        return dest
    if source.startswith(("models:/", "runs:/")):
        return download_model_checkpoint(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {source!r} does not exist")
    return path


@contextmanager
def local_weights(source: str) -> Iterator[tuple[Path, Path | None]]:
    """``model.checkpoint`` (not ``none``) → (local file, base-weights file of that model or None) while the
    ``with`` lasts. Only an MLflow model has the second, the base weights logged with it (``tracking.log_model``);
    its download is removed afterwards."""
    if source.startswith(("models:/", "runs:/")):
        with downloaded_model(source) as files:
            yield files["checkpoint"], files.get("base_weights")
    else:
        yield resolve_checkpoint(source), None
