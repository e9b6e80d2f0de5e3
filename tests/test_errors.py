"""One error path for the CLI: a mistake is one or two lines on stderr, no traceback (unless --debug), an exit
code by kind (2 usage/config, 3 input, 4 service, 1 internal), and with --json a last stdout line
``{"error", "kind", "hint"}``. Services are checked before the work: a stopped server answers in seconds."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medsam2.cli import app
from medsam2.errors import EXIT_CODES, ConfigError, InputDataError, ServiceUnavailable, describe

runner = CliRunner()


def _run(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, list(args), env=env)


def _error_json(res) -> dict:
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(last) == {"error", "kind", "hint"}, last
    return last


def _free_port() -> int:
    """A local port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _short(res) -> str:
    err = res.stderr
    assert "Traceback" not in err and "Traceback" not in res.stdout, err
    assert 1 <= len(err.strip().splitlines()) <= 2, err
    return err


def test_unknown_key_is_a_usage_error_naming_the_closest_keys() -> None:
    res = _run("train", "--set", "train.lrr=1", "--json")
    assert res.exit_code == 2, res.output
    assert "'train.lr'" in _short(res)
    j = _error_json(res)
    assert j["kind"] == "usage" and "did you mean 'train.lr'" in j["error"] and j["hint"]


def test_choice_error_lists_the_choices() -> None:
    res = _run("train", "--set", "model.backbone=hiera_x", "--json")
    assert res.exit_code == 2
    err = _short(res)
    assert all(c in err for c in ("hiera_t", "hiera_s", "hiera_b+", "hiera_l"))


def test_missing_source_folder_is_an_input_error(tmp_path: Path) -> None:
    res = _run("ingest", str(tmp_path / "nope"), "--workdir", str(tmp_path / "w"), "--json")
    assert res.exit_code == 3, res.output
    assert "nope" in _short(res)
    assert _error_json(res)["kind"] == "input"


def test_unknown_model_path_is_an_input_error(tmp_path: Path) -> None:
    for cmd in (["evaluate", "--model", "no-such-model.pt"],
                ["predict", str(tmp_path), "--model", "no-such-model.pt", "--out", str(tmp_path / "o")]):
        res = _run(*cmd, "--json")
        assert res.exit_code == 3, (cmd, res.output)
        assert "no-such-model.pt" in _short(res) and _error_json(res)["kind"] == "input"


def test_missing_predict_input_is_an_input_error(tmp_path: Path) -> None:
    res = _run("predict", str(tmp_path / "missing.png"), "--model", "x.pt", "--out", str(tmp_path / "o"))
    assert res.exit_code == 3 and "missing.png" in _short(res)


def test_unknown_confidence_input_is_a_usage_error() -> None:
    res = _run("evaluate", "--model", "no-such-model.pt", "--confidence-input", "vibes", "--json")
    assert res.exit_code == 2, res.output
    assert "vibes" in _short(res) and "flip_agreement" in _short(res) and _error_json(res)["kind"] == "usage"


def test_click_usage_errors_take_the_same_path() -> None:
    res = _run("train", "--no-such-option", "--json")
    assert res.exit_code == 2
    assert "--no-such-option" in _short(res) and _error_json(res)["kind"] == "usage"


def test_traceback_only_with_debug(tmp_path: Path) -> None:
    args = ["ingest", str(tmp_path / "nope"), "--workdir", str(tmp_path / "w")]
    assert "Traceback" not in _run(*args).stderr
    for res in (_run("--debug", *args), _run(*args, env={"MEDSAM2_DEBUG": "1"})):
        assert res.exit_code == 3
        assert "Traceback" in res.stderr and "FileNotFoundError" in res.stderr
        assert res.stderr.strip().splitlines()[-2].startswith("Error: ")  # the message still ends the output


@pytest.mark.parametrize("cmd", [["champion"], ["rollback"], ["retrain-check"],
                                 ["evaluate", "--model", "models:/medsam2@champion"],
                                 ["promote", "--model", "models:/medsam2/1", "--eval-run-id", "abc"]])
def test_unreachable_mlflow_answers_in_seconds_with_exit_4(cmd: list[str]) -> None:
    uri = f"http://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    res = _run(*cmd, "--json", env={"MLFLOW_TRACKING_URI": uri})
    assert time.monotonic() - t0 < 10
    assert res.exit_code == 4, res.output
    err = _short(res)
    assert uri in err and "make up" in err
    assert _error_json(res)["kind"] == "service"


