"""The one training loop: ``train(cfg, callbacks) -> TrainResult``. CLI, flows, Tune trials and tests call it.

Per step: deterministic batch (``StepSampler``) → normalise on device → bf16 autocast on GPU (fp32 on CPU) →
strategy losses → backward (grad accumulation) → clip → fused AdamW (GPU) → warmup+cosine LR (over the steps or
the time budget, whichever ends first) → EMA. Every ``checkpoint_every`` steps an atomic ``last.pt`` is written;
a rerun with the same ``train.output_dir`` resumes from it and reaches the same weights as an uninterrupted run
(same seed, CPU, no time budget). Validation runs every ``eval_every`` steps on the val rows at each image's own
resolution (the test evaluation's code); the best-val weights are kept in ``best.pt`` and are what ``final.pt``
ships (``selected: best``; ``last`` when there is no val split). Loss values are synced to the host only every
``LOG_EVERY`` steps so the GPU is never stalled by ``.item()``.

With ``train.num_workers > 1`` the same loop runs in each of N data-parallel workers (``engine.distributed``;
launched by ``tuning.distributed``): each takes its shard of the global batch, gradients are averaged across them
before clipping, and rank 0 alone evaluates, writes checkpoints and logs.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from medsam2.config import ExperimentCfg, config_hash, with_overrides
from medsam2.data.dataset import SegDataset, StepSampler
from medsam2.data.selection import select_rows, training_data_version
from medsam2.engine import distributed
from medsam2.engine.callbacks import Callback, CallbackList, TrainStart
from medsam2.engine.checkpoint import BEST, LAST, atomic_save, build_model, model_payload, read_checkpoint
from medsam2.engine.runtime import (
    autocast,
    collate,
    compile_encoder,
    effective_precision,
    enable_activation_checkpointing,
    pick_device,
    to_device,
)
from medsam2.engine.train_state import EMA, TrainState
from medsam2.engine.volume import clip_losses
from medsam2.home import medsam2_home
from medsam2.model.backbone import BaseWeights
from medsam2.model.segmenter import ParamCount, Segmenter
from medsam2.semisup import STRATEGIES

log = logging.getLogger(__name__)
LOG_EVERY = 10


@dataclass
class TrainResult:
    checkpoint: str
    steps: int
    metrics: dict[str, float]
    trainable_params: int
    total_params: int
    base_weights: dict[str, str]
    config_hash: str
    data_version: str
    wall_s: float
    images_per_s: float
    stopped_early: bool = False
    resumed_from: int = 0
    precision: str = "fp32"
    """The precision autocast ran in (see ``runtime.effective_precision``)."""
    compiled: bool = False
    num_workers: int = 1
    """Data-parallel workers that trained it (``train.num_workers``)."""
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("history")
        return d


def lr_factor(step: int, warmup: int, total: int, time_frac: float = 0.0) -> float:
    """LR multiplier: linear warmup to 1 over ``warmup`` steps, then cosine to 0.05 at the end of training.

    The end is whichever comes first: step ``total`` or the time budget; ``time_frac`` in [0, 1] is the fraction of
    ``train.max_minutes`` used so far (0 without a budget), so a run stopped by its budget ends annealed, not
    mid-cosine."""
    if step < warmup:
        return (step + 1) / warmup
    t = max((step - warmup) / max(1, total - warmup), time_frac)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


@torch.no_grad()
def validate_dice(model, rows, workdir, precision, batch_size) -> float:
    """Mean hard Dice over labelled ``rows`` at each image's own resolution, through the same prediction and
    metric code as the test evaluation (``engine.evaluate.evaluate_rows``: exact box, deterministic points)."""
    from medsam2.engine.evaluate import evaluate_rows

    model.eval()
    per_image, _ = evaluate_rows(model, rows, workdir, baselines=False, precision=precision,
                                 batch_size=batch_size, gallery_size=0)
    model.train()
    return float(per_image["dice"].mean()) if len(per_image) else float("nan")


def output_dir_of(cfg: ExperimentCfg, base: str | Path | None = None) -> Path:
    """Where ``train(cfg)`` writes: ``train.output_dir`` when set (and no ``base``), else
    ``<base or $MEDSAM2_HOME/runs/<name>>/<config hash>-<training data version>``: one dir per run identity, the
    same for the CLI, the flows and the library, so a rerun resumes and other settings or new labels start anew."""
    if cfg.train.output_dir is not None and base is None:
        return Path(cfg.train.output_dir)
    root = Path(base) if base is not None else medsam2_home() / "runs" / cfg.name
    return root / f"{config_hash(cfg)}-{training_data_version(cfg.data)}"


@dataclass
class _Run:
    """What a run is set up with and does not change: config, device, data, model, strategy, parameters."""

    cfg: ExperimentCfg
    device: torch.device
    workers: distributed.Workers
    out_dir: Path
    model: Segmenter
    base: BaseWeights
    strategy: Any
    params: list[torch.nn.Parameter]
    counts: ParamCount
    data_version: str
    train_rows: pd.DataFrame
    unlabelled_rows: pd.DataFrame
    val_rows: pd.DataFrame
    """The val rows that are evaluated (those with a mask)."""
    val_images: int
    budget_s: float | None
    precision: str
    """What autocast runs (``runtime.effective_precision``): ``bf16`` asked for on a CPU without it runs fp32."""
    compile_error: str | None
    """None, or why ``train.compile`` fell back to eager (None also when compile was not asked for)."""

    @property
    def compiled(self) -> bool:
        """Whether the image encoder runs compiled (``train.compile`` asked for, and it compiled)."""
        return self.cfg.train.compile and self.compile_error is None

    def start_info(self, resumed_from: int) -> TrainStart:
        return TrainStart(
            config=self.cfg, trainable_params=self.counts.trainable, total_params=self.counts.total,
            device=str(self.device), base_weights=vars(self.base), data_version=self.data_version,
            train_images=len(self.train_rows), val_images=self.val_images,
            unlabelled_images=len(self.unlabelled_rows), resumed_from=resumed_from, precision=self.precision,
            compiled=self.compiled, compile_error=self.compile_error, num_workers=self.workers.world)


@dataclass
class _Meter:
    """The attempt's clock, images seen and the loss sums since the last log line."""

    spent_before: float
    budget_s: float | None
    t0: float = field(default_factory=time.perf_counter)
    seen: int = 0
    running: dict[str, torch.Tensor] = field(default_factory=dict)

    def wall(self) -> float:
        return time.perf_counter() - self.t0

    def elapsed(self) -> float:  # training seconds so far, including the attempts before a crash + resume
        return self.spent_before + self.wall()

    def budget_frac(self) -> float:
        return min(1.0, self.elapsed() / self.budget_s) if self.budget_s else 0.0


