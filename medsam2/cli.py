"""``medsam2`` command line (typer). Every command takes ``--json`` and then prints one JSON object on its last
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

from medsam2.errors import EXIT_CODES, ErrorReport, InputDataError, UsageError, describe


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


@app.command(cls=_ChoicesHelp)
def train(
    config: ConfigOpt = None, set_: SetOpt = None, json_: JsonOpt = False,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster for train.num_workers > 1 (or RAY_ADDRESS); default: a local Ray.")] = None,
    max_failures: Annotated[int, typer.Option(
        help="train.num_workers > 1: restarts of the worker group after a worker dies (from the last "
             "checkpoint).")] = 1,
) -> None:
    """Fine-tune SAM2 (tracked in MLflow); a rerun with the same settings resumes. train.num_workers=N trains
    one model on N data-parallel workers (Ray Train)."""
    cfg = _cfg(config, set_)
    _check_workdir(cfg.data.workdir, "train")
    _needs_mlflow(cfg.tracking.tracking_uri)
    if cfg.train.num_workers > 1:
        from medsam2.services import check_ray

        check_ray(address)
        try:
            from tuning.distributed import run_train_distributed
        except ImportError as exc:  # tuning/ ships with the same distribution; only a broken install gets here
            raise typer.BadParameter(f"the tuning package is not importable: {exc}") from exc
        res = run_train_distributed(cfg, address=address, max_failures=max_failures, quiet=json_)
    else:
        from medsam2.steps import run_train

        res = run_train(cfg)
    _emit(res, json_, f"run {res['run_id']}: {res['steps']} steps on {res['num_workers']} worker(s), "
                      f"metrics {res['metrics']}, model {res['model_uri']}")


@app.command()
def evaluate(
    model: Annotated[str, typer.Option(help="Checkpoint path or MLflow model URI (models:/medsam2@champion).")],
    workdir: Annotated[str | None, typer.Option(help="Work dir (default: the model's training work dir).")] = None,
    run_id: Annotated[str | None, typer.Option(help="Log into this MLflow run (default: a new run).")] = None,
    report: Annotated[str | None, typer.Option("--report", help="Report directory.")] = None,
    robustness: Annotated[bool, typer.Option(help="Add the corruption suite.")] = False,
    cross_dataset: Annotated[bool, typer.Option(help="Evaluate on every labelled dataset's test rows.")] = False,
    flags: Annotated[bool, typer.Option(help="Failure flags: calibrate predicted IoU → Dice on val, mark test images "
                                              "'needs review' and report the flags' precision/recall.")] = True,
    review_below: Annotated[float | None, typer.Option(help="Needs review below this calibrated confidence "
                                                            "(default 0.7).")] = None,
    volumes: Annotated[Path | None, typer.Option(
        help="YAML/JSON list of volumes ({image, label, labels: [ids], name}): 3-D Dice/HD95/NSD of SAM2's memory "
             "from the key slice's prompt, beside the oracle slice-by-slice and the key prompt on every slice.")
                       ] = None,
    volumes_only: Annotated[bool, typer.Option(help="With --volumes: skip the manifest's test images.")] = False,
    set_: SetOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Dice/IoU/precision/recall/HD95 on the frozen test split, baselines beside it, failure flags, HTML report;
    with --volumes also per-volume 3-D metrics (volumes/volumes.html in the report directory)."""
    from medsam2.steps import run_evaluate

    overrides = list(set_ or [])
    if volumes is not None:
        overrides.append(f"eval.volumes={_volume_list(volumes)}")
    if volumes_only:
        if volumes is None:
            raise UsageError("--volumes-only needs --volumes FILE")
        overrides.append("eval.images=false")
    if robustness:
        overrides.append("eval.robustness=true")
    if cross_dataset:
        overrides.append("eval.cross_dataset=true")
    tracking_uri = _tracking_override(overrides)  # also validates the --set syntax before any work
    _check_model(model)
    _check_workdir(workdir, "evaluate")
    _needs_mlflow(tracking_uri)
    res = run_evaluate(model, overrides, workdir=workdir, run_id=run_id, report_dir=report, flags=flags,
                       review_below=review_below)
    m = res["metrics"]
    lines = []
    if res.get("report"):
        lines.append(f"test Dice {m.get('test_dice', float('nan')):.4f} (ellipse-in-box baseline "
                     f"{m.get('baseline_ellipse_in_box_dice', float('nan')):.4f}) on {res['n_images']} images; "
                     f"report {res['report']}")
    if res.get("volume_report"):
        lines.append(f"volume Dice: memory {m['volume_memory_dice']:.4f}, oracle slice prompts "
                     f"{m['volume_oracle_slice_prompts_dice']:.4f}, key prompt on every slice "
                     f"{m['volume_key_prompt_every_slice_dice']:.4f} on {res['n_volumes']} volumes; "
                     f"report {res['volume_report']}")
    _emit(res, json_, "\n".join(lines))


