"""``medsam2 ingest`` and ``medsam2 validate``: data into a work dir."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medsam2.cli.app import (
    JsonOpt,
    _check_workdir,
    _default_workdir,
    _emit,
    app,
)
from medsam2.errors import UsageError


@app.command()
def ingest(
    source: Annotated[str, typer.Argument(help="Folder or s3://bucket/prefix.")],
    workdir: Annotated[str | None, typer.Option(
        help="Work dir for manifest, quarantine and cache (default $MEDSAM2_HOME/work).")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset name (default: the folder name).")] = None,
    layout: Annotated[Path | None, typer.Option(help="YAML mapping for your own folder layout.")] = None,
    s3_endpoint_url: Annotated[str | None, typer.Option(help="S3 endpoint (MinIO, moto).")] = None,
    labels: Annotated[bool, typer.Option(
        help="SOURCE is a folder of masks for images already in the work dir (a .json SOURCE is a Label Studio "
             "export and always a label source).")] = False,
    json_: JsonOpt = False,
) -> None:
    """Ingest images (+ masks) into the manifest, or labels that came back (--labels, or a Label Studio export
    .json); bad inputs go to quarantine with a reason."""
    import yaml

    from medsam2.steps import run_ingest

    lay = None
    if layout is not None:
        if not layout.is_file():
            raise UsageError(f"layout file {str(layout)!r} does not exist", "pass a YAML file to --layout")
        try:
            lay = yaml.safe_load(layout.read_text())
        except yaml.YAMLError as e:
            raise UsageError(f"layout {layout}: not valid YAML: {' '.join(str(e).split())}", "fix the file") from None
    workdir = workdir or _default_workdir()
    if labels or source.lower().endswith(".json"):
        res = run_ingest(source, workdir, labels=True)
    else:
        res = run_ingest(source, workdir, dataset=dataset, layout=lay, s3_endpoint_url=s3_endpoint_url)  # S3 first
    _emit(res, json_, f"added {res['added']}, unchanged {res['unchanged']}, quarantined {res['quarantined']}, "
                      f"rows {res['rows']}, dataset version {res['dataset_version']}")


@app.command()
def validate(
    workdir: Annotated[str | None, typer.Option(
        help="Work dir holding manifest.parquet (default $MEDSAM2_HOME/work).")] = None,
    data_docs: Annotated[str | None, typer.Option(help="Where to write the Data Docs HTML.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Run the great-expectations suite over the manifest; exits 1 with a readable report if it fails."""
    from medsam2.steps import run_validate

    workdir = workdir or _default_workdir()
    _check_workdir(workdir, "validate")
    res = run_validate(workdir, data_docs)
    human = "validation passed" if res["success"] else "validation FAILED:\n- " + "\n- ".join(res["failures"])
    _emit(res, json_, human)
    if not res["success"]:
        raise typer.Exit(1)


