"""Atomic, resumable checkpoints that hold what training changed.

File layout (``torch.save`` of a dict):
    model      state dict: only trainable tensors when the base weights can be reloaded from ``base`` (a
               Meta-format SAM2 file); the full state when the base was random init or the SAM2 part of
               another of our models (it could not be rebuilt from a single file otherwise)
    full       bool, which of the two ``model`` is
    config     the resolved ``ExperimentCfg`` as a plain dict
    base       {"source", "sha256", "kind"} identity of the weights the model started from; a non-full
               checkpoint only loads on top of a base file with that sha256
    step, optimizer, scheduler, ema, rng, best, history — training state for resume (absent in exports)
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medsam2.config import ExperimentCfg, ModelCfg
from medsam2.engine.weights import local_weights, resolve_checkpoint
from medsam2.hashing import file_sha256
from medsam2.model.backbone import (
    BaseWeights,
    CheckpointMismatchError,
    build_sam2_base,
    load_state_strict,
)
from medsam2.model.segmenter import Segmenter, build_segmenter

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"
"""The best-val weights so far (an export payload); ``final.pt`` ships them when validation ran."""


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
    full = not base.reloadable
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()} if full else model.trainable_state_dict()
    return {"model": state, "full": full, "config": cfg.model_dump(mode="json"), "base": vars(base)}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def load_model(
    path: str | Path, device: str | torch.device = "cpu", base_weights: str | Path | None = None
) -> tuple[Segmenter, ExperimentCfg]:
    """Rebuild the model a checkpoint came from (base weights + adapters) and load its weights strictly.

    ``base_weights``: a local copy of the base file to use instead of ``model.checkpoint`` of the training config
    (e.g. the copy logged with an MLflow model); ignored for full checkpoints.
    """
    blob = read_checkpoint(path)
    if "config" not in blob:
        raise ValueError(f"{path} is not a MedSAM2 checkpoint (no 'config'); use it as model.checkpoint instead")
    return model_from_payload(blob, f"checkpoint {path}", device, base_weights)


def model_from_payload(
    blob: dict[str, Any], what: str, device: str | torch.device = "cpu", base_weights: str | Path | None = None
) -> tuple[Segmenter, ExperimentCfg]:
    """:func:`load_model` on an already-read :func:`model_payload` dict; ``what`` names it in errors.

    A non-full checkpoint is loaded on top of its base file only if that file's sha256 is the one recorded at
    training time (``CheckpointMismatchError`` otherwise: other base weights would silently change the model).
    """
    cfg = ExperimentCfg.model_validate(blob["config"])
    model_cfg = cfg.model
    recorded = blob.get("base") or {}
    if blob["full"]:  # random-init or derived base: build without weights, the file has everything
        model_cfg = model_cfg.model_copy(update={"checkpoint": "none"})
    elif base_weights is not None:
        _check_base(Path(base_weights), file_sha256(base_weights), recorded, what)
        model_cfg = model_cfg.model_copy(update={"checkpoint": str(base_weights)})
    model, base = build_model(model_cfg, seed=cfg.train.seed)
    if blob["full"]:
        load_state_strict(model, blob["model"], what)
    else:
        _check_base(Path(base.source), base.sha256, recorded, what)
        trainable = model.trainable_state_dict()
        missing = sorted(set(trainable) - set(blob["model"]))
        unexpected = sorted(set(blob["model"]) - set(model.state_dict()))
        if missing or unexpected:
            raise CheckpointMismatchError(
                f"{what}: missing trainable keys {missing[:10]}, unexpected keys {unexpected[:10]}"
            )
        model.load_state_dict(blob["model"], strict=False)
    return model.to(device).eval(), cfg


def _check_base(path: Path, sha256: str, recorded: dict[str, str], what: str) -> None:
    if recorded.get("sha256") and sha256 != recorded["sha256"]:
        raise CheckpointMismatchError(
            f"{what} was trained on base weights {recorded.get('source')!r} with sha256 {recorded['sha256']}, but "
            f"{path} has sha256 {sha256}: these are not the weights it was trained on"
        )


def checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's payload with its tensors memory-mapped, not read: for its ``config``, ``full`` and ``base``."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def base_weights_file(path: str | Path) -> Path | None:
    """The local base-weights file a non-full checkpoint needs (verified against the recorded sha256), or None
    when the checkpoint is full (it needs no other file)."""
    blob = checkpoint_meta(path)
    if blob.get("full", True):
        return None
    recorded = blob["base"]
    local = resolve_checkpoint(recorded["source"])
    if local is None:
        return None
    _check_base(local, file_sha256(local), recorded, f"checkpoint {path}")
    return local


def build_model(cfg: ModelCfg, *, seed: int = 0) -> tuple[Segmenter, BaseWeights]:
    """The Segmenter of ``cfg`` with ``cfg.checkpoint``'s SAM2 weights loaded strictly before injection (the
    random-init path when it is ``none``), seeded by ``seed`` exactly as the random init is."""
    if cfg.checkpoint in ("none", "", None):
        return build_segmenter(cfg, seed=seed)
    torch.manual_seed(seed)
    sam, base = load_sam2(cfg.backbone, cfg.sam2_version, cfg.image_size, cfg.checkpoint)
    return build_segmenter(cfg, sam=sam, base=base)


def load_sam2(
    backbone: str, version: str, image_size: int, checkpoint: str
) -> tuple[nn.Module, BaseWeights]:
    """Build SAM2 and load weights strictly. ``checkpoint='none'`` = random init (logged loudly).

    Meta-format files load as they are; one of our models contributes its SAM2 part (:func:`medsam2_sam_state`).
    Position embeddings that depend on image size are interpolated by SAM2 itself at run time, so a 1024-px
    release checkpoint loads into a model built for a smaller ``image_size``.
    """
    model = build_sam2_base(backbone, version, image_size)
    if checkpoint in ("none", "", None):
        log.warning("model.checkpoint=none: SAM2 %s is RANDOMLY INITIALISED (no pretrained weights)", backbone)
        return model, BaseWeights("none", "none", "none")
    what = f"checkpoint {checkpoint!r}"
    with local_weights(checkpoint) as (path, model_base):
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(blob, dict) and "config" in blob:  # one of our models: its SAM2 part is the base
            state = medsam2_sam_state(blob, what, backbone, version, model.state_dict().keys(), model_base)
            load_state_strict(model, state, what)
            return model, BaseWeights(checkpoint, file_sha256(path), "medsam2")
        state = blob["model"] if isinstance(blob, dict) and "model" in blob else blob
        if any(k.startswith(("sam.", "decoder.")) for k in state):
            raise CheckpointMismatchError(
                f"{what} is a MedSAM2 training state (e.g. last.pt: Segmenter weights, no 'config'); "
                "point model.checkpoint at the run's final.pt or at a logged/registered model instead"
            )
        load_state_strict(model, state, what)
        return model, BaseWeights(checkpoint, file_sha256(path), "sam2")


def medsam2_sam_state(
    blob: dict, what: str, backbone: str, version: str, target_keys, base_weights: Path | None = None
) -> dict[str, torch.Tensor]:
    """The SAM2 weights of one of our models (a ``model_payload`` dict) under bare SAM2 keys.

    The model is rebuilt (``model_from_payload``, base weights from ``base_weights`` when
    given), LoRA layers are merged into the weights they wrap, ``base_layer`` wrappers are unwrapped; keys that
    are still not SAM2 keys (bottleneck adapters) are dropped with a warning, as is the decoder head outside
    SAM2 (``model.decoder`` ≠ ``sam2``). ``target_keys`` are the state-dict keys of the bare SAM2 to load into.
    """
    src = blob["config"]["model"]
    if (src["backbone"], src["sam2_version"]) != (backbone, version):
        raise CheckpointMismatchError(
            f"{what} is a MedSAM2 model of SAM2 {src['sam2_version']} {src['backbone']}; set "
            f"model.backbone={src['backbone']} model.sam2_version={src['sam2_version']} to start from it"
        )
    segmenter, _ = model_from_payload(blob, what, base_weights=base_weights)
    sam = segmenter.sam
    for module in sam.modules():  # peft LoRA layers: fold B·A·scale into the wrapped weight
        if hasattr(module, "lora_A") and hasattr(module, "merge") and not getattr(module, "merged", True):
            module.merge()
    state, lora, dropped = {}, 0, []
    target = set(target_keys)
    for key, value in sam.state_dict().items():
        bare = re.sub(r"\.base_layer(?=\.)", "", key)
        if bare in target:
            state[bare] = value.detach().cpu()
        elif ".lora_" in key:
            lora += 1
        else:
            dropped.append(key)
    if dropped:
        log.warning("%s: %d tensors of injected modules (%s, e.g. %s) are not part of SAM2 and are DROPPED: the "
                    "new model starts from the source's SAM2 weights without them", what, len(dropped),
                    src["adapter"], dropped[0])
    if src["decoder"] != "sam2":
        log.warning("%s: its %r decoder head is not part of SAM2 and is not carried over", what, src["decoder"])
    if lora:
        log.info("%s: LoRA merged into the SAM2 weights it adapts (%d LoRA tensors)", what, lora)
    return state
