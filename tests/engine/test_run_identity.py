"""A run's identity is decided once (``engine.train.output_dir_of``): with no ``train.output_dir``, ``medsam2 train``
writes under ``$MEDSAM2_HOME/runs/<name>/<config hash>-<data version>``, so two calls with different settings both
succeed (before, both used ``.medsam2/runs/default`` in the working directory and the second failed with "last.pt
was written by a different config"), a rerun of the same settings resumes, and nothing lands in the working
directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import remove_checkpoints

pytestmark = pytest.mark.timeout(600)
MEDSAM2 = str(Path(sys.executable).with_name("medsam2"))
TINY = ["model.image_size=64", "train.max_steps=2", "train.batch_size=2", "train.warmup_steps=1",
        "train.eval_every=2", "train.progress=false", "train.device=cpu", "data.augment=none"]


def _train(cwd: Path, env: dict, *overrides: str) -> dict:
    args = [MEDSAM2, "train", "--json"]
    for o in [*TINY, *overrides]:
        args += ["--set", o]
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_two_cli_trainings_with_different_settings_and_no_output_dir_both_succeed(kvasir_workdir, tmp_path,
                                                                                  monkeypatch):
    from medsam2.config import load_config
    from medsam2.engine.train import output_dir_of

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("MEDSAM2_HOME", str(home))  # for output_dir_of in this process
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"MEDSAM2_HOME": str(home)}
    try:
        a = _train(cwd, env, f"data.workdir={kvasir_workdir}", "train.lr=0.001")
        b = _train(cwd, env, f"data.workdir={kvasir_workdir}", "train.lr=0.002")
        ckpt_a, ckpt_b = Path(a["checkpoint"]), Path(b["checkpoint"])
        assert ckpt_a.parent != ckpt_b.parent and ckpt_a.exists() and ckpt_b.exists()
        for ckpt, lr in ((ckpt_a, "0.001"), (ckpt_b, "0.002")):
            assert ckpt.parent.parent == home / "runs" / "medsam2", ckpt  # <home>/runs/<name>/<identity>/
            cfg = load_config(overrides=[*TINY, f"data.workdir={kvasir_workdir}", f"train.lr={lr}"])
            assert output_dir_of(cfg) == ckpt.parent  # the library names the same dir the CLI used
        again = _train(cwd, env, f"data.workdir={kvasir_workdir}", "train.lr=0.001")
        assert again["checkpoint"] == a["checkpoint"] and again["resumed_from"] == 2  # same identity: resumed
        assert sorted(p.name for p in cwd.iterdir()) == []  # nothing outside MEDSAM2_HOME
    finally:
        remove_checkpoints(home)


def test_ingest_and_validate_without_a_work_dir_write_under_medsam2_home(sample_data, tmp_path):
    """``medsam2 ingest`` / ``validate`` without ``--workdir`` use the work dir a config without ``data.workdir``
    uses, ``$MEDSAM2_HOME/work``; before, they wrote ``./.medsam2/work`` in the working directory."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "MEDSAM2_HOME": str(home)}
    cli = [sys.executable, "-m", "medsam2.cli"]
    for args in (["ingest", str(sample_data / "busi"), "--json"], ["validate", "--json"]):
        out = subprocess.run(cli + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
    assert (home / "work" / "manifest.parquet").is_file()
    assert sorted(p.name for p in cwd.iterdir()) == []  # nothing outside MEDSAM2_HOME
