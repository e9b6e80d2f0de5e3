"""``medsam2`` command line: the typer ``app`` (``cli/app.py``: error reporting, shared options and checks) and
its commands, one module per group: ``data_cmds`` (ingest, validate), ``model_cmds`` (train, evaluate, promote,
rollback, sweep, retrain-check, champion), ``infer_cmds`` (predict, suggest, export). The order of the imports
is the order of the commands in ``--help``."""

# isort: off
from medsam2.cli import data_cmds, model_cmds, infer_cmds  # noqa: F401 (registers the commands)
from medsam2.cli.app import app
# isort: on

__all__ = ["app"]
