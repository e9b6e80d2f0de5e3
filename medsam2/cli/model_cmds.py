"""Commands on models and runs: ``train``, ``evaluate``, ``promote``, ``rollback``, ``sweep``, ``retrain-check``,
``champion``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from medsam2.cli.app import (
    ConfigOpt,
    JsonOpt,
    SetOpt,
    _cfg,
    _check_model,
    _check_workdir,
    _ChoicesHelp,
    _emit,
    _needs_mlflow,
    _tracking_override,
    app,
)
from medsam2.errors import InputDataError, UsageError


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
    flags: Annotated[bool, typer.Option(help="Failure flags: calibrate a confidence → Dice on val, mark test images "
                                              "'needs review' and report the flags' precision/recall.")] = True,
    confidence_input: Annotated[str | None, typer.Option(
        help="What the flags calibrate: iou_pred, flip_agreement, iou_flip or stability (default: the one that "
             "ranks val Dice best).")] = None,
    review_below: Annotated[float | None, typer.Option(help="A failure the flags should catch: a Dice below this "
                                                            "(default 0.7).")] = None,
    flag_below: Annotated[float | None, typer.Option(help="Needs review below this calibrated confidence (default: "
                                                          "chosen on val by cross-fitting, best F1 on failures).")
                          ] = None,
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
    if confidence_input is not None:
        from medsam2.eval.calibration import check_input

        try:
            check_input(confidence_input)
        except ValueError as e:
            raise UsageError(f"--confidence-input: {e}") from e
    _check_model(model)
    _check_workdir(workdir, "evaluate")
    _needs_mlflow(tracking_uri)
    res = run_evaluate(model, overrides, workdir=workdir, run_id=run_id, report_dir=report, flags=flags,
                       review_below=review_below, flag_below=flag_below, confidence_input=confidence_input)
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

    cfg = _cfg(config, set_)  # what every trial starts from: a bad key or a missing manifest fails here, not per trial
    _check_workdir(cfg.data.workdir, "sweep")
    check_ray(address)
    _needs_mlflow(cfg.tracking.tracking_uri)
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
