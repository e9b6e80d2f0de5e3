"""The ``medsam2`` typer app: error reporting, shared options and checks (commands live beside it).

``medsam2`` command line (typer). Every command takes ``--json`` and then prints one JSON object on its last
stdout line. Config: ``--config FILE.yaml`` and repeated ``--set key=value`` (dotted, e.g. ``train.lr=1e-4``).

Errors take one path for every command (:class:`_Group`): a mistake prints ``Error: what, where`` and a hint
line on stderr, and, with ``--json``, ``{"error": …, "kind": …, "hint": …}`` as the last stdout line. The exit
code says the kind (:data:`medsam2.errors.EXIT_CODES`): 2 usage or config, 3 input data, 4 unreachable service,
1 internal error. A traceback is shown only with ``--debug`` or ``MEDSAM2_DEBUG=1``. Commands that need a
server check it first (:mod:`medsam2.services`), so a stopped server is an answer in seconds, not minutes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

from medsam2.errors import EXIT_CODES, ErrorReport, InputDataError, describe


def _click_class(name: str) -> type[Exception]:
    """A click exception class as typer raises it (typer ≥ 0.16 vendors its own click as ``typer._click``)."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)


_USAGE_ERRORS = (_click_class("UsageError"), click.UsageError)
_CLICK_ERRORS = (_click_class("ClickException"), click.ClickException)
_ABORTS = (typer.Abort, click.Abort)


def _debug_on(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("MEDSAM2_DEBUG", "").lower() in ("1", "true", "yes")


def _report_error(report: ErrorReport, argv: list[str], exc: BaseException | None) -> None:
    if exc is not None and _debug_on(argv):
        traceback.print_exception(exc, file=sys.stderr)
    sys.stderr.write("\n".join(report.lines()) + "\n")
    if "--json" in argv:
        sys.stdout.write(json.dumps(report.to_dict(), default=str) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()


class _Group(TyperGroup):
    """The ``medsam2`` group: runs a command and turns every exception into one error report and exit code."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if not standalone_mode:  # a caller that handles errors itself
            return super().main(args=argv, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        try:
            rc = super().main(args=argv, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
        except _USAGE_ERRORS as e:
            if type(e).__name__ == "NoArgsIsHelpError" or not argv:
                e.show()
                sys.exit(e.exit_code)
            cmd = e.ctx.command_path if e.ctx is not None else self._command_path(argv, prog_name)
            _report_error(ErrorReport(e.format_message(), "usage", f"see `{cmd} --help`"), argv, e)
            sys.exit(EXIT_CODES["usage"])
        except _CLICK_ERRORS as e:
            _report_error(ErrorReport(e.format_message(), "usage", None), argv, e)
            sys.exit(e.exit_code)
        except _ABORTS:
            sys.stderr.write("Aborted!\n")
            sys.exit(1)
        except Exception as e:  # noqa: BLE001 - the one place every error is reported
            report = describe(e)
            _report_error(report, argv, e)
            sys.exit(report.exit_code)
        sys.exit(rc if isinstance(rc, int) else 0)

    def _command_path(self, argv: list[str], prog_name: str | None) -> str:
        name = next((a for a in argv if a in self.commands), None)
        return " ".join(p for p in ("medsam2", name) if p)


class _ChoicesHelp(TyperCommand):
    """A command whose ``--help`` ends with the config's choices (``model.adapter: bottleneck, …``), read from
    the registries when the help is shown, so a newly registered variant is listed without editing the CLI."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        from medsam2.config import ExperimentCfg
        from medsam2.config_input import choices

        self.epilog = "Choices (--set KEY=VALUE):\n\n" + "\n\n".join(
            f"{key}: {', '.join(names)}" for key, names in choices(ExperimentCfg).items())
        super().format_help(ctx, formatter)


app = typer.Typer(cls=_Group, help="Fine-tune SAM2 for medical image segmentation.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
console = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on the last stdout line.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML experiment config.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Dotted override key=value (repeatable).")]

_MODEL_URI = re.compile(r"^(models|runs|mlflow-artifacts|s3|gs|https?|file|dbfs):", re.IGNORECASE)


def _emit(obj: dict[str, Any], as_json: bool, human: str | None = None) -> None:
    if as_json:
        sys.stdout.write(json.dumps(obj, default=str) + "\n")
    else:
        console.print(human or json.dumps(obj, indent=2, default=str))


def _cfg(config: Path | None, overrides: list[str] | None):
    from medsam2.config import load_config

    return load_config(config, overrides)


def _needs_mlflow(configured: str | None = None) -> None:
    """Check the tracking server (when it is http(s)) before any work; ServiceUnavailable in ≤ 3 s if down."""
    from medsam2.services import check_mlflow

    check_mlflow(configured)


def _tracking_override(overrides: list[str] | None, config: Path | None = None) -> str | None:
    """``tracking.tracking_uri`` from ``--set`` (else the ``--config`` file), without validating the rest."""
    import yaml

    from medsam2.config import parse_overrides

    uri = (parse_overrides(overrides).get("tracking") or {}).get("tracking_uri")
    if uri is None and config is not None and config.is_file():
        loaded = yaml.safe_load(config.read_text()) or {}
        uri = ((loaded.get("tracking") or {}) if isinstance(loaded, dict) else {}).get("tracking_uri")
    return uri


def _check_model(model: str) -> None:
    """A model argument is an existing checkpoint file or an MLflow model URI (then the server is checked)."""
    if Path(model).exists():
        return
    if not _MODEL_URI.match(model):
        raise InputDataError(f"no model at {model!r}: it is not a file and not an MLflow model URI",
                             "give a checkpoint file (.pt) or a model URI: models:/medsam2@champion, "
                             "models:/medsam2/VERSION or runs:/RUN_ID/model")
    if model.lower().startswith(("models:", "runs:", "mlflow-artifacts:")):
        _needs_mlflow()


def _check_workdir(workdir: str | None, what: str) -> None:
    """``workdir`` holds a manifest, else an input error saying to ingest first."""
    if workdir is None:
        return
    from medsam2.data.manifest import MANIFEST_NAME

    if not (Path(workdir) / MANIFEST_NAME).is_file():
        raise InputDataError(f"no manifest in work dir {workdir!r} ({what} reads {MANIFEST_NAME})",
                             f"ingest data first: medsam2 ingest SOURCE --workdir {workdir} (or set data.workdir)")


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error (or MEDSAM2_DEBUG=1).")
                     ] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _default_workdir() -> str:
    """The work dir a config without ``data.workdir`` uses, so ``ingest`` and ``train`` agree by default."""
    from medsam2.config import default_workdir

    return default_workdir()


