"""Shared fixtures for the Ray Tune tests: a tiny ingested Kvasir work dir and Ray token auth."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import pytest

from tests.conftest import GET_SAMPLE_DATA, skip_or_fail

N_IMAGES = 12
N_TEST = 2


def sample_data_root() -> Path:
    return Path(os.environ.get("MEDSAM2_SAMPLE_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


@pytest.fixture(scope="session")
def tune_workdir(tmp_path_factory) -> str:
    """12 real Kvasir-SEG images ingested with a 30 % val share (≈7 train / 3 val / 2 test)."""
    src = sample_data_root() / "kvasir-seg"
    if not (src / "images").is_dir():
        skip_or_fail(f"sample data not found at {src}", GET_SAMPLE_DATA)
    from medsam2.data.ingest import ingest

    root = tmp_path_factory.mktemp("kvasir") / "kvasir-seg"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    stems = sorted(p.stem for p in (src / "images").glob("*.jpg"))[:N_IMAGES]
    for s in stems:
        shutil.copy(src / "images" / f"{s}.jpg", root / "images")
        shutil.copy(src / "masks" / f"{s}.jpg", root / "masks")
    (root / "split_pranet_test.txt").write_text("\n".join(stems[:N_TEST]) + "\n")
    workdir = root.parent / "work"
    res = ingest(str(root), workdir, layout={"val_fraction": 0.3})
    assert res.splits.get("val", 0) >= 1, res.splits
    return str(workdir)


# Ray 2.60 enables token auth by default. Pin it explicitly for the whole session — one token in the env of
# the local Ray, the `ray start` nodes and the driver — so no test reads or writes ~/.ray/auth_token. Set at
# import (before any test imports ray), because Ray reads these variables when it is imported.
os.environ.setdefault("RAY_AUTH_MODE", "token")
if os.environ["RAY_AUTH_MODE"] == "token" and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


@pytest.fixture(scope="session")
def ray_token() -> str:
    """The session's Ray auth token (see above); no ambient RAY_ADDRESS may redirect the local sweeps."""
    mp = pytest.MonkeyPatch()
    mp.delenv("RAY_ADDRESS", raising=False)
    yield os.environ.get("RAY_AUTH_TOKEN", "")
    mp.undo()


@pytest.fixture
def sweep_env(tmp_path, monkeypatch, ray_token, tune_workdir):
    """MEDSAM2_HOME and a file-backed SQLite MLflow store under tmp_path; returns URI + base overrides."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("MEDSAM2_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return {"uri": uri, "overrides": [f"data.workdir={tune_workdir}", f"tracking.tracking_uri={uri}"]}


def child_runs(uri: str, parent_id: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri, registry_uri=uri)
    exp = client.get_run(parent_id).info.experiment_id
    return client, client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'")


def _check_sweep_tracking(res, uri: str, n_trials: int) -> None:
    """Parent run FINISHED with the results table, plot and best config; one ended child run per trial."""
    import pandas as pd

    from medsam2.config import load_config
    from medsam2.tracking.sweeps import TRIAL_TAG

    client, children = child_runs(uri, res.parent_run_id)
    parent = client.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials"] == n_trials
    arts = {a.path for a in client.list_artifacts(res.parent_run_id, "sweep")}
    assert {"sweep/results.csv", "sweep/results.json", "sweep/best_config.yaml"} <= arts
    assert "sweep/parallel_coordinates.png" in arts
    assert len(children) == n_trials
    assert len({c.data.tags[TRIAL_TAG] for c in children}) == n_trials
    for c in children:
        expected = {"COMPLETED": "FINISHED", "STOPPED_EARLY": "KILLED"}[c.data.tags["tune_status"]]
        assert c.info.status == expected, (c.data.tags["tune_status"], c.info.status)
        assert client.get_metric_history(c.info.run_id, "val_dice"), "every trial logs val_dice per eval"
        assert c.data.params["model.backbone"] == "hiera_t"
    best = load_config(res.best_config)
    assert best.model.image_size == 64 and best.tracking.tracking_uri == uri
    assert best.model.adapter in {"decoder_only", "lora"} and best.model.decoder in {"sam2", "multiscale"}
    assert res.best_val_dice == pytest.approx(pd.read_csv(res.results_csv)["best_val_dice"].max())


@pytest.fixture
def check_sweep_tracking():
    return _check_sweep_tracking
