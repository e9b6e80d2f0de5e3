"""Ray plumbing shared by sweeps (``tuning.sweep``) and distributed training (``tuning.distributed``).

- :func:`init_ray` starts a local Ray or joins a cluster (``address`` or ``RAY_ADDRESS``), shipping the driver's
  ``MEDSAM2_*``/``MLFLOW_*``/``AWS_*`` settings (never secrets) to every worker;
- :func:`portable_config` makes a config mean the same thing in every worker process (absolute paths, a concrete
  tracking URI);
- :func:`storage_root` is where Ray keeps results and checkpoints;
- :func:`stage_last` / :func:`restore_last` carry a run's ``last.pt`` through a Ray checkpoint, so a worker
  restarted on another node resumes where the run was.

Ray 2.60 turns token auth on by default: a local ``ray.init`` makes/uses ``~/.ray/auth_token`` unless
``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN`` say otherwise; to join a cluster the driver needs the cluster's token in
``RAY_AUTH_TOKEN`` (or ``RAY_AUTH_TOKEN_PATH``) — see ``infra/README.md``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray

from medsam2 import tracking
from medsam2.config import ExperimentCfg, with_overrides
from medsam2.engine.checkpoint import LAST
from medsam2.home import medsam2_home

STORAGE_ENV = "MEDSAM2_TUNE_STORAGE"
"""Default Ray storage (sweeps and distributed runs): a path all nodes see, or ``s3://bucket/prefix``.
Unset: ``$MEDSAM2_HOME/ray_results``."""
FORWARDED_ENV_PREFIXES = ("MEDSAM2_", "MLFLOW_", "AWS_")
"""Driver env vars shipped to every worker (S3 endpoint, tracking settings, test hooks) via ``runtime_env``."""
SECRET_ENV = re.compile(r"SECRET|PASSWORD|TOKEN|_KEY|SALT")
"""Never shipped: ``runtime_env`` is visible in the Ray dashboard. Local workers inherit the driver's env;
cluster nodes get secrets from their own environment (compose ``.env``, Kubernetes secrets)."""


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def storage_root(storage_path: str | None = None) -> str:
    """``storage_path``, else ``$MEDSAM2_TUNE_STORAGE``, else ``$MEDSAM2_HOME/ray_results``; a local path made
    absolute (``file://`` dropped), a URI as it is."""
    storage = storage_path or os.environ.get(STORAGE_ENV) or str(medsam2_home() / "ray_results")
    storage = storage.removeprefix("file://")
    return str(Path(storage).resolve()) if "://" not in storage else storage


def portable_config(cfg: ExperimentCfg) -> ExperimentCfg:
    """Local paths made absolute and the tracking URI made concrete, so ``cfg`` means the same thing in every
    worker process."""
    data, model = {}, {}
    if "://" not in cfg.data.workdir:
        data["workdir"] = str(Path(cfg.data.workdir).resolve())
    if cfg.data.source and "://" not in cfg.data.source:
        data["source"] = str(Path(cfg.data.source).resolve())
    if Path(cfg.model.checkpoint).exists():
        model["checkpoint"] = str(Path(cfg.model.checkpoint).resolve())
    return with_overrides(cfg, data=data, model=model, tracking={"tracking_uri": tracking.tracking_uri(cfg)})


def runtime_env(local: bool) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) and not SECRET_ENV.search(k)}
    if local:  # same machine: pin the home dir (relative by default) and make the checkout importable
        env["MEDSAM2_HOME"] = str(medsam2_home())
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {"env_vars": env}


def _refresh_ray_auth() -> None:
    """Ray reads ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN`` once, when it is imported; re-read them so values set
    later in a long-lived process (a test session, a notebook, a Prefect worker) are the ones used."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # pragma: no cover - private API moved: Ray's import-time reading still applies
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def init_ray(address: str | None, num_cpus: int | None, quiet: bool) -> bool:
    """Start or join Ray; returns True when this call started it (and so must shut it down)."""
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_AUTH_MODE") or os.environ.get("RAY_AUTH_TOKEN"):
        _refresh_ray_auth()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, runtime_env=runtime_env(local=False), log_to_driver=not quiet)
    else:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env=runtime_env(local=True),
            log_to_driver=not quiet,
        )
    return True


@contextlib.contextmanager
def stage_last(last_pt: Path, extra: dict[str, str] | None = None) -> Iterator[str]:
    """A temporary dir beside ``last_pt`` holding it (a hard link: free; a copy across file systems) and the
    ``extra`` text files, for ``Checkpoint.from_directory``; removed on exit (Ray has copied it by then)."""
    stage = Path(tempfile.mkdtemp(prefix=".ray-ckpt-", dir=last_pt.parent))
    try:
        try:
            os.link(last_pt, stage / last_pt.name)
        except OSError:
            shutil.copy2(last_pt, stage / last_pt.name)
        for name, text in (extra or {}).items():
            (stage / name).write_text(text)
        yield str(stage)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def restore_last(out: Path, checkpoint: Any) -> bool:
    """Seed ``out/last.pt`` from a Ray ``checkpoint`` (Tune's or Train's) when this node lacks it, e.g. a worker
    restarted on another node; atomic. True when it restored one."""
    if checkpoint is None or (out / LAST).exists():
        return False
    out.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as d:
        src = Path(d) / LAST
        if not src.exists():
            return False
        tmp = out / f".{LAST}.restore"
        shutil.copy2(src, tmp)
        os.replace(tmp, out / LAST)
    return True