def train(cfg: ExperimentCfg, callbacks: list[Callback] | None = None) -> TrainResult:
    """Fine-tune SAM2 as configured; resumes from ``output_dir_of(cfg)/last.pt`` when it exists."""
    if cfg.train.output_dir is None:
        cfg = with_overrides(cfg, train={"output_dir": str(output_dir_of(cfg))})
    tc, cbs = cfg.train, CallbackList(callbacks or [])
    run, state = _setup(cfg)
    main, workers = run.workers.main, run.workers
    last, final = run.out_dir / LAST, run.out_dir / "final.pt"
    finished = False
    if last.exists():
        finished = state.load(last, run.device) or state.step >= tc.max_steps  # budget, early stop or all done
        log.info("resuming from %s at step %d", last, state.step)
    start = state.step
    if finished and final.exists():  # a rerun of a finished run trains nothing more
        return _result(final, run, state, start)

    cbs.on_train_start(run.start_info(start))
    loader, unl_iter = _loaders(run, start)
    meter = _Meter(state.elapsed_s, run.budget_s)
    progress = _progress(tc.progress and not workers.distributed, start, tc.max_steps)  # a worker logs
    for step, batch in enumerate(loader if not finished else [], start=start + 1):  # finished: just write final
        state.step = step
        budget_frac = meter.budget_frac()
        lr = tc.lr * lr_factor(step - 1, tc.warmup_steps, tc.max_steps, budget_frac)
        _optimise(run, state, meter, batch, next(unl_iter) if unl_iter is not None else None, lr)
        if run.budget_s is not None:
            state.stopped = workers.agree(meter.elapsed() > run.budget_s, run.device)  # the first rank out stops all
            if state.stopped:
                log.info("train.max_minutes=%s reached at step %d", tc.max_minutes, step)
        if step % LOG_EVERY == 0 or step == tc.max_steps or state.stopped:
            logs = _log_line(run, state, meter, lr, budget_frac)
            cbs.on_step(step, logs)
            progress(step, logs)
        if len(run.val_rows) and (step % tc.eval_every == 0 or step == tc.max_steps or state.stopped):
            metrics = _evaluate(run, state) if main else {}
            metrics, state.stopped = _share_eval(run, state, metrics)
            cbs.on_eval(step, metrics)
        if step % tc.checkpoint_every == 0 or step == tc.max_steps or state.stopped:
            state.elapsed_s = meter.elapsed()
            if main:
                state.save(last)
            cbs.on_checkpoint(step, str(last))
        if state.stopped:
            break
    progress(None, None)
    wall = meter.wall()
    if main:
        _write_final(run, state, final)
    result = _result(final, run, state, start, wall, meter.seen)
    cbs.on_train_end(result)
    return result


