"""Flows and tasks fail with the CLI's message: :func:`medsam2.errors.describe`'s one line (and its hint) as the
Prefect state message, not ``Flow run encountered an exception: ValueError: …`` with a traceback.

``@reported`` (under ``@flow``) turns an exception of the body into ``Failed(message=…, data=exc)``: the message
is the error line, then the hint line; the data keeps the exception, so a caller that runs the flow in Python (a
parent flow, a test) still gets it raised from ``state.result()``. ``@reported_task(…)`` (instead of ``@task``)
does the same for a task, whose caller gets the exception raised (a Prefect task that *returns* a failed state
would hand its caller the state object instead). Tasks retry only what a
retry can fix (:func:`retry_unless_user_error`): an unreachable service or an internal error, never a usage or
input-data mistake.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from prefect import Task, get_run_logger
from prefect.exceptions import MissingContextError
from prefect.states import Failed, State

from medsam2.errors import describe

F = TypeVar("F", bound=Callable[..., Any])


def failure_message(exc: BaseException) -> str:
    """The state message of a run that raised ``exc``: ``describe(exc).error``, then the hint on a second line."""
    report = describe(exc)
    return report.error + (f"\n{report.hint}" if report.hint else "")


def failed_state(exc: BaseException) -> State:
    """``Failed`` with :func:`failure_message` (also logged, with the kind, to the run's log) and ``exc`` as data."""
    report = describe(exc)
    try:
        get_run_logger().error("%s [%s]", "\n".join(report.lines()), report.kind)
    except MissingContextError:
        pass
    return Failed(message=failure_message(exc), data=exc)


def reported(fn: F) -> F:
    """Wrap a flow or task body so an exception becomes :func:`failed_state` (signature and docstring kept, so
    Prefect's parameter schema and UI form are unchanged). The annotations are resolved here, in ``fn``'s module
    (``from __future__ import annotations`` leaves them as strings that Prefect would resolve in this one)."""
    hints = typing.get_type_hints(fn, include_extras=True)
    sig = inspect.signature(fn)
    sig = sig.replace(parameters=[p.replace(annotation=hints.get(p.name, p.annotation))
                                  for p in sig.parameters.values()],
                      return_annotation=hints.get("return", sig.return_annotation))

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure gets the one message
            return failed_state(exc)

    wrapper.__signature__ = sig  # type: ignore[attr-defined]
    wrapper.__annotations__ = hints
    return wrapper  # type: ignore[return-value]


def retry_unless_user_error(task: Any, task_run: Any, state: State) -> bool:
    """``retry_condition_fn`` of the I/O tasks: retry a service or internal failure, not a usage/input one."""
    exc = state.data if isinstance(state.data, BaseException) else None
    return exc is None or describe(exc).kind in ("service", "internal")


class ReportedTask(Task):
    """A task whose body is :func:`reported`: its failed state carries the CLI's message, and calling it in a
    flow returns the result or raises the body's exception, as a plain task does."""

    def __call__(self, *args: Any, return_state: bool = False, **kwargs: Any) -> Any:
        state = super().__call__(*args, return_state=True, **kwargs)
        return state if return_state else state.result()


def reported_task(**options: Any) -> Callable[[Callable[..., Any]], ReportedTask]:
    """``@reported_task(name=…, retries=…)``: ``@task(…)`` over a :func:`reported` body."""
    return lambda fn: ReportedTask(fn=reported(fn), **options)
