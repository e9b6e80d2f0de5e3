"""Atomic, resumable checkpoints that hold what training changed.

File layout (``torch.save`` of a dict):
    model      state dict: only trainable tensors when the base weights can be reloaded from ``base``;
               the full state when the base was random init (it could not be rebuilt otherwise)
    full       bool, which of the two ``model`` is
    config     the resolved ``ExperimentCfg`` as a plain dict
    base       {"source", "sha256"} identity of the weights the model started from
    step, optimizer, scheduler, ema, rng, best, history — training state for resume (absent in exports)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from medsam2.config import ExperimentCfg
from medsam2.model.backbone import BaseWeights, load_state_strict
from medsam2.model.segmenter import Segmenter, build_segmenter

LAST = "last.pt"


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temp file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def model_payload(model: Segmenter, cfg: ExperimentCfg, base: BaseWeights) -> dict[str, Any]:
    full = base.random_init
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()} if full else model.trainable_state_dict()
    return {"model": state, "full": full, "config": cfg.model_dump(mode="json"), "base": vars(base)}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Segmenter, ExperimentCfg]:
    """Rebuild the model a checkpoint came from (base weights + adapters) and load its weights strictly."""
    blob = read_checkpoint(path)
    if "config" not in blob:
        raise ValueError(f"{path} is not a MedSAM2 checkpoint (no 'config'); use it as model.checkpoint instead")
    cfg = ExperimentCfg.model_validate(blob["config"])
    model_cfg = cfg.model
    if blob["full"]:  # random-init base: build without weights, the file has everything
        model_cfg = model_cfg.model_copy(update={"checkpoint": "none"})
    model, _ = build_segmenter(model_cfg, seed=cfg.train.seed)
    if blob["full"]:
        load_state_strict(model, blob["model"], f"checkpoint {path}")
    else:
        trainable = model.trainable_state_dict()
        missing = sorted(set(trainable) - set(blob["model"]))
        unexpected = sorted(set(blob["model"]) - set(model.state_dict()))
        if missing or unexpected:
            from medsam2.model.backbone import CheckpointMismatchError

            raise CheckpointMismatchError(
                f"checkpoint {path}: missing trainable keys {missing[:10]}, unexpected keys {unexpected[:10]}"
            )
        model.load_state_dict(blob["model"], strict=False)
    return model.to(device).eval(), cfg
