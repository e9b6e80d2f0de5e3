"""Error kinds: what went wrong, whose move it is, and the exit code the CLI gives it.

A user's mistake is one of four kinds, each with an exit code (``medsam2`` exits with it, ``--json`` names it):

========  ====  ==========================================================================================
kind      exit  examples
========  ====  ==========================================================================================
usage     2     a wrong option or argument, a bad ``--set`` key or value, an invalid layout or config file
input     3     a missing source folder, an unreadable or unsupported file, an unknown model path or URI
service   4     MLflow, Prefect, S3 or Ray is not reachable
internal  1     anything else: a bug (the message says so; ``--debug`` shows the traceback)
========  ====  ==========================================================================================

Library code raises the classes below (each also subclasses the builtin a caller would expect, so
``except ValueError`` / ``except FileNotFoundError`` keep working). :func:`describe` maps *any* exception to an
:class:`ErrorReport` — the library's own kinds, and well-known foreign ones (pydantic, click, connection errors,
MLflow's "does not exist") — so the CLI and the flows print the same one or two lines for the same mistake.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Kind = Literal["usage", "input", "service", "internal"]

#: kind → process exit code
EXIT_CODES: dict[str, int] = {"usage": 2, "input": 3, "service": 4, "internal": 1}

_PACKAGES = tuple(str(Path(__file__).resolve().parents[1] / p) for p in ("medsam2", "flows", "tuning"))


class MedsamError(Exception):
    """Base of the library's user-facing errors: ``message`` (what is wrong, and where) and ``hint`` (what to
    do). ``str(err)`` is the message."""

    kind: Kind = "internal"

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(MedsamError, ValueError):
    """A wrong option, argument, config key or value (exit 2)."""

    kind: Kind = "usage"


class ConfigError(UsageError):
    """An experiment config that does not validate: unknown key, bad value, invalid combination (exit 2)."""


class InputDataError(MedsamError, ValueError):
    """The data given cannot be used: a missing source, a bad file, an unknown model (exit 3)."""

    kind: Kind = "input"


class ServiceUnavailable(MedsamError, ConnectionError):
    """A service the command needs (MLflow, Prefect, S3, Ray) does not answer (exit 4)."""

    kind: Kind = "service"


class InternalError(MedsamError, RuntimeError):
    """The code broke one of its own invariants: a bug, never the user's mistake (exit 1)."""

    kind: Kind = "internal"


class RequestError(Exception):
    """A served request the server refuses: ``status`` (HTTP: 413 a limit, 422 a bad field, 403 a refused path)
    and ``message`` (one sentence for the client, naming the record and the field; no server path)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class ErrorReport:
    """What the CLI prints for an exception: ``error`` (one line), ``kind``, ``hint`` (one line or None)."""

    error: str
    kind: Kind
    hint: str | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.kind]

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.error, "kind": self.kind, "hint": self.hint}

    def lines(self) -> list[str]:
        """The one or two lines a person reads: ``Error: …`` and, if any, ``  hint: …``."""
        return [f"Error: {self.error}"] + ([f"  {self.hint}"] if self.hint else [])


_DEBUG_HINT = "rerun with --debug (or MEDSAM2_DEBUG=1) for the traceback"
_BUG_HINT = f"this is a bug in medsam2: please report it; {_DEBUG_HINT}"

#: Exception class names (any module) that mean "could not connect", when their module is not importable here.
_CONNECTION_NAMES = {
    "ConnectionError",  # requests.exceptions / builtins
    "ConnectTimeout",
    "MaxRetryError",
    "NewConnectionError",
    "EndpointConnectionError",  # botocore
    "ConnectTimeoutError",
    "ConnectionClosedError",
    "ConnectError",  # httpx
    "ConnectionRefusedError",
}
_CONNECTION_TEXT = ("Max retries exceeded", "Connection refused", "Failed to establish a new connection",
                    "Could not connect to the endpoint URL", "Name or service not known")


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _raised_in_our_code(exc: BaseException) -> bool:
    """True when the innermost frame of ``exc`` is in medsam2/, flows/ or tuning/ (a ``raise`` we wrote, with a
    message meant for the user), not deep inside a third-party library."""
    tb = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    return bool(tb) and str(Path(tb[-1].filename).resolve()).startswith(_PACKAGES)


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in out and len(out) < 8:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _is_connection_error(exc: BaseException) -> bool:
    for e in _chain(exc):
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in _CONNECTION_NAMES:
            return True
        if type(e).__name__ in ("MlflowException", "RestException") and any(t in str(e) for t in _CONNECTION_TEXT):
            return True
    return False


#: Exception → MedsamError translators registered by higher layers (``medsam2.config``: a pydantic ValidationError
#: of an experiment config → its ConfigError), so this module stays the bottom of the import graph.
_TRANSLATORS: list[Callable[[BaseException], MedsamError | None]] = []


def register_translator(fn: Callable[[BaseException], MedsamError | None]) -> None:
    """Let :func:`describe` turn some foreign exception into one of ours (``fn`` returns None for the others)."""
    if fn not in _TRANSLATORS:
        _TRANSLATORS.append(fn)


def describe(exc: BaseException) -> ErrorReport:
    """Any exception → the :class:`ErrorReport` the CLI prints (see the module docstring for the kinds)."""
    if isinstance(exc, MedsamError):
        return ErrorReport(_one_line(exc.message), exc.kind, exc.hint)
    name = type(exc).__name__
    for translate in _TRANSLATORS:
        err = translate(exc)
        if err is not None:
            return describe(err)
    if name == "QuarantineError":  # a file the readers refuse (medsam2.data.readers)
        return ErrorReport(_one_line(str(exc)), "input", "check the file, or convert it to PNG/TIFF/DICOM/NIfTI")
    if _is_connection_error(exc):
        return ErrorReport(_one_line(f"a service is not reachable: {exc}"), "service",
                           "start the local services with `make up` (or check the URI and your network)")
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return ErrorReport(_one_line(str(exc)), "input", "check the path")
    if isinstance(exc, PermissionError):
        return ErrorReport(_one_line(str(exc)), "input", "check the file's permissions")
    if name in ("MlflowException", "RestException"):
        code = str(getattr(exc, "error_code", ""))
        if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return ErrorReport(_one_line(str(exc)), "input",
                               "check the model URI: models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model")
    if isinstance(exc, KeyError) and "known:" in str(exc):  # Registry.get: an unknown variant name
        return ErrorReport(_one_line(str(exc).strip("'\"")), "usage", None)
    if isinstance(exc, (ValueError, LookupError)) and not isinstance(exc, (KeyError, IndexError)):
        if _raised_in_our_code(exc):  # our own `raise ValueError(...)`: a message written for the user
            return ErrorReport(_one_line(str(exc)), "usage", _DEBUG_HINT)
    return ErrorReport(_one_line(f"internal error: {name}: {exc}"), "internal", _BUG_HINT)