def _setup(cfg: ExperimentCfg) -> tuple[_Run, TrainState]:
    """Seeds, data rows, the model (adapted, on its device), the strategy, the optimiser and the EMA."""
    tc, dc = cfg.train, cfg.data
    workers = distributed.current()
    if workers.world != tc.num_workers and workers.distributed:
        raise ValueError(f"train.num_workers={tc.num_workers} but this process group has {workers.world} workers")
    device = workers.device(pick_device(tc.device))
    out_dir = Path(tc.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)

    train_rows, unlabelled_rows = select_rows(dc, "train", seed=tc.seed)
    val_rows, _ = select_rows(dc, "val", seed=tc.seed)
    data_version = training_data_version(dc)
    model, base = build_model(cfg.model, seed=tc.seed)
    model.to(device).train()
    if tc.activation_checkpointing:
        enable_activation_checkpointing(model)
    compile_error = compile_encoder(model) if tc.compile else None
    if compile_error:
        log.warning("torch.compile failed, training eager: %s", compile_error)
    strategy = STRATEGIES.create(cfg.semisup.method, model, cfg)
    extra = [m.to(device) for m in strategy.extra_modules()]
    workers.broadcast_params([model, *extra])  # N workers start from rank 0's weights, as DDP does
    params = [p for p in model.parameters() if p.requires_grad] + [p for m in extra for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=device.type == "cuda")
    ema = EMA(model, tc.ema_decay) if tc.ema_decay > 0 else None
    run = _Run(
        cfg=cfg, device=device, workers=workers, out_dir=out_dir, model=model, base=base, strategy=strategy,
        params=params,
        counts=model.param_count(), data_version=data_version, train_rows=train_rows,
        unlabelled_rows=unlabelled_rows, val_images=len(val_rows),
        val_rows=val_rows[val_rows["label_kind"] == "mask"] if "label_kind" in val_rows else val_rows,
        budget_s=60 * tc.max_minutes if tc.max_minutes is not None else None,
        precision=effective_precision(device, tc.precision), compile_error=compile_error,
    )
    return run, TrainState(model, opt, extra, ema, config_hash(cfg), data_version)


