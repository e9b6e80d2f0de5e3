"""Commands that apply a model: ``predict`` (images, prompts files, volumes), ``suggest`` (what to label next),
``export`` (ONNX)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from medsam2.cli.app import (
    JsonOpt,
    _check_model,
    _check_workdir,
    _emit,
    app,
)
from medsam2.errors import InputDataError, UsageError


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
        help="auto, fp32, bf16 (CPUs without native bf16 run fp32), or int8 (torch on CPU: the encoder's Linears in "
             "int8 where that is faster than bf16; onnx: an export made with --quantize int8).")] = "auto",
    calibration: Annotated[Path | None, typer.Option(
        help="calibration.json of an evaluation report: adds each mask's confidence (expected Dice) and "
             "needs_review (a flip-agreement calibration also predicts each image mirrored).")] = None,
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
        if precision == "int8":
            raise UsageError("--precision int8 is for 2-D images: --volume runs SAM2's memory in fp32 or bf16",
                             "use --precision auto, fp32 or bf16")
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


