"""The one training loop: ``train(cfg, callbacks) -> TrainResult``. CLI, flows, Tune trials and tests call it.

Per step: deterministic batch (``StepSampler``) → normalise on device → bf16 autocast on GPU (fp32 on CPU) →
strategy losses → backward (grad accumulation) → clip → fused AdamW (GPU) → warmup+cosine LR (over the steps or
the time budget, whichever ends first) → EMA. Every ``checkpoint_every`` steps an atomic ``last.pt`` is written;
a rerun with the same ``train.output_dir`` resumes from it and reaches the same weights as an uninterrupted run
(same seed, CPU, no time budget). Validation runs every ``eval_every`` steps on the val rows at each image's own
resolution (the test evaluation's code); the best-val weights are kept in ``best.pt`` and are what ``final.pt``
ships (``selected: best``; ``last`` when there is no val split). Loss values are synced to the host only every
``LOG_EVERY`` steps so the GPU is never stalled by ``.item()``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from medsam2.config import ExperimentCfg, config_hash, with_overrides
from medsam2.data.dataset import SegDataset, StepSampler
from medsam2.data.selection import select_rows, training_data_version
from medsam2.engine.callbacks import Callback, CallbackList
from medsam2.engine.checkpoint import BEST, LAST, atomic_save, build_model, model_payload, read_checkpoint
from medsam2.engine.runtime import (
    autocast,
    collate,
    compile_encoder,
    enable_activation_checkpointing,
    pick_device,
    to_device,
)
from medsam2.home import medsam2_home
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


class EMA:
    """Exponential moving average of the trainable parameters (used for evaluation and export)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach(), 1 - self.decay)

    @torch.no_grad()
    def swap(self, model: torch.nn.Module) -> None:
        """Exchange live and EMA weights (call twice to restore)."""
        for n, p in model.named_parameters():
            if n in self.shadow:
                tmp = p.detach().clone()
                p.copy_(self.shadow[n])
                self.shadow[n].copy_(tmp)


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


