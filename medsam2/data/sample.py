"""Sample data: ``sample:<name>`` sources resolve to the shared real data, or are downloaded when allowed.

Lookup order for ``sample:kvasir-seg``: ``$MEDSAM2_SAMPLE_DATA/kvasir-seg``, then ``../shared/data/kvasir-seg``
next to the checkout, then the download cache ``$MEDSAM2_HOME/datasets/kvasir-seg``; if none exists and
``MEDSAM2_ALLOW_DOWNLOAD=1``, Kvasir-SEG is fetched from its official site (Simula) into that cache.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from medsam2.home import medsam2_home

OFFICIAL = {"kvasir-seg": "https://datasets.simula.no/downloads/kvasir-seg.zip"}
REPO_ROOT = Path(__file__).resolve().parents[2]


def sample_root() -> Path | None:
    """The folder holding the shared sample datasets, or None."""
    env = os.environ.get("MEDSAM2_SAMPLE_DATA")
    for cand in ([Path(env)] if env else []) + [REPO_ROOT.parent / "shared" / "data"]:
        if cand.is_dir():
            return cand
    return None


def _download(name: str, dest: Path) -> Path:
    url = OFFICIAL[name]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        archive = Path(tmp) / "data.zip"
        with urllib.request.urlopen(url, timeout=120) as resp, open(archive, "wb") as f:  # noqa: S310
            shutil.copyfileobj(resp, f)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(Path(tmp) / "x")
        (inner,) = [p for p in (Path(tmp) / "x").iterdir() if p.is_dir()]
        os.replace(inner, dest)
    return dest


def resolve_source(source: str) -> str:
    """``sample:<name>`` → a local folder; any other source is returned unchanged."""
    if not source.startswith("sample:"):
        return source
    name = source.split(":", 1)[1]
    root = sample_root()
    if root is not None and (root / name).is_dir():
        return str(root / name)
    cache = medsam2_home() / "datasets" / name
    if cache.is_dir():
        return str(cache)
    if name in OFFICIAL and os.environ.get("MEDSAM2_ALLOW_DOWNLOAD") == "1":
        return str(_download(name, cache))
    raise FileNotFoundError(
        f"sample dataset {name!r} not found: set MEDSAM2_SAMPLE_DATA to the folder holding it"
        + (f", or set MEDSAM2_ALLOW_DOWNLOAD=1 to fetch it from {OFFICIAL[name]}" if name in OFFICIAL else "")
    )
