"""The config accepts what people type (``2.1``, ``"2.1"``, ``true``, ``1e-4``); an unknown key names the closest
valid keys; a choice error lists the choices."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsam2.config import ExperimentCfg, ModelCfg, load_config, parse_overrides
from medsam2.errors import ConfigError


@pytest.mark.parametrize("typed", ["2.1", '"2.1"', "'2.1'"])
def test_sam2_version_as_typed(typed: str) -> None:
    assert load_config(overrides=[f"model.sam2_version={typed}"]).model.sam2_version == "2.1"
    assert load_config(overrides=["model.sam2_version=2.0"]).model.sam2_version == "2.0"


def test_booleans_floats_and_text_fields() -> None:
    cfg = load_config(overrides=["train.compile=true", "train.lr=1e-4", "train.device=0", "name=2024",
                                 "train.max_minutes=5E1", "data.source=null", "train.loss_options.bce_weight=2"])
    assert cfg.train.compile is True and cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.device == "0" and cfg.name == "2024"  # text fields keep the text typed
    assert cfg.train.max_minutes == 50.0 and cfg.data.source is None
    assert cfg.train.loss_options == {"bce_weight": 2.0}
    assert parse_overrides(["train.lr=1e-4"]) == {"train": {"lr": 1e-4}}  # a number, although YAML 1.1 says text


def test_yaml_file_numbers_for_text_fields(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  sam2_version: 2.0\ntrain:\n  lr: 1e-4\n  device: 0\n")
    cfg = load_config(f)
    assert cfg.model.sam2_version == "2.0" and cfg.train.lr == pytest.approx(1e-4) and cfg.train.device == "0"
    assert ModelCfg(sam2_version=2.1).sam2_version == "2.1"  # type: ignore[arg-type]


@pytest.mark.parametrize(("key", "want"), [("train.lrr", "train.lr"), ("trian.lr", "train.lr"),
                                            ("model.lr", "train.lr"), ("model.backbon", "model.backbone"),
                                            ("semisup.methd", "semisup.method")])
def test_unknown_key_names_the_closest(key: str, want: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[f"{key}=1"])
    assert f"unknown key {key!r}" in str(e.value) and f"did you mean {want!r}" in str(e.value)
    assert e.value.hint


@pytest.mark.parametrize(("override", "choices"), [
    ("model.sam2_version=3", ["2.0", "2.1"]),
    ("model.adapter=loraa", ["full", "decoder_only", "bottleneck", "lora"]),
    ("semisup.method=meanteacher", ["none", "mean_teacher", "mutual_consistency", "adversarial"]),
    ("train.loss=dicee", ["dice", "dice_bce", "focal_dice"]),  # registry names
    ("model.box_prior=circle", ["none", "box", "ellipse"]),
])
def test_choice_errors_list_the_choices(override: str, choices: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert all(c in str(e.value) for c in choices), str(e.value)
    assert isinstance(e.value, ValueError)  # callers catching ValueError keep working


def test_near_choice_is_suggested() -> None:
    with pytest.raises(ConfigError, match="did you mean 'mean_teacher'"):
        load_config(overrides=["semisup.method=meanteacher"])


def test_malformed_overrides_and_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(overrides=["train.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_defaults_unchanged() -> None:
    assert load_config() == ExperimentCfg()