def _volume_list(path: Path) -> str:
    """``--volumes FILE`` (a YAML or JSON list of volume cases) → the JSON text of ``eval.volumes``."""
    import yaml

    if not path.is_file():
        raise InputDataError(f"--volumes {path}: no such file", "give a YAML/JSON list of {image, label, labels}")
    cases = yaml.safe_load(path.read_text())
    if not isinstance(cases, list):
        raise UsageError(f"--volumes {path} must hold a list of {{image, label, labels, name}}")
    base = path.parent
    for c in cases:  # paths relative to the file
        for k in ("image", "label"):
            if isinstance(c, dict) and isinstance(c.get(k), str) and not Path(c[k]).is_absolute():
                c[k] = str(base / c[k])
    return json.dumps(cases)


@app.command()
def promote(
    model: Annotated[str, typer.Option(help="MLflow model URI of the candidate.")],
    eval_run_id: Annotated[str, typer.Option(help="Run holding the candidate's evaluation.")],
    config: ConfigOpt = None, set_: SetOpt = None, json_: JsonOpt = False,
) -> None:
    """Register the candidate; alias champion only if it beats its trivial baseline and the champion on the
    selection split (paired bootstrap), else challenger. The test results are reported, not decided on."""
    from medsam2.steps import run_promote

    cfg = _cfg(config, set_)
    _needs_mlflow(cfg.tracking.tracking_uri)
    res = run_promote(model, eval_run_id, cfg)
    verdict = "promoted to champion" if res["promoted"] else "rejected, stays challenger"
    test = res.get("test_metrics") or {}
    reported = f" (test Dice {test['test_dice']:.4f}, reported only)" if "test_dice" in test else ""
    _emit(res, json_, f"version {res['version']} {verdict}: {res.get('summary') or '; '.join(res['reasons'])}"
                      f"{reported}\n  " + "\n  ".join(res["reasons"]))


@app.command()
def rollback(
    model_name: Annotated[str, typer.Option(help="Registered model name.")] = "medsam2", json_: JsonOpt = False
) -> None:
    """Give the champion alias back to the previous champion."""
    _needs_mlflow()
    from medsam2.tracking import rollback as do_rollback

    res = do_rollback(model_name)
    _emit(res, json_, f"champion is now version {res['champion']}")


