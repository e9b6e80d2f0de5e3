"""kill -9 mid-ingest then rerun == uninterrupted run; concurrent ingests into one work dir are serialised."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from data_helpers import SALT, copy_kvasir

from medsam2.data.ingest import ingest
from medsam2.data.manifest import MANIFEST_COLUMNS, read_manifest, read_quarantine

CMD = "import sys; from medsam2.data.ingest import ingest; ingest(sys.argv[1], sys.argv[2], salt=sys.argv[3])"


def _spawn(src: Path, wd: Path, env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-c", CMD, str(src), str(wd), SALT],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _comparable(df: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in MANIFEST_COLUMNS if c != "ingested_at"]
    return df[cols].sort_values("image_id").reset_index(drop=True)


def test_sigkill_mid_ingest_then_rerun_matches_clean_run(sample_data: Path, tmp_path: Path) -> None:
    src = copy_kvasir(sample_data, tmp_path / "kvasir-seg", n_test=10, n_other=30)
    crashed = tmp_path / "crashed"
    proc = _spawn(src, crashed, {"MEDSAM2_INGEST_CHECKPOINT_S": "0"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if len(read_manifest(crashed)) >= 8 if (crashed / "manifest.parquet").exists() else False:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "ingest finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = read_manifest(crashed)
    assert 0 < len(partial) < 40
    res = ingest(str(src), crashed, salt=SALT)
    assert res.added + res.unchanged == 40 and res.unchanged >= len(partial) - 1
    clean = tmp_path / "clean"
    ingest(str(src), clean, salt=SALT)
    pd.testing.assert_frame_equal(_comparable(read_manifest(crashed)), _comparable(read_manifest(clean)))
    assert len(read_quarantine(crashed)) == len(read_quarantine(clean)) == 0
    left = sorted(p.name for p in (crashed / "cache").iterdir())
    assert left == sorted(p.name for p in (clean / "cache").iterdir())  # no orphans or temp files


def test_concurrent_ingests_are_serialised(sample_data: Path, tmp_path: Path) -> None:
    a = copy_kvasir(sample_data, tmp_path / "kvasir-seg", n_test=2, n_other=10)
    wd = tmp_path / "w"
    procs = [_spawn(a, wd), _spawn(sample_data / "sam-med2d-demo", wd)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
    df = read_manifest(wd)
    assert df.groupby("dataset").size().to_dict() == {"kvasir-seg": 12, "sam-med2d-demo": 31}
