"""Disk hygiene of the suite itself: a private MEDSAM2_HOME for every test and subprocess, and fixtures that
delete what they trained."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, remove_checkpoints


def test_medsam2_home_is_temporary_and_inherited_by_subprocesses(private_medsam2_home) -> None:
    home = Path(os.environ["MEDSAM2_HOME"]).resolve()
    assert home == Path(private_medsam2_home).resolve()
    assert not home.is_relative_to(REPO.resolve()), "MEDSAM2_HOME must not point into the checkout"
    out = subprocess.run([sys.executable, "-c", "from medsam2.home import medsam2_home; print(medsam2_home())"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip().splitlines()[-1]) == home


def test_remove_checkpoints_keeps_everything_else(tmp_path) -> None:
    for rel in ("run/last.pt", "run/final.pt", "run/best.pt", "mlartifacts/1/m/model.pth", "run/history.json",
                "logs/worker.log"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    assert remove_checkpoints(tmp_path) == 4
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["logs/worker.log", "run/history.json"]
