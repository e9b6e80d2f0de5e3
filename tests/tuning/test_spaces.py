"""Search spaces: every registered space yields valid configs for sampled points; constraints hold."""

from __future__ import annotations

import random

import pytest
from ray import tune

from medsam2.config import ExperimentCfg, load_config
from tuning.spaces import SPACE_RESOURCES, SPACES, apply_params, nest, resolve_constraints, space_base_cfg
from tuning.sweep import parse_overrides_flat, prepare_config


def _sample(space: dict, rng: random.Random) -> dict:
    out = {}
    for k, dom in space.items():
        out[k] = dom.sample(random_state=rng.randrange(2**31)) if isinstance(dom, tune.search.sample.Domain) else dom
    return out


@pytest.mark.parametrize("name", SPACES.names())
def test_every_space_builds_valid_configs(name):
    space, base = SPACES.create(name)
    assert space and all("." in k for k in [*space, *base])
    assert name in SPACE_RESOURCES
    cfg = space_base_cfg(name, ExperimentCfg())
    rng = random.Random(0)
    for _ in range(30):
        apply_params(cfg, _sample(space, rng))  # pydantic validates each point


def test_required_spaces_and_values():
    assert {"smoke", "adapters_x_decoders", "gpu_h100"} <= set(SPACES.names())
    smoke, base = SPACES.create("smoke")
    assert base["model.backbone"] == "hiera_t" and base["model.image_size"] == 64
    assert set(smoke["model.adapter"].categories) == {"decoder_only", "lora"}
    assert set(smoke["model.decoder"].categories) == {"sam2", "multiscale"}
    axd, base = SPACES.create("adapters_x_decoders")
    assert set(axd["model.adapter"].categories) == {"bottleneck", "lora", "decoder_only", "full"}
    assert set(axd["model.decoder"].categories) == {"sam2", "multiscale", "prompt_free"}
    assert set(axd["model.image_size"].categories) == {512, 1024}
    assert set(axd["train.loss"].categories) == {"dice_bce", "focal_dice"}
    gpu_cfg = space_base_cfg("gpu_h100", ExperimentCfg())
    assert gpu_cfg.model.image_size == 1024 and gpu_cfg.train.max_steps >= 1000
    assert gpu_cfg.model.checkpoint == base["model.checkpoint"] == "sam2.1_hiera_tiny"  # adapters need real features


def test_prompt_free_forces_no_prompt():
    assert resolve_constraints({"model.decoder": "prompt_free"})["model.prompt"] == "none"
    assert "model.prompt" not in resolve_constraints({"model.decoder": "sam2"})
    cfg = apply_params(ExperimentCfg(), {"model.decoder": "prompt_free", "model.adapter": "lora"})
    assert (cfg.model.decoder, cfg.model.prompt, cfg.model.adapter) == ("prompt_free", "none", "lora")
    assert nest({"a.b": 1, "a.c": 2, "d.e": 3}) == {"a": {"b": 1, "c": 2}, "d": {"e": 3}}


def test_prepare_config_precedence_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDSAM2_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = load_config(None, ["model.image_size=1024", "data.workdir=rel/work"])
    cfg = prepare_config("smoke", base, ["train.max_steps=3"])
    assert cfg.model.image_size == 64  # the space's fixed value beats the base config
    assert cfg.train.max_steps == 3  # an explicit override beats the space
    assert cfg.data.workdir == str(tmp_path / "rel" / "work")
    assert cfg.tracking.tracking_uri == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    assert parse_overrides_flat(["model.adapter=lora", "x"]) == {"model.adapter": "lora"}


def test_a_newly_registered_adapter_joins_the_adapter_spaces(monkeypatch):
    from medsam2.registry import ADAPTERS, DECODERS

    ADAPTERS.names()
    monkeypatch.setitem(ADAPTERS._items, "test_only", lambda model, cfg: None)
    for name in ("adapters_x_decoders", "gpu_h100"):
        space, _ = SPACES.create(name)
        assert space["model.adapter"].categories == ADAPTERS.names() and "test_only" in ADAPTERS.names()
        assert space["model.decoder"].categories == DECODERS.names()
    cfg = apply_params(ExperimentCfg(), {"model.adapter": "test_only"})
    assert cfg.model.adapter == "test_only"
