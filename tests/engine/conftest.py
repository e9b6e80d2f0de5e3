"""Engine-test fixtures: an untrained box-prompted tiny checkpoint (hiera_t at 64 px) for the predict tests."""

from __future__ import annotations

import pytest

from medsam2.config import ExperimentCfg, ModelCfg
from medsam2.engine.checkpoint import atomic_save, build_model, model_payload


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """Path of a random-init box-prompted ``final.pt`` (64 px); deleted after the module (156 MB, and a
    module-scoped dir outlives the module otherwise)."""
    cfg = ExperimentCfg(model=ModelCfg(image_size=64))
    model, base = build_model(cfg.model)
    path = atomic_save(model_payload(model, cfg, base), tmp_path_factory.mktemp("m") / "final.pt")
    yield path
    path.unlink(missing_ok=True)