def train(cfg: ExperimentCfg, callbacks: list[Callback] | None = None) -> TrainResult:
    """Fine-tune SAM2 as configured; resumes from ``output_dir_of(cfg)/last.pt`` when it exists."""
    if cfg.train.output_dir is None:
        cfg = with_overrides(cfg, train={"output_dir": str(output_dir_of(cfg))})
    tc, dc = cfg.train, cfg.data
    cbs = CallbackList(callbacks or [])
    device = pick_device(tc.device)
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
    params = [p for p in model.parameters() if p.requires_grad] + [p for m in extra for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=device.type == "cuda")
    budget_s = 60 * tc.max_minutes if tc.max_minutes is not None else None
    ema = EMA(model, tc.ema_decay) if tc.ema_decay > 0 else None
    counts = model.param_count()

    start, best, history, bad_evals, spent_before, finished, best_step = 0, -1.0, [], 0, 0.0, False, 0
    last = out_dir / LAST
    if last.exists():
        blob = read_checkpoint(last)
        if blob.get("config_hash") != config_hash(cfg) or blob.get("data_version", data_version) != data_version:
            raise ValueError(f"{last} was written by a different config or data version; "
                             "use another train.output_dir")
        model.load_state_dict(blob["model"], strict=True)
        opt.load_state_dict(blob["optimizer"])
        for m, state in zip(extra, blob.get("extra", []), strict=False):
            m.load_state_dict(state)
        if ema is not None and blob.get("ema"):
            ema.shadow = {k: v.to(device) for k, v in blob["ema"].items()}
        torch.set_rng_state(blob["rng"])
        start, best, history, bad_evals = blob["step"], blob["best"], blob["history"], blob.get("bad_evals", 0)
        spent_before = blob.get("elapsed_s", 0.0)
        best_step = blob.get("best_step", 0)
        finished = blob.get("stopped", False) or start >= tc.max_steps  # budget, early stop or all steps done
        log.info("resuming from %s at step %d", last, start)
    if finished and (out_dir / "final.pt").exists():  # a rerun of a finished run trains nothing more
        return _result(out_dir / "final.pt", cfg, counts, base, data_version, start, history, 0.0, 0, start)

    cbs.on_train_start(
        {"config": cfg, "trainable_params": counts.trainable, "total_params": counts.total, "device": str(device),
         "base_weights": vars(base), "data_version": data_version, "train_images": len(train_rows),
         "val_images": len(val_rows), "unlabelled_images": len(unlabelled_rows), "resumed_from": start}
    )
    ds = SegDataset(train_rows, dc.workdir, cfg.model, dc.augment)
    sampler = StepSampler(len(ds), tc.batch_size * tc.grad_accum, tc.max_steps, tc.seed, start)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=dc.num_workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        prefetch_factor=4 if dc.num_workers else None)
    unl_iter = None
    if strategy.needs_unlabelled and len(unlabelled_rows):
        uds = SegDataset(unlabelled_rows, dc.workdir, cfg.model, dc.augment)
        usampler = StepSampler(len(uds), tc.batch_size, tc.max_steps, tc.seed + 1, start)
        unl_iter = iter(DataLoader(uds, batch_sampler=usampler, num_workers=dc.num_workers, collate_fn=collate))
    val_rows = val_rows[val_rows["label_kind"] == "mask"] if "label_kind" in val_rows else val_rows
    best_path = out_dir / BEST

    running: dict[str, torch.Tensor] = {}
    t0, seen, step, stopped = time.perf_counter(), 0, start, False
    progress = _progress(tc.progress, start, tc.max_steps)

    def elapsed() -> float:  # training seconds so far, including the attempts before a crash + resume
        return spent_before + time.perf_counter() - t0

    for step, batch in enumerate(loader if not finished else [], start=start + 1):  # finished: just write final
        budget_frac = min(1.0, elapsed() / budget_s) if budget_s else 0.0
        lr = tc.lr * lr_factor(step - 1, tc.warmup_steps, tc.max_steps, budget_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = to_device(batch, device)
        unl = to_device(next(unl_iter), device) if unl_iter is not None else None
        chunks = _split(batch, tc.grad_accum)
        for chunk in chunks:
            with autocast(device, tc.precision):
                losses = strategy.losses(model, chunk, unl, step)
            (losses["loss"] / len(chunks)).backward()
            for k, v in losses.items():
                running[k] = running.get(k, 0.0) + v.detach().float() / len(chunks)
        if tc.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, tc.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        strategy.after_step(model)
        if ema is not None:
            ema.update(model)
        seen += batch["image"].shape[0]
        if budget_s is not None and elapsed() > budget_s:
            log.info("train.max_minutes=%s reached at step %d", tc.max_minutes, step)
            stopped = True
        if step % LOG_EVERY == 0 or step == tc.max_steps or stopped:
            n = LOG_EVERY if step % LOG_EVERY == 0 else step % LOG_EVERY
            logs = {k: float(v) / n for k, v in running.items()}  # the only host sync: every LOG_EVERY steps
            logs["lr"] = lr
            if budget_s:
                logs["budget_used"] = budget_frac  # fraction of train.max_minutes spent when this step began
            logs["images_per_s"] = seen / max(1e-9, time.perf_counter() - t0)
            running = {}
            history.append({"step": step, **logs})
            cbs.on_step(step, logs)
            progress(step, logs)
        if len(val_rows) and (step % tc.eval_every == 0 or step == tc.max_steps or stopped):
            if ema is not None:
                ema.swap(model)
            dice = validate_dice(model, val_rows, dc.workdir, tc.precision, tc.batch_size)
            improved = dice > best
            if improved:  # the exported model is the best-val one: what is reported is what is shipped
                atomic_save({**model_payload(model, cfg, base), "step": step, "val_dice": dice}, best_path)
                best_step = step
            if ema is not None:
                ema.swap(model)
            best, bad_evals = (dice, 0) if improved else (best, bad_evals + 1)
            cbs.on_eval(step, {"val_dice": dice, "best_val_dice": best})
            history.append({"step": step, "val_dice": dice})
            if tc.early_stop_patience and bad_evals >= tc.early_stop_patience:
                stopped = True

        if step % tc.checkpoint_every == 0 or step == tc.max_steps or stopped:
            state = {
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": opt.state_dict(), "elapsed_s": elapsed(),
                "extra": [m.state_dict() for m in extra],
                "ema": {k: v.cpu() for k, v in ema.shadow.items()} if ema else None,
                "rng": torch.get_rng_state(), "step": step, "best": best, "history": history,
                "bad_evals": bad_evals, "config_hash": config_hash(cfg), "data_version": data_version,
                "stopped": stopped, "best_step": best_step,
            }
            atomic_save(state, last)
            cbs.on_checkpoint(step, str(last))
        if stopped:
            break
    progress(None, None)
    wall = time.perf_counter() - t0
    if ema is not None:
        ema.swap(model)
    if best_step and best_path.exists():  # ship the best-val weights, and say so
        final_blob = {**read_checkpoint(best_path), "step": step, "selected": "best", "selected_step": best_step}
    else:
        final_blob = {**model_payload(model, cfg, base), "step": step, "selected": "last", "selected_step": step}
    final = atomic_save(final_blob, out_dir / "final.pt")
    result = _result(final, cfg, counts, base, data_version, step, history, wall, seen, start, stopped)
    cbs.on_train_end(result)
    return result


def _result(path, cfg, counts, base, data_version, step, history, wall, seen, start, stopped=False):
    losses = [h for h in history if "loss" in h]
    vals = [h["val_dice"] for h in history if "val_dice" in h]
    metrics = {"final_loss": losses[-1]["loss"] if losses else float("nan")}
    if vals:
        metrics["best_val_dice"] = max(vals)
        metrics["last_val_dice"] = vals[-1]
    exported = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # mmap: tensors not read
    metrics["selected_step"] = float(exported.get("selected_step", step))
    if exported.get("selected") == "best":
        metrics["selected_val_dice"] = float(exported["val_dice"])
    return TrainResult(
        checkpoint=str(path), steps=step, metrics=metrics, trainable_params=counts.trainable,
        total_params=counts.total, base_weights=vars(base), config_hash=config_hash(cfg),
        data_version=data_version, wall_s=wall, images_per_s=seen / wall if wall else 0.0,
        stopped_early=stopped, resumed_from=start, history=history,
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
