"""Reachability checks of the services a command needs, made *before* the work starts.

MLflow's, boto3's and Prefect's clients retry a refused connection for minutes before they fail. A command that
needs one of them first opens a TCP connection to it with a short timeout (:data:`TIMEOUT_S`, at most 3 s;
``MEDSAM2_SERVICE_TIMEOUT_S`` overrides it) and raises :class:`~medsam2.errors.ServiceUnavailable` naming the
URI and how to start it. Only network URIs are checked: a local MLflow store (``sqlite:``, ``file:``, a path) or
an in-process Ray needs no server. Nothing here imports mlflow, boto3, prefect or ray.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from medsam2.errors import ServiceUnavailable

TIMEOUT_S = 3.0
START_HINT = "start the local services with `make up` (infra/compose.yaml), or point {var} at a running server"


def _timeout() -> float:
    try:
        return min(float(os.environ.get("MEDSAM2_SERVICE_TIMEOUT_S", TIMEOUT_S)), TIMEOUT_S)
    except ValueError:
        return TIMEOUT_S


def host_port(uri: str, default_port: int | None = None) -> tuple[str, int] | None:
    """``http(s)://host[:port]/…``, ``ray://host:port`` or ``host:port`` → (host, port); None for anything that
    is not a network address (``sqlite:///…``, ``file:``, a path, ``auto``)."""
    uri = uri.strip()
    if "://" not in uri:
        host, sep, port = uri.rpartition(":")
        return (host, int(port)) if sep and host and port.isdigit() else None
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https", "ray", "tcp", "grpc") or not parts.hostname:
        return None
    port = parts.port or default_port or (443 if parts.scheme == "https" else 80)
    return parts.hostname, port


def check_reachable(name: str, uri: str, *, var: str, default_port: int | None = None) -> None:
    """Raise :class:`ServiceUnavailable` unless a TCP connection to ``uri`` opens within the timeout.

    Args:
        name: what the service is, for the message (``MLflow tracking server``).
        uri: its URI; non-network URIs are not checked.
        var: the setting that names the URI (for the hint), e.g. ``MLFLOW_TRACKING_URI``.
        default_port: port when the URI gives none and its scheme implies none.
    """
    addr = host_port(uri, default_port)
    if addr is None:
        return
    timeout = _timeout()
    try:
        with socket.create_connection(addr, timeout=timeout):
            return
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise ServiceUnavailable(
            f"{name} at {uri} is not reachable ({why}, {timeout:g} s)", START_HINT.format(var=var)
        ) from None


def mlflow_uri(configured: str | None = None) -> str | None:
    """The tracking URI a command will use: the config's ``tracking.tracking_uri``, else
    ``MLFLOW_TRACKING_URI``, else None (the local SQLite store, which needs no server)."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or None


def check_mlflow(configured: str | None = None) -> None:
    """Check the MLflow tracking server when the tracking URI is ``http(s)://``."""
    uri = mlflow_uri(configured)
    if uri:
        check_reachable("MLflow tracking server", uri, var="MLFLOW_TRACKING_URI (or tracking.tracking_uri)")


def check_prefect(api_url: str | None = None) -> None:
    """Check the Prefect API (``PREFECT_API_URL``, e.g. ``http://127.0.0.1:4200/api``) when one is set; without
    one Prefect runs an ephemeral in-process server, which needs no check."""
    uri = api_url or os.environ.get("PREFECT_API_URL")
    if uri:
        check_reachable("Prefect API", uri, var="PREFECT_API_URL")


def check_s3(endpoint_url: str | None = None) -> None:
    """Check an explicit S3 endpoint (MinIO, moto): the argument, else ``MEDSAM2_S3_ENDPOINT_URL``, else
    ``AWS_ENDPOINT_URL``. AWS itself (no endpoint) is not checked."""
    uri = endpoint_url or os.environ.get("MEDSAM2_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    if uri:
        check_reachable("S3 endpoint", uri, var="--s3-endpoint-url (or MEDSAM2_S3_ENDPOINT_URL)")


def check_ray(address: str | None = None) -> None:
    """Check a remote Ray cluster (``ray://host:10001`` or ``host:6379``); ``auto``/``local``/None are not
    checked (Ray starts or finds a local instance itself)."""
    addr = address or os.environ.get("RAY_ADDRESS")
    if addr and addr not in ("auto", "local"):
        check_reachable("Ray cluster", addr, var="--address (or RAY_ADDRESS)", default_port=10001)
