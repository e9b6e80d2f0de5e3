"""``MEDSAM2_HOME``: the one root of everything the platform writes by default (MLflow store and artifacts, run
dirs, reports, weights and dataset caches, Ray results). Unset: ``.medsam2`` in the working directory."""

from __future__ import annotations

import os
from pathlib import Path


def medsam2_home() -> Path:
    """``$MEDSAM2_HOME`` (default ``./.medsam2``), absolute."""
    return Path(os.environ.get("MEDSAM2_HOME", ".medsam2")).resolve()