def _loaders(run: _Run, start: int) -> tuple[DataLoader, Any]:
    """The labelled batches from step ``start`` on, and an iterator of unlabelled ones (None if not used)."""
    cfg, tc, dc = run.cfg, run.cfg.train, run.cfg.data
    if cfg.model.memory:  # clips of consecutive slices of a volume (medsam2.data.clips)
        from medsam2.data.clips import ClipDataset

        ds = ClipDataset(run.train_rows, dc.workdir, cfg.model, tc.clip_length)
    else:
        ds = SegDataset(run.train_rows, dc.workdir, cfg.model, dc.augment)
    rank, world = run.workers.rank, run.workers.world
    sampler = StepSampler(len(ds), tc.batch_size * tc.grad_accum, tc.max_steps, tc.seed, start, rank, world)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=dc.num_workers, collate_fn=collate,
                        pin_memory=run.device.type == "cuda", persistent_workers=False,
                        prefetch_factor=4 if dc.num_workers else None)
    unl_iter = None
    if run.strategy.needs_unlabelled and len(run.unlabelled_rows):
        uds = SegDataset(run.unlabelled_rows, dc.workdir, cfg.model, dc.augment)
        usampler = StepSampler(len(uds), tc.batch_size, tc.max_steps, tc.seed + 1, start, rank, world)
        unl_iter = iter(DataLoader(uds, batch_sampler=usampler, num_workers=dc.num_workers, collate_fn=collate))
    return loader, unl_iter


def _optimise(run: _Run, state: TrainState, meter: _Meter, batch: dict, unl: dict | None, lr: float) -> None:
    """One optimiser step at ``lr``: the strategy's losses over ``grad_accum`` chunks (of this worker's shard),
    gradients averaged over the workers, clip, AdamW, EMA."""
    tc, model, opt = run.cfg.train, run.model, state.optimizer
    for g in opt.param_groups:
        g["lr"] = lr
    batch = to_device(batch, run.device)
    unl = to_device(unl, run.device) if unl is not None else None
    chunks = _split(batch, tc.grad_accum)
    for chunk in chunks:
        with autocast(run.device, tc.precision):
            losses = clip_losses(model, chunk, run.strategy.loss_fn) if run.cfg.model.memory else \
                run.strategy.losses(model, chunk, unl, state.step)
        (losses["loss"] / len(chunks)).backward()
        for k, v in losses.items():
            meter.running[k] = meter.running.get(k, 0.0) + v.detach().float() / len(chunks)
    run.workers.average_gradients(run.params)
    if tc.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(run.params, tc.clip_grad)
    opt.step()
    opt.zero_grad(set_to_none=True)
    run.strategy.after_step(model)
    if state.ema is not None:
        state.ema.update(model)
    meter.seen += batch["image"].shape[0] * run.workers.world  # every worker took an equal shard


def _log_line(run: _Run, state: TrainState, meter: _Meter, lr: float, budget_frac: float) -> dict[str, float]:
    """The mean losses since the last log line (the only host sync: every ``LOG_EVERY`` steps), into history."""
    step = state.step
    n = LOG_EVERY if step % LOG_EVERY == 0 else step % LOG_EVERY
    logs = {k: float(v) / n for k, v in meter.running.items()}
    logs["lr"] = lr
    if run.budget_s:
        logs["budget_used"] = budget_frac  # fraction of train.max_minutes spent when this step began
    logs["images_per_s"] = meter.seen / max(1e-9, meter.wall())
    meter.running = {}
    state.history.append({"step": step, **logs})
    return logs


