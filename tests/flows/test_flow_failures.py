"""Flows fail with the CLI's message (issue 14): the state message of a failed flow (and of the task where the
exception surfaced) is ``describe(exc)``'s error line and hint, the exception stays the run's result, services
are checked before the work (an unreachable MLflow fails in seconds), and usage/input errors are not retried."""

from __future__ import annotations

import socket
import time

import pytest

from flows.failures import failure_message, retry_unless_user_error
from medsam2.errors import InputDataError, ServiceUnavailable, UsageError, describe

pytestmark = pytest.mark.slow  # a temporary Prefect server: minutes to start on a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=400):
        yield


def test_failure_message_and_retry_condition():
    from prefect.states import Failed

    exc = UsageError("bad key 'train.lrr'", "did you mean train.lr?")
    assert failure_message(exc) == "bad key 'train.lrr'\ndid you mean train.lr?"
    assert failure_message(ValueError("x")).splitlines()[0] == describe(ValueError("x")).error
    assert not retry_unless_user_error(None, None, Failed(data=exc))
    assert not retry_unless_user_error(None, None, Failed(data=InputDataError("no such folder")))
    assert retry_unless_user_error(None, None, Failed(data=ServiceUnavailable("MLflow down")))
    assert retry_unless_user_error(None, None, Failed(data=RuntimeError("bug")))


def _task_messages(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r.state.message for r in runs if r.state and r.state.is_failed()}


def test_unreachable_mlflow_fails_the_flow_in_seconds_with_the_cli_message(harness, monkeypatch):
    from flows.lifecycle import evaluate_model
    from medsam2.services import check_mlflow

    uri = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(ServiceUnavailable) as direct:
        check_mlflow()
    t0 = time.monotonic()
    state = evaluate_model(model="models:/medsam2@champion", return_state=True)
    assert time.monotonic() - t0 < 30  # the check, not minutes of client retries
    assert state.is_failed()
    assert state.message == failure_message(direct.value)
    assert state.message.splitlines()[0] == describe(direct.value).error and uri in state.message
    with pytest.raises(ServiceUnavailable):
        state.result()


def test_a_config_mistake_fails_train_with_the_cli_message(harness, monkeypatch, tmp_path):
    from flows.train import resolve_cfg, train_medsam2

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = ["train.lrr=1e-4"]
    with pytest.raises(Exception) as direct:
        resolve_cfg(None, overrides, str(tmp_path))
    state = train_medsam2(source=None, config=None, overrides=overrides, workdir=str(tmp_path), return_state=True)
    assert state.is_failed() and describe(direct.value).kind == "usage"
    assert state.message == failure_message(direct.value)
    assert "train.lr" in state.message and "Traceback" not in state.message


def test_a_failing_task_gives_its_flow_and_itself_the_same_message(harness, tmp_path):
    from flows.lifecycle import validate_data
    from medsam2 import steps

    res = steps.run_validate(str(tmp_path))  # no manifest in this work dir: the suite fails
    assert not res["success"]
    want = describe(InputDataError("data validation failed: " + "; ".join(res["failures"]))).error
    state = validate_data(workdir=str(tmp_path), return_state=True)
    assert state.is_failed()
    assert state.message.splitlines()[0] == want, state.message
    tasks = _task_messages(state.state_details.flow_run_id)
    assert tasks.get("validate", "").splitlines()[0] == want, tasks
    with pytest.raises(InputDataError):
        state.result()
