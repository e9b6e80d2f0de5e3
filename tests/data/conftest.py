"""Fixtures for the data-platform tests: the shared real sample data and small copies of it in tmp_path."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

SALT = "test-salt"


def sample_root() -> Path | None:
    p = Path(os.environ.get("MEDSAM2_SAMPLE_DATA", "/work/shared/data"))
    return p if p.is_dir() else None


@pytest.fixture(scope="session")
def sample_data() -> Path:
    root = sample_root()
    if root is None:
        pytest.skip("real sample data not found: set MEDSAM2_SAMPLE_DATA to the shared data folder")
    return root


def copy_kvasir(sample: Path, dest: Path, n_test: int = 3, n_other: int = 7) -> Path:
    """A Kvasir-SEG subset in ``dest`` (images/, masks/, split_pranet_test.txt, kavsir_bboxes.json)."""
    src = sample / "kvasir-seg"
    test = sorted((src / "split_pranet_test.txt").read_text().split())[:n_test]
    other = sorted((src / "split_other.txt").read_text().split())[:n_other]
    (dest / "images").mkdir(parents=True)
    (dest / "masks").mkdir()
    for stem in test + other:
        shutil.copy(src / "images" / f"{stem}.jpg", dest / "images" / f"{stem}.jpg")
        shutil.copy(src / "masks" / f"{stem}.jpg", dest / "masks" / f"{stem}.jpg")
    (dest / "split_pranet_test.txt").write_text("\n".join(test) + "\n")
    boxes = json.loads((src / "kavsir_bboxes.json").read_text())
    (dest / "kavsir_bboxes.json").write_text(json.dumps({k: boxes[k] for k in test + other if k in boxes}))
    return dest


@pytest.fixture
def kvasir_small(sample_data: Path, tmp_path: Path) -> Path:
    return copy_kvasir(sample_data, tmp_path / "kvasir-seg")