def _evaluate(run: _Run, state: TrainState) -> dict[str, float]:
    """Val Dice (of the EMA weights when there is an EMA); a new best is written to ``best.pt``, the exported
    model; too many evaluations without improvement stop the run (``early_stop_patience``)."""
    tc, model, ema, step = run.cfg.train, run.model, state.ema, state.step
    if ema is not None:
        ema.swap(model)
    dice = validate_dice(model, run.val_rows, run.cfg.data.workdir, tc.precision, tc.batch_size)
    improved = dice > state.best
    if improved:  # the exported model is the best-val one: what is reported is what is shipped
        atomic_save({**model_payload(model, run.cfg, run.base), "step": step, "val_dice": dice}, run.out_dir / BEST)
        state.best_step = step
    if ema is not None:
        ema.swap(model)
    state.best, state.bad_evals = (dice, 0) if improved else (state.best, state.bad_evals + 1)
    state.history.append({"step": step, "val_dice": dice})
    if tc.early_stop_patience and state.bad_evals >= tc.early_stop_patience:
        state.stopped = True
    return {"val_dice": dice, "best_val_dice": state.best}


EVAL_KEYS = ("val_dice", "best_val_dice")


def _share_eval(run: _Run, state: TrainState, metrics: dict[str, float]) -> tuple[dict[str, float], bool]:
    """Rank 0's evaluation (and its early-stop decision) on every rank, so that every worker's callbacks see the
    same ``on_eval`` and all stop together; one worker: as it is."""
    workers = run.workers
    if not workers.distributed:
        return metrics, state.stopped
    mine = [metrics.get(k, 0.0) for k in EVAL_KEYS] + [float(state.stopped)]
    *values, stopped = workers.broadcast_floats(mine, run.device)
    return dict(zip(EVAL_KEYS, values, strict=True)), bool(stopped)


def _write_final(run: _Run, state: TrainState, path: Path) -> Path:
    """``final.pt``: the best-val weights when there was a val split (``selected: best``), else the last ones
    (of the EMA, when there is one)."""
    if state.ema is not None:
        state.ema.swap(run.model)
    best_path = run.out_dir / BEST
    if state.best_step and best_path.exists():  # ship the best-val weights, and say so
        blob = {**read_checkpoint(best_path), "step": state.step, "selected": "best",
                "selected_step": state.best_step}
    else:
        blob = {**model_payload(run.model, run.cfg, run.base), "step": state.step, "selected": "last",
                "selected_step": state.step}
    return atomic_save(blob, path)


def _result(path: Path, run: _Run, state: TrainState, start: int, wall: float = 0.0, seen: int = 0) -> TrainResult:
    history, step = state.history, state.step
    losses = [h for h in history if "loss" in h]
    vals = [h["val_dice"] for h in history if "val_dice" in h]
    metrics = {"final_loss": losses[-1]["loss"] if losses else float("nan")}
    if vals:
        metrics["best_val_dice"] = max(vals)
        metrics["last_val_dice"] = vals[-1]
    exported = (torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # mmap: tensors not read
                if run.workers.main else {})  # another rank: rank 0 wrote final.pt, maybe on another node
    metrics["selected_step"] = float(exported.get("selected_step", step))
    if exported.get("selected") == "best":
        metrics["selected_val_dice"] = float(exported["val_dice"])
    return TrainResult(
        checkpoint=str(path), steps=step, metrics=metrics, trainable_params=run.counts.trainable,
        total_params=run.counts.total, base_weights=vars(run.base), config_hash=state.config_hash,
        data_version=run.data_version, wall_s=wall, images_per_s=seen / wall if wall else 0.0,
        stopped_early=state.stopped, resumed_from=start, history=history, precision=run.precision,
        compiled=run.compiled, num_workers=run.workers.world,
    )


def _split(batch: dict, parts: int) -> list[dict]:
    if parts == 1:
        return [batch]
    n = batch["image"].shape[0]
    size = math.ceil(n / parts)
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def _progress(enabled: bool, start: int, total: int):
    """A rich progress bar with ETA (no-op when disabled); call with (step, logs), then (None, None) to close."""
    if not enabled:
        return lambda step, logs: None
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=True)
    task = bar.add_task("train", total=total, completed=start, info="")
    bar.start()

    def update(step, logs):
        if step is None:
            bar.stop()
            return
        bar.update(task, completed=step, info=f"loss {logs.get('loss', float('nan')):.3f}")

    return update