def test_unreachable_mlflow_before_training(tmp_path: Path) -> None:
    (tmp_path / "manifest.parquet").write_bytes(b"")  # only its presence is checked before the service
    uri = f"http://127.0.0.1:{_free_port()}"
    res = _run("train", "--set", f"data.workdir={tmp_path}", "--set", f"tracking.tracking_uri={uri}", "--json")
    assert res.exit_code == 4 and uri in _short(res)


@pytest.mark.parametrize("cmd", ["train", "sweep"])
def test_train_without_a_manifest_says_to_ingest_first(cmd: str, tmp_path: Path) -> None:
    """Before any service or Ray starts (a sweep used to start Ray and error every trial, tracebacks on stderr)."""
    res = _run(cmd, "--set", f"data.workdir={tmp_path}", "--json")
    assert res.exit_code == 3 and "medsam2 ingest" in _short(res)


def test_unreachable_s3_endpoint_before_ingest(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    res = _run("ingest", "s3://bucket/prefix", "--workdir", str(tmp_path), "--s3-endpoint-url", url, "--json")
    assert time.monotonic() - t0 < 10 and res.exit_code == 4, res.output
    assert url in _short(res)


def test_service_checks_skip_local_stores_and_fail_fast_on_closed_ports(monkeypatch) -> None:
    from medsam2 import services

    for uri in ("sqlite:////tmp/x.db", "file:///tmp/mlruns", "/tmp/mlruns", "auto"):
        services.check_reachable("x", uri, var="X")  # not a network address: nothing to check
    port = _free_port()
    t0 = time.monotonic()
    with pytest.raises(ServiceUnavailable, match=f"127.0.0.1:{port}"):
        services.check_prefect(f"http://127.0.0.1:{port}/api")
    with pytest.raises(ServiceUnavailable):
        services.check_ray(f"ray://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 8
    with socket.socket() as srv:  # a listening port passes
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        services.check_mlflow(f"http://127.0.0.1:{srv.getsockname()[1]}")


def test_describe_maps_exceptions_to_kinds() -> None:
    assert describe(ConfigError("bad", "fix")).kind == "usage"
    assert describe(InputDataError("bad")).kind == "input"
    assert describe(FileNotFoundError("x")).kind == "input"
    assert describe(ConnectionRefusedError("x")).kind == "service"
    bug = describe(ZeroDivisionError("division by zero"))
    assert bug.kind == "internal" and bug.exit_code == 1 and "ZeroDivisionError" in bug.error
    assert "--debug" in (bug.hint or "")
    assert EXIT_CODES == {"usage": 2, "input": 3, "service": 4, "internal": 1}


def test_internal_error_is_one_message_and_exit_1(monkeypatch, tmp_path: Path) -> None:
    import medsam2.steps

    def boom(*a, **k):
        return {}["missing"]  # a bug: KeyError

    monkeypatch.setattr(medsam2.steps, "run_ingest", boom)
    res = _run("ingest", str(tmp_path), "--workdir", str(tmp_path / "w"), "--json")
    assert res.exit_code == 1 and "internal error" in _short(res)
    assert _error_json(res)["kind"] == "internal"


def test_bad_layout_is_a_usage_error_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    layout = tmp_path / "layout.yaml"
    layout.write_text("test_lst: test.txt\n")
    res = _run("ingest", str(tmp_path / "src"), "--workdir", str(tmp_path / "w"), "--layout", str(layout), "--json")
    assert res.exit_code == 2 and "did you mean 'test_list'" in _short(res)
    layout.write_text("- a\n- b\n")
    res = _run("ingest", str(tmp_path / "src"), "--workdir", str(tmp_path / "w"), "--layout", str(layout))
    assert res.exit_code == 2 and "mapping" in _short(res)
    res = _run("ingest", str(tmp_path / "src"), "--workdir", str(tmp_path / "w"), "--layout", str(tmp_path / "no.yaml"))
    assert res.exit_code == 2 and "no.yaml" in _short(res)


def test_validate_without_a_manifest_is_an_input_error(tmp_path: Path) -> None:
    res = _run("validate", "--workdir", str(tmp_path / "empty"), "--json")
    assert res.exit_code == 3 and "medsam2 ingest" in _short(res)
