"""The ingest benchmark's quick mode runs and prints one JSON object."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ingest_benchmark_quick(sample_data: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "ingest_throughput.py"),
            "--quick",
            "--source",
            str(sample_data / "kvasir-seg"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["n_images"] == 20 and res["reingest_added"] == 0
    for k in (
        "first_ingest_images_per_s",
        "reingest_images_per_s",
        "cache_read_images_per_s",
        "source_decode_images_per_s",
    ):
        assert res[k] > 0
