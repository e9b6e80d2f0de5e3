"""``run_sweep``: Ray Tune + ASHA over a registered search space, tracked as one MLflow parent run.

Driver steps: resolve the config (space base ← ``--set`` overrides; absolute paths; a concrete tracking URI),
create the MLflow store + experiment once (a fresh SQLite store races when trial processes create it at once),
open the parent run, run the Tuner (trials log child runs, see ``tuning.trainable``), then log the results
table, a parallel-coordinates plot and ``best_config.yaml`` (the full resolved config of the best trial,
loadable with ``medsam2.config.load_config``) to the parent run and end it.

Ray: ``address`` (or ``RAY_ADDRESS``) joins an existing cluster; otherwise a local Ray starts with
``num_cpus``. Ray 2.60 turns token auth on by default: a local ``ray.init`` makes/uses ``~/.ray/auth_token``
unless ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN`` say otherwise; to join a cluster the driver needs the cluster's
token in ``RAY_AUTH_TOKEN`` (or ``RAY_AUTH_TOKEN_PATH``) — see ``infra/README.md``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import ray
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from medsam2.config import ExperimentCfg, config_hash, load_config, parse_overrides, with_overrides
from medsam2.home import medsam2_home
from medsam2.tracking import sweeps as runs
from tuning.ray_session import init_ray, is_local, portable_config, storage_root
from tuning.report import parallel_coordinates, results_table
from tuning.spaces import SPACE_RESOURCES, SPACES, apply_params
from tuning.trainable import (
    CONFIG_FILE,
    SweepContext,
    run_trial,
    trial_config,
    trial_dirname,
    trial_output_dir,
)

log = logging.getLogger(__name__)
@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    best_config: str | None
    best_val_dice: float
    best_trial: str | None
    trials: int
    completed: int
    stopped_early: int
    """Stopped by ASHA."""
    ended_by_trainer: int
    """Ended by the trial's own ``train.max_minutes`` or ``train.early_stop_patience``."""
    errored: int
    lost_attempts: int
    """Child runs of attempts a crash cut off before Tune saved them (tagged ``tune_status=LOST``, ended FAILED);
    their configs were asked again under new trial ids, so they are not in ``trials``."""
    wall_s: float
    experiment_path: str
    results_csv: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["best_val_dice"] != d["best_val_dice"]:  # NaN is not JSON
            d["best_val_dice"] = None
        return d


def prepare_config(space: str, base_cfg: ExperimentCfg, overrides: list[str] | None = None) -> ExperimentCfg:
    """Base config ← the space's fixed values ← ``overrides``, made portable (``ray_session.portable_config``)."""
    _, base = SPACES.create(space)
    cfg = apply_params(base_cfg, base)
    return portable_config(with_overrides(cfg, **parse_overrides(overrides)))


OPTUNA_DB = "optuna.db"  # the Optuna study of an optuna sweep, in its folder: kept across --resume, inspectable


def optuna_storage(sweep_dir: Path) -> str:
    """The SQLite URL of a sweep's Optuna study (``optuna.load_study(study_name=<sweep name>, storage=...)``)."""
    return f"sqlite:///{Path(sweep_dir).resolve() / OPTUNA_DB}"


def _searcher(search: str, seed: int | None, study_dir: Path | None = None):
    if search == "random":  # independent random samples; a seed makes the sampled configs reproducible
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=seed)
    if search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as e:  # pragma: no cover - optuna is optional
            raise ImportError("search='optuna' needs the optuna package: pip install optuna") from e
        if study_dir is None:
            return OptunaSearch(seed=seed)
        # a durable study: every ask and tell is in SQLite at once, so a killed sweep's --resume continues it
        from optuna.storages import RDBStorage

        return OptunaSearch(seed=seed, storage=RDBStorage(optuna_storage(study_dir)), study_name=study_dir.name)
    raise ValueError(f"search must be 'random' or 'optuna', got {search!r}")


