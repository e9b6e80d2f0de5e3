"""The CLI contract: every command has --help, and --json prints one JSON object on the last stdout line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from medsam2.cli import app

COMMANDS = ["ingest", "validate", "train", "evaluate", "promote", "rollback", "predict", "sweep",
            "retrain-check", "champion"]
runner = CliRunner()


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help_with_json_option(cmd):
    res = runner.invoke(app, [cmd, "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "--json" in res.output


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_ingest_and_validate_json_on_real_images(sample_data, tmp_path):
    from tests.conftest import copy_kvasir_subset

    src = copy_kvasir_subset(tmp_path / "kvasir-seg", n_train=3, n_val=1, n_test=2)
    (src / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (src / "masks" / "broken.jpg").write_bytes(b"")
    cmd = [sys.executable, "-m", "medsam2.cli"]
    out = subprocess.run(cmd + ["ingest", str(src), "--workdir", str(tmp_path / "w"), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = _last_json(out.stdout)
    assert res["added"] == 6 and res["unchanged"] == 0 and res["rows"] == 6
    assert res["dataset_version"]
    assert res["inputs_seen"] == res["rows"] + sum(res["quarantined"].values())  # nothing silently dropped
    assert sum(res["quarantined"].values()) >= 1
    again = _last_json(subprocess.run(cmd + ["ingest", str(src), "--workdir", str(tmp_path / "w"), "--json"],
                                      capture_output=True, text=True, timeout=300).stdout)
    assert again["added"] == 0 and again["unchanged"] == 6
    val = subprocess.run(cmd + ["validate", "--workdir", str(tmp_path / "w"), "--json"], capture_output=True,
                         text=True, timeout=300)
    assert val.returncode == 0 and _last_json(val.stdout)["success"] is True


def test_bad_override_is_a_clear_error():
    res = runner.invoke(app, ["train", "--set", "train.nonsense=1", "--json"])
    assert res.exit_code == 2  # usage/config (medsam2.errors.EXIT_CODES)
    assert "nonsense" in res.stderr and "Traceback" not in res.stderr
    assert _last_json(res.stdout)["kind"] == "usage"
