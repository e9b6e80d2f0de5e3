"""The registries are the one source of the variants' names: a name registered at runtime is accepted by config
validation, listed in its choice errors, its JSON schema and the train command's help; the family package is
imported on the first lookup. The default work dir lies under ``MEDSAM2_HOME`` and keeps config hashes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from medsam2.config import ExperimentCfg, config_hash, load_config
from medsam2.config_input import choices
from medsam2.errors import ConfigError
from medsam2.registry import ADAPTERS, DECODERS


@pytest.fixture
def extra_adapter(monkeypatch):
    """An adapter ``test_only`` registered for one test (and gone after it)."""
    ADAPTERS.names()  # load the family first, as any lookup does
    monkeypatch.setitem(ADAPTERS._items, "test_only", lambda model, cfg: None)
    return "test_only"


def test_a_name_registered_at_runtime_is_a_valid_config_value(extra_adapter):
    cfg = load_config(overrides=[f"model.adapter={extra_adapter}"])
    assert cfg.model.adapter == extra_adapter
    schema = ExperimentCfg.model_json_schema()["$defs"]["ModelCfg"]["properties"]["adapter"]
    assert schema["enum"] == ADAPTERS.names() and extra_adapter in schema["enum"]
    assert extra_adapter in choices(ExperimentCfg)["model.adapter"]


def test_a_wrong_name_lists_the_registry_names(extra_adapter):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["model.adapter=test_onyl"])
    msg = str(e.value)
    assert f"model.adapter: 'test_onyl' is not one of {', '.join(ADAPTERS.names())}" in msg, msg
    assert "did you mean 'test_only'?" in msg and e.value.hint == "set it with --set model.adapter=test_only"
    assert "\n" not in msg


def test_every_family_a_config_names_reads_its_registry():
    keys = choices(ExperimentCfg)
    assert keys["model.adapter"] == ADAPTERS.names() == ["bottleneck", "decoder_only", "full", "lora"]
    assert keys["model.decoder"] == DECODERS.names()
    assert {"mean_teacher", "none"} <= set(keys["semisup.method"]) and "dice_bce" in keys["train.loss"]
    assert keys["model.box_prior"][0] == "none"  # not a registered prior: the "off" value


def test_a_registry_with_a_package_imports_it_on_the_first_lookup(tmp_path, monkeypatch):
    """The real families' layout in small: the registry in a low module, the variants in a package."""
    (tmp_path / "widget_family.py").write_text(
        "from medsam2.registry import Registry\n\nWIDGETS = Registry('widget', package='widget_variants')\n")
    (tmp_path / "widget_variants").mkdir()
    (tmp_path / "widget_variants" / "__init__.py").write_text(
        "from widget_family import WIDGETS\n\n\n@WIDGETS.register('cog')\ndef cog():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("widget_family", "widget_variants"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    from widget_family import WIDGETS  # type: ignore[import-not-found]

    assert "widget_variants" not in sys.modules
    assert "cog" in WIDGETS and "widget_variants" in sys.modules
    assert WIDGETS.names() == ["cog"] and WIDGETS.create("cog") == 1
    with pytest.raises(KeyError, match="unknown widget 'gear'; known: cog"):
        WIDGETS.get("gear")


def test_the_default_workdir_is_under_medsam2_home_and_keeps_the_config_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSAM2_HOME", str(tmp_path / "a"))
    a = load_config()
    assert a.data.workdir == str(tmp_path / "a" / "work") == ExperimentCfg().data.workdir
    monkeypatch.setenv("MEDSAM2_HOME", str(tmp_path / "b"))
    b = load_config()
    assert b.data.workdir == str(tmp_path / "b" / "work")
    legacy = load_config(overrides=["data.workdir=.medsam2/work"])  # the old relative default
    same_place = load_config(overrides=[f"data.workdir={Path(b.data.workdir)}"])
    assert config_hash(b) == config_hash(legacy) == config_hash(same_place)
    assert config_hash(load_config(overrides=["data.workdir=/elsewhere"])) != config_hash(b)


def test_train_help_lists_a_name_registered_at_runtime(extra_adapter):
    from typer.testing import CliRunner

    from medsam2.cli import app

    res = CliRunner().invoke(app, ["train", "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert f"model.adapter: {', '.join(ADAPTERS.names())}" in res.output, res.output