def _fail_interrupted_trials(sweep_dir: Path) -> int:
    """Mark the Optuna trials still RUNNING once the sweep has finished as FAIL, and return how many: attempts cut
    off by a killed driver, which the resumed sweep asked again under a new trial number (Optuna's own state for a
    trial whose process died)."""
    import optuna

    study = optuna.load_study(study_name=sweep_dir.name, storage=optuna_storage(sweep_dir))
    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in stale:
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    if stale:
        log.info("optuna study %s: %d trial(s) interrupted by the earlier kill marked FAIL", sweep_dir.name, len(stale))
    return len(stale)


def _experiment_name(space: str, cfg: ExperimentCfg, storage: str, resume: bool) -> str:
    prefix = f"{space}-{config_hash(cfg)}"
    if resume:
        if not is_local(storage):
            raise ValueError("resume=True needs a local storage_path (or pass name=...)")
        found = sorted(p.name for p in Path(storage).glob(f"{prefix}-*") if (p / "sweep.json").exists())
        if not found:
            raise FileNotFoundError(f"no sweep {prefix}-* under {storage} to resume")
        return found[-1]
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"


def run_sweep(
    space: str,
    num_samples: int,
    *,
    base_cfg: ExperimentCfg,
    overrides: list[str] | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    gpus_per_trial: float = 0,
    cpus_per_trial: float = 1,
    storage_path: str | None = None,
    max_failures: int = 1,
    search: Literal["random", "optuna"] = "random",
    max_concurrent: int | None = None,
    resume: bool = False,
    name: str | None = None,
    seed: int | None = None,
    quiet: bool = False,
    parent_run_id: str | None = None,
) -> SweepResult:
    """Sample ``num_samples`` trials of the registered ``space`` with ASHA early stopping on ``val_dice``.

    ``overrides`` (dotted ``k=v``) win over the space's fixed values; a sampled key named in ``overrides`` is
    pinned (removed from the search). ``resume=True`` continues the latest sweep of the same space and config
    under ``storage_path`` (unfinished and errored trials), reopening its MLflow parent run. ``parent_run_id``
    (a pipeline's run) nests the sweep's own parent run under it; else a caller's active run does.
    """
    t0 = time.perf_counter()
    param_space, _ = SPACES.create(space)
    pinned = set(parse_overrides_flat(overrides))
    param_space = {k: v for k, v in param_space.items() if k not in pinned}
    cfg = prepare_config(space, base_cfg, overrides)
    storage = storage_root(storage_path)
    name = name or _experiment_name(space, cfg, storage, resume)
    local_out = Path(storage) / name if is_local(storage) else medsam2_home() / "sweeps" / name
    local_out.mkdir(parents=True, exist_ok=True)
    state_file = local_out / "sweep.json"
    resume_id = json.loads(state_file.read_text())["parent_run_id"] if resume and state_file.exists() else None
    sweep = runs.open_sweep_run(cfg, name, space, resume_run_id=resume_id, parent_run_id=parent_run_id)
    state_file.write_text(json.dumps({"parent_run_id": sweep.run_id, "space": space,
                                      "experiment_id": sweep.experiment_id}))
    started_ray = False
    try:
        if not resume:
            runs.log_sweep_start(cfg, {"space": space, "num_samples": num_samples, "search": search,
                                       "gpus_per_trial": gpus_per_trial, "cpus_per_trial": cpus_per_trial,
                                       "max_failures": max_failures, "name": name})
        started_ray = init_ray(address, num_cpus, quiet)
        ctx = SweepContext(base_cfg=cfg.model_dump(mode="json"), tracking_uri=sweep.tracking_uri,
                           experiment_id=sweep.experiment_id, parent_run_id=sweep.run_id, sweep_name=name,
                           storage_path=storage)
        resources, max_concurrent = _trial_resources(cfg, cpus_per_trial, gpus_per_trial, max_concurrent)
        trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)
        if resume:
            tuner = tune.Tuner.restore(str(local_out) if is_local(storage) else f"{storage}/{name}", trainable,
                                       resume_unfinished=True, resume_errored=True)
        else:
            tuner = _tuner(trainable, param_space, cfg, num_samples, storage, name, max_failures, search,
                           max_concurrent, seed, quiet)
        grid = tuner.fit()
        if search == "optuna" and is_local(storage):
            _fail_interrupted_trials(local_out)
        result = _summarise(grid, cfg, ctx, sweep, local_out, storage, t0)
        runs.end_sweep_run("FINISHED")
        return result
    except BaseException:
        runs.end_sweep_run("FAILED")
        raise
    finally:
        if started_ray:
            ray.shutdown()


