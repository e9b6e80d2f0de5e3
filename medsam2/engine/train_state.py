"""What a training run carries from step to step: :class:`TrainState` (what ``last.pt`` holds, with save and load)
and the :class:`EMA` of the trainable weights. ``engine.train`` is the loop that changes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from medsam2.engine.checkpoint import atomic_save, read_checkpoint


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


@dataclass
class TrainState:
    """What a run carries from step to step and what ``last.pt`` holds: the live model, optimiser, strategy
    modules (``extra``) and EMA, and the loop's counters. :meth:`save` writes ``last.pt``; :meth:`load` restores
    one into a freshly built run, which then continues as if it had never stopped."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    extra: list[torch.nn.Module]
    ema: EMA | None
    config_hash: str
    data_version: str
    step: int = 0
    best: float = -1.0
    """Best val Dice so far (-1 before the first evaluation)."""
    best_step: int = 0
    bad_evals: int = 0
    """Evaluations since the last improvement (early stopping)."""
    history: list[dict[str, float]] = field(default_factory=list)
    elapsed_s: float = 0.0
    """Training seconds of every attempt so far (a crash + resume included)."""
    stopped: bool = False
    """This attempt stopped before ``max_steps``: the time budget or early stopping."""

    def save(self, path: Path) -> None:
        atomic_save({
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "elapsed_s": self.elapsed_s,
            "extra": [m.state_dict() for m in self.extra],
            "ema": {k: v.cpu() for k, v in self.ema.shadow.items()} if self.ema else None,
            "rng": torch.get_rng_state(), "step": self.step, "best": self.best, "history": self.history,
            "bad_evals": self.bad_evals, "config_hash": self.config_hash, "data_version": self.data_version,
            "stopped": self.stopped, "best_step": self.best_step,
        }, path)

    def load(self, path: Path, device: torch.device) -> bool:
        """Restore ``path`` (a ``last.pt`` of this config and data); True when that run had stopped early."""
        blob = read_checkpoint(path)
        version = blob.get("data_version", self.data_version)
        if blob.get("config_hash") != self.config_hash or version != self.data_version:
            raise ValueError(f"{path} was written by a different config or data version; "
                             "use another train.output_dir")
        self.model.load_state_dict(blob["model"], strict=True)
        self.optimizer.load_state_dict(blob["optimizer"])
        for m, state in zip(self.extra, blob.get("extra", []), strict=False):
            m.load_state_dict(state)
        if self.ema is not None and blob.get("ema"):
            self.ema.shadow = {k: v.to(device) for k, v in blob["ema"].items()}
        torch.set_rng_state(blob["rng"])
        self.step, self.best, self.history = blob["step"], blob["best"], blob["history"]
        self.bad_evals, self.best_step = blob.get("bad_evals", 0), blob.get("best_step", 0)
        self.elapsed_s = blob.get("elapsed_s", 0.0)
        return blob.get("stopped", False)
