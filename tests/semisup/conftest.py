"""Fixtures for the semi-supervised tests: a tiny-config factory (the Kvasir work dir comes from tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsam2.config import ExperimentCfg, load_config


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