def _trial_resources(cfg: ExperimentCfg, cpus: float, gpus: float, max_concurrent: int | None
                     ) -> tuple[dict[str, float], int | None]:
    """Tune resources of one trial's process, and how many trials run at once. A distributed trial
    (``train.num_workers > 1``) uses workers × per-worker resources, which its ``TorchTrainer`` asks for; the
    trial's own driver takes a sliver of a CPU, and no more trials start than the cluster can give workers to."""
    tc = cfg.train
    if tc.num_workers < 2:
        return {"cpu": cpus, "gpu": gpus}, max_concurrent
    from tuning.distributed import check_resources

    check_resources(cfg)  # one trial must fit: a clear error now, not trials waiting forever
    have = ray.cluster_resources()
    fits = int(have.get("CPU", 0) // (tc.num_workers * tc.cpus_per_worker + DRIVER_CPU))
    if tc.use_gpu:
        fits = min(fits, int(have.get("GPU", 0) // (tc.num_workers * tc.gpus_per_worker)))
    if fits < 1:
        from medsam2.errors import UsageError

        raise UsageError(f"a distributed trial needs {tc.num_workers} × {tc.cpus_per_worker:g} CPUs for its workers "
                         f"and {DRIVER_CPU} for its driver; the Ray cluster has {have.get('CPU', 0):g}",
                         hint="lower train.num_workers or train.cpus_per_worker, or use a bigger cluster")
    return {"cpu": DRIVER_CPU, "gpu": 0}, min(max_concurrent or fits, fits)


DRIVER_CPU = 0.01
"""CPU of a distributed trial's driver process (Tune refuses an empty request; it only waits on its workers)."""


def parse_overrides_flat(overrides: list[str] | None) -> dict[str, Any]:
    return {item.split("=", 1)[0].strip(): item.split("=", 1)[1] for item in overrides or [] if "=" in item}


def _tuner(
    trainable, param_space, cfg, num_samples, storage, name, max_failures, search, max_concurrent, seed, quiet
) -> tune.Tuner:
    if quiet:  # Tune warns about frequent experiment snapshots when every report carries a checkpoint
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    max_t = cfg.train.max_steps
    scheduler = ASHAScheduler(
        time_attr="step", max_t=max_t, grace_period=min(cfg.train.eval_every, max_t), reduction_factor=2
    )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric="val_dice",
            mode="max",
            scheduler=scheduler,
            num_samples=num_samples,
            search_alg=_searcher(search, seed, Path(storage) / name if is_local(storage) else None),
            max_concurrent_trials=max_concurrent,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            verbose=0 if quiet else 1,
            failure_config=tune.FailureConfig(max_failures=max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )


def _trial_dirname(trial) -> str:
    return trial_dirname(trial.trial_id)


def _summarise(grid, cfg, ctx: SweepContext, sweep: runs.SweepRun, local_out: Path, storage: str, t0: float
               ) -> SweepResult:
    """The results table, plot, best config and summary, written under ``local_out`` and onto the parent run;
    every trial run tagged with its outcome and closed."""
    name = ctx.sweep_name
    table = results_table(grid)
    csv_path = local_out / "results.csv"
    table.to_csv(csv_path, index=False)
    (local_out / "results.json").write_text(table.to_json(orient="records", indent=2))
    runs.log_sweep_files(csv_path, local_out / "results.json",
                         parallel_coordinates(table, local_out / "parallel_coordinates.png"))
    lost = runs.close_trial_runs(sweep, dict(zip(table["trial_id"], table["status"], strict=True)))

    ok = table[table["status"] != "ERROR"].dropna(subset=["best_val_dice"])
    best_cfg_path, best_dice, best_trial = None, float("nan"), None
    if len(ok):
        row = ok.loc[ok["best_val_dice"].idxmax()]
        best_dice, best_trial = float(row["best_val_dice"]), str(row["trial_id"])
        best = next(r for r in grid if Path(r.path).name.removeprefix("trial_") == best_trial)
        best_cfg_path = local_out / "best_config.yaml"
        best_cfg_path.write_text(_resolved_config(best, ctx))
        load_config(best_cfg_path)  # fail here, not in the user's next command, if it does not load
        runs.log_sweep_files(best_cfg_path)
    counts = {
        "trials": len(table),
        "completed": int((table["status"] == "COMPLETED").sum()),
        "stopped_early": int((table["status"] == "STOPPED_EARLY").sum()),
        "ended_by_trainer": int((table["status"] == "ENDED_BY_TRAINER").sum()),
        "errored": int((table["status"] == "ERROR").sum()),
        "lost_attempts": lost,
    }
    wall = time.perf_counter() - t0
    runs.log_sweep_result({**counts, "sweep_wall_s": wall, **({"best_val_dice": best_dice} if best_trial else {})},
                          best_trial)
    result = SweepResult(
        name=name,
        parent_run_id=sweep.run_id,
        experiment_id=sweep.experiment_id,
        tracking_uri=sweep.tracking_uri,
        best_config=str(best_cfg_path) if best_cfg_path else None,
        best_val_dice=best_dice,
        best_trial=best_trial,
        wall_s=wall,
        experiment_path=str(local_out) if is_local(storage) else f"{storage}/{name}",
        results_csv=str(csv_path),
        **counts,
    )
    (local_out / "sweep_result.json").write_text(json.dumps(result.to_dict(), indent=2))
    runs.log_sweep_files(local_out / "sweep_result.json")
    return result


def _resolved_config(result, ctx: SweepContext) -> str:
    """The best trial's resolved config (from its checkpoint when it has one, else rebuilt from its params), with
    a fresh ``train.output_dir`` beside the base config's: training from it must not resume the trial's run."""
    text = None
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            f = Path(d) / CONFIG_FILE
            if f.exists():
                text = f.read_text()
    if text is None:
        trial_id = Path(result.path).name.removeprefix("trial_")
        text = yaml.safe_dump(trial_config(ctx.base_cfg, result.config, trial_output_dir(ctx, trial_id))
                              .model_dump(mode="json"), sort_keys=False)
    tree = yaml.safe_load(text)
    base_dir = ctx.base_cfg["train"]["output_dir"]  # None: its own identity dir under MEDSAM2_HOME (output_dir_of)
    tree["train"]["output_dir"] = f"{base_dir.rstrip('/')}/{ctx.sweep_name}-best" if base_dir else None
    return yaml.safe_dump(tree, sort_keys=False)


def cli_sweep(
    space: str,
    num_samples: int,
    address: str | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    json: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """Hook for ``medsam2 sweep --space NAME --num-samples N [--address A] [--config F] [--set k=v] --json``.

    Returns a JSON-serialisable dict (``parent_run_id``, ``best_config``, ``best_val_dice``, ``trials``,
    ``stopped_early``, ``errored``, ``wall_s``, ...); the CLI prints it. ``json=True`` quiets Tune's progress
    tables and worker log forwarding so the JSON stays the last stdout line. Per-trial resources default to
    the space's ``SPACE_RESOURCES``; extra keyword arguments go to :func:`run_sweep`.
    """
    SPACES.get(space)  # unknown space: fail before starting anything
    opts = {**SPACE_RESOURCES.get(space, {}), **kwargs}
    opts.setdefault("quiet", json)
    result = run_sweep(
        space,
        num_samples,
        base_cfg=load_config(config),
        overrides=list(overrides or []),
        address=address,
        **opts,
    )
    return result.to_dict()