@app.command()
def predict(
    inputs: Annotated[list[Path] | None, typer.Argument(help="Images (PNG/JPEG/TIFF/DICOM/NIfTI/NPY).")] = None,
    model: Annotated[str, typer.Option(help="Checkpoint path or MLflow model URI.")] = ...,  # type: ignore[assignment]
    out: Annotated[Path, typer.Option(help="Output directory.")] = ...,  # type: ignore[assignment]
    box: Annotated[list[str] | None, typer.Option(
        help="x0,y0,x1,y1 in pixels, for every input (box-prompted models); with --volume: once, or once per "
             "--slice.")] = None,
    points: Annotated[list[str] | None, typer.Option(
        help="x,y[,label];x,y[,label]… for every input (point-prompted); with --volume: once, or once per "
             "--slice.")] = None,
    volume: Annotated[Path | None, typer.Option(
        help="A NIfTI file or a DICOM series folder: prompt --slice Z, SAM2's memory segments the whole volume "
             "(NIfTI label volume out; also a DICOM-SEG for DICOM).")] = None,
    slice_: Annotated[list[int] | None, typer.Option(
        "--slice", help="With --volume: the prompted slice (repeatable; NIfTI: RAS+ axial index, inferior to "
                        "superior; DICOM: position order).")] = None,
    mask: Annotated[list[str] | None, typer.Option(
        help="With --volume: a binary PNG of the slice as its prompt (once, or once per --slice).")] = None,
    series: Annotated[str | None, typer.Option(
        help="With --volume on a folder of several series: the SeriesInstanceUID (or SeriesNumber) to use.")
                      ] = None,
    prompts: Annotated[Path | None, typer.Option(
        help="CSV or JSON with one prompt per image: columns/keys image, box (x0,y0,x1,y1) or x0,y0,x1,y1, "
             "points (x,y[,label];…), labels, id. Relative image paths are relative to the file.")] = None,
    workdir: Annotated[str | None, typer.Option(help="Segment manifest rows with their boxes (ingest cache).")
                       ] = None,
    ids: Annotated[list[str] | None, typer.Option("--id", help="Manifest image id (repeatable; default: all rows "
                                                               "of --workdir).")] = None,
    engine: Annotated[str, typer.Option(
        help="torch, or onnx: ONNX Runtime on an export (--model is the export directory, or a registered model "
             "with an export logged by medsam2 export).")] = "torch",
    precision: Annotated[str, typer.Option(
        help="auto, fp32, bf16 (PyTorch autocast; CPUs without native bf16 run fp32), or int8 (--engine onnx, "
             "an export made with --quantize int8).")] = "auto",
    calibration: Annotated[Path | None, typer.Option(
        help="calibration.json of an evaluation report: adds each mask's confidence (expected Dice) and "
             "needs_review.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Segment images, one output per input: a PNG mask (and a DICOM-SEG for DICOM input) each.

    Prompts: --box/--points for every input; --prompts FILE for one prompt per image; or --workdir [--id …] for
    a manifest's rows and boxes. An input that fails (unreadable, no box, box outside the image) is reported
    in the JSON (status "failed", error, kind) and the others still run; the exit code is 0 unless every input
    failed (then 3, input data).
    """
    from medsam2.engine.prompt_sources import collect

    if volume is not None:
        if engine != "torch":
            raise UsageError(f"--engine {engine} has no memory path: --volume runs on PyTorch",
                             "drop --engine (or give --engine torch)")
        return _predict_volume(model, volume, slice_, out, box, points, mask, series, precision, json_,
                               inputs or prompts or workdir or ids)
    if slice_ or mask or series:
        raise UsageError("--slice, --mask and --series go with --volume")
    if len(box or []) > 1 or len(points or []) > 1:
        raise UsageError("--box/--points are given once for every input image; repeat them only with --volume",
                         "use --prompts FILE for one prompt per image")
    box, points = (box or [None])[0], (points or [None])[0]
    if workdir is not None and not (prompts or box or points or inputs):
        _check_workdir(workdir, "predict")
    if engine not in ("torch", "onnx"):
        raise UsageError(f"--engine {engine!r} is not one of torch, onnx")
    if precision not in ("auto", "fp32", "bf16", "int8"):
        raise UsageError(f"--precision {precision!r} is not one of auto, fp32, bf16, int8")
    items = collect(list(inputs or []), box=box, points=points, prompts=prompts, workdir=workdir, ids=ids)
    _check_model(model)
    from medsam2.predict_files import predict_files

    cal = None
    if calibration is not None:
        from medsam2.eval.calibration import Calibrator

        if not calibration.is_file():
            raise InputDataError(f"--calibration {str(calibration)!r} is not a file",
                                 "give the calibration.json of a medsam2 evaluate report")
        try:
            cal = Calibrator.load(calibration)
        except (ValueError, KeyError) as e:
            raise InputDataError(f"--calibration {calibration}: {e}", "give the calibration.json of a medsam2 "
                                 "evaluate report") from None
    res = predict_files(model, items, out, engine=engine, precision=precision, calibration=cal)
    failed = [o for o in res["outputs"] if o["status"] != "ok"]
    review = [o for o in res["outputs"] if o.get("needs_review")]
    _emit(res, json_, f"wrote {res['n_ok']} masks to {out}"
          + (f"; {len(review)} need review" if cal is not None else "") + "".join(
        f"\n  failed: {o['input']}: {o['error']}" for o in failed))
    if res["n_ok"] == 0:
        raise InputDataError(f"every input failed ({len(failed)}); first: {failed[0]['input']}: {failed[0]['error']}",
                             "see the outputs' errors (--json) and fix the inputs or prompts")


def _predict_volume(model: str, volume: Path, slices: list[int] | None, out: Path, box: list[str] | None,
                    points: list[str] | None, mask: list[str] | None, series: str | None, precision: str,
                    json_: bool, other_inputs: Any) -> None:
    """``medsam2 predict --volume``: :func:`medsam2.predict_volume.predict_volume`."""
    if other_inputs:
        raise UsageError("--volume takes its prompts from --slice/--box/--points/--mask",
                         "give images, --prompts or --workdir without --volume")
    if precision not in ("auto", "fp32", "bf16"):
        raise UsageError(f"--precision {precision!r}: a volume runs on PyTorch, with auto, fp32 or bf16")
    _check_model(model)
    from medsam2.predict_volume import predict_volume

    res = predict_volume(model, volume, list(slices or []), out, boxes=box, points=points, masks=mask,
                         series=series, precision=precision)
    note = " (RANDOM-INIT weights)" if res["random_init"] else ""
    _emit(res, json_, f"wrote {res['nifti']}" + (f" and {res['dicom_seg']}" if "dicom_seg" in res else "")
          + f": {res['foreground_slices']}/{res['slices']} slices with foreground, {res['volume_ml']} mL{note}")


@app.command()
def suggest(
    model: Annotated[str, typer.Option(help="Checkpoint path or MLflow model URI.")] = ...,  # type: ignore[assignment]
    workdir: Annotated[str, typer.Option(help="Ingested work dir whose unlabelled train images are ranked.")
                       ] = ...,  # type: ignore[assignment]
    budget: Annotated[int, typer.Option(help="How many images to queue for labelling.")] = ...,  # type: ignore[assignment]
    out: Annotated[Path, typer.Option(help="Queue directory (CSV, Label Studio JSON, overlays, DICOM-SEG).")
                   ] = ...,  # type: ignore[assignment]
    score: Annotated[str, typer.Option(help="Acquisition score (medsam2.active.scores.ACQUISITIONS).")] = "entropy",
    seed: Annotated[int, typer.Option(help="Seed of the random score.")] = 0,
    label: Annotated[str, typer.Option(help="Label name of the Label Studio brush labels.")] = "lesion",
    image_url_prefix: Annotated[str | None, typer.Option(
        help="URL prefix of the tasks' images (default /data/local-files/?d=<out folder name>/images/: Label "
             "Studio's local files with LOCAL_FILES_DOCUMENT_ROOT = the folder above --out).")] = None,
    json_: JsonOpt = False,
) -> None:
    """Which unlabelled images to label next: rank the pool (never val/test rows) and write a labelling queue
    with the model's masks as Label Studio pre-annotations."""
    from medsam2.active.scores import ACQUISITIONS
    from medsam2.steps import run_suggest

    if score not in ACQUISITIONS:
        raise UsageError(f"--score {score!r} is not one of {', '.join(ACQUISITIONS.names())}")
    _check_workdir(workdir, "suggest")
    _check_model(model)
    res = run_suggest(model, workdir, budget, out, score=score, seed=seed, label=label,
                      image_url_prefix=image_url_prefix)
    _emit(res, json_, f"queued {res['n']} of {res['pool']} unlabelled images by {score} in {out} "
                      f"(queue.csv, labelstudio.json, overlays/)")


@app.command()
def export(
    model: Annotated[str, typer.Option(help="Checkpoint path or MLflow model URI.")] = ...,  # type: ignore[assignment]
    out: Annotated[Path, typer.Option(help="Export directory (new, empty, or an earlier export to replace).")
                   ] = ...,  # type: ignore[assignment]
    format_: Annotated[str, typer.Option("--format", help="onnx (an encoder and a prompt+decoder graph).")] = "onnx",
    quantize: Annotated[str | None, typer.Option(help="int8: also write dynamically quantised graphs.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Export a model for ONNX Runtime; a registered model also gets the export logged beside it.

    The export is checked before it is written: ONNX Runtime's logits must match PyTorch fp32 within 1e-3.
    Predict with it: medsam2 predict IMAGES --model DIR --engine onnx (or --model models:/… --engine onnx).
    """
    if format_ != "onnx":
        raise UsageError(f"--format {format_!r} is not supported", "use --format onnx")
    if quantize not in (None, "int8"):
        raise UsageError(f"--quantize {quantize!r} is not supported", "use --quantize int8 or leave it out")
    _check_model(model)
    from medsam2.steps import run_export

    res = run_export(model, out, quantize=quantize)
    _emit(res, json_, f"exported {model} to {out} ({', '.join(res['files'])}); ONNX vs PyTorch logits max "
                      f"|diff| {res['parity_fp32']['logits_max_abs']:.1e}"
          + (f"; logged as {res['logged']['artifact_uri']}" if res.get("logged") else ""))


@app.command()
def sweep(
    space: Annotated[str, typer.Option(help="Search space name (see tuning/spaces.py).")] = "smoke",
    num_samples: Annotated[int, typer.Option(help="Number of trials.")] = 4,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (or RAY_ADDRESS).")] = None,
    search: Annotated[str, typer.Option(help="random | optuna (TPE, seeded by --seed).")] = "random",
    seed: Annotated[int | None, typer.Option(help="Search seed: the same seed samples the same configs.")] = None,
    storage: Annotated[str | None, typer.Option(help="Ray results dir or URI (default $MEDSAM2_HOME/ray_results).")
                       ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the latest sweep of this space + config in --storage "
                                               "(unfinished and errored trials, same MLflow parent run).")] = False,
    gpus_per_trial: Annotated[float | None, typer.Option(help="GPUs per trial (default: the space's).")] = None,
    cpus_per_trial: Annotated[float | None, typer.Option(help="CPUs per trial (default: the space's).")] = None,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of a local Ray started here (default: all).")] = None,
    max_failures: Annotated[int, typer.Option(help="Retries of a crashed trial (from its checkpoint).")] = 1,
    config: ConfigOpt = None, set_: SetOpt = None, json_: JsonOpt = False,
) -> None:
    """Ray Tune ASHA sweep over adapter × decoder variants; writes the best config."""
    if search not in ("random", "optuna"):
        raise typer.BadParameter(f"--search must be random or optuna, got {search!r}")
    try:
        from tuning.sweep import cli_sweep
    except ImportError as exc:  # tuning/ ships with the same distribution; this only fires on a broken install
        raise typer.BadParameter(f"the tuning package is not importable: {exc}") from exc
    extra = {k: v for k, v in (("gpus_per_trial", gpus_per_trial), ("cpus_per_trial", cpus_per_trial),
                               ("num_cpus", num_cpus)) if v is not None}
    extra["max_failures"] = max_failures
    from medsam2.services import check_ray

    check_ray(address)
    _needs_mlflow(_tracking_override(set_, config))
    res = cli_sweep(space=space, num_samples=num_samples, address=address, config=config, overrides=set_, json=json_,
                    search=search, seed=seed, storage_path=storage, resume=resume, **extra)
    _emit(res, json_, f"best val Dice {res.get('best_val_dice')} → {res.get('best_config')}")


@app.command("retrain-check")
def retrain_check(
    config: ConfigOpt = None, set_: SetOpt = None, json_: JsonOpt = False,
) -> None:
    """New labelled data since the champion was trained? Exit 0 either way; retrain-on-new-labels acts on it."""
    from medsam2.steps import labels_changed_since_champion

    cfg = _cfg(config, set_)
    _needs_mlflow(cfg.tracking.tracking_uri)
    res = labels_changed_since_champion(cfg)
    _emit(res, json_, "new labels: retrain" if res["retrain"] else "skipped: no new labels")


@app.command()
def champion(
    model_name: Annotated[str, typer.Option(help="Registered model name.")] = "medsam2", json_: JsonOpt = False
) -> None:
    """Show the champion model version, why the gate promoted it, its test metrics beside the baselines, and
    the last challenger's decision; with no champion, say so and show why the last challenger was rejected."""
    _needs_mlflow()
    from medsam2.tracking import champion_summary, last_challenger

    res = champion_summary(model_name)
    if res is None:
        last = last_challenger(model_name)
        res = {"model_name": model_name, "version": None, "last_challenger": last}
        if last is None:
            _emit(res, json_, f"no champion for model {model_name!r} yet, and no candidate has been gated")
            raise typer.Exit(1)
        _emit(res, json_, f"no champion for model {model_name!r}: no candidate has passed the promotion gate. "
                          f"Last challenger v{last['version']} was {last['gate_decision'] or 'not gated'}: "
                          f"{last['gate_summary']}")
        return
    m = res["metrics"]
    nan = float("nan")
    human = (f"champion {model_name} v{res['version']} (data {res['tags'].get('data_version')}): "
             f"test Dice {m.get('test_dice', nan):.4f} [95% CI {m.get('test_dice_ci_low', nan):.4f}"
             f"–{m.get('test_dice_ci_high', nan):.4f}], IoU {m.get('test_iou', nan):.4f}; "
             f"ellipse-in-box baseline Dice {m.get('baseline_ellipse_in_box_dice', nan):.4f}"
             f"\n  gate ({res['tags'].get('gate_selection_split', 'selection')} split): {res['gate_summary']}")
    last = res.get("last_challenger")
    if last is not None:
        human += f"\n  last challenger v{last['version']} {last['gate_decision']}: {last['gate_summary']}"
    _emit(res, json_, human)


if __name__ == "__main__":
    app()
