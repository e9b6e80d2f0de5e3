"""Fixtures for the semi-supervised tests: a tiny Kvasir work dir (real images) and a tiny-config factory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from medsam2.config import ExperimentCfg, load_config


def kvasir_source() -> Path | None:
    p = Path(os.environ.get("MEDSAM2_SAMPLE_DATA", "/work/shared/data")) / "kvasir-seg"
    return p if (p / "images").is_dir() and (p / "split_other.txt").exists() else None


def build_kvasir_workdir(dest: Path, n_train: int = 6, n_val: int = 2, n_test: int = 2) -> Path:
    """Copy a few Kvasir pairs (train + val stems chosen by their patient split bucket, PraNet test stems) to
    ``dest/kvasir-seg`` and ingest them into ``dest/work``; returns the work dir."""
    from medsam2.data.ingest import ingest
    from medsam2.data.splits import DEFAULT_VAL_FRACTION, split_bucket

    src = kvasir_source()
    assert src is not None
    other = (src / "split_other.txt").read_text().split()
    cut = round(DEFAULT_VAL_FRACTION * 1000)
    val = [s for s in other if split_bucket(f"kvasir-seg:{s}") < cut][:n_val]
    train = [s for s in other if split_bucket(f"kvasir-seg:{s}") >= cut][:n_train]
    test = (src / "split_pranet_test.txt").read_text().split()[:n_test]
    data = dest / "kvasir-seg"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for stem in train + val + test:
        shutil.copy(src / "images" / f"{stem}.jpg", data / "images")
        shutil.copy(src / "masks" / f"{stem}.jpg", data / "masks")
    (data / "split_pranet_test.txt").write_text("\n".join(test) + "\n")
    ingest(str(data), dest / "work")
    return dest / "work"


@pytest.fixture(scope="session")
def kvasir_workdir(tmp_path_factory) -> Path:
    if kvasir_source() is None:
        pytest.skip("Kvasir-SEG sample data not found: set MEDSAM2_SAMPLE_DATA to the shared data folder")
    return build_kvasir_workdir(tmp_path_factory.mktemp("semisup"))


def make_tiny_cfg(workdir: Path, out: Path, *overrides: str) -> ExperimentCfg:
    """hiera_t at 64 px, batch 2, 2 steps, half the labels hidden, no progress bar."""
    return load_config(
        overrides=[
            f"data.workdir={workdir}",
            f"train.output_dir={out}",
            "model.backbone=hiera_t",
            "model.image_size=64",
            "train.max_steps=2",
            "train.batch_size=2",
            "train.warmup_steps=0",
            "train.progress=false",
            "train.eval_every=1000",
            "data.label_fraction=0.5",
            "data.augment=none",
            "eval.batch_size=4",
            *overrides,
        ]
    )


@pytest.fixture(scope="session")
def tiny_cfg():
    """The :func:`make_tiny_cfg` factory."""
    return make_tiny_cfg
