"""Build SAM2 / SAM2.1 from the ``sam2`` package's own configs and load state dicts strictly.

This is the only module that imports ``sam2`` or hydra. The model is never forked: we compose Meta's config,
instantiate ``SAM2Base`` and wrap it (see ``segmenter.py``). Where weights come from (a path, ``s3://``,
``https://``, a release name, an MLflow model) is ``engine.weights``'s business, and loading a file into this
model (Meta's ``{"model": state_dict}`` or the SAM2 part of one of our own models) ``engine.checkpoint``'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

BACKBONE_CONFIG = {"hiera_t": "t", "hiera_s": "s", "hiera_b+": "b+", "hiera_l": "l"}
RELEASE_NAME = {"hiera_t": "tiny", "hiera_s": "small", "hiera_b+": "base_plus", "hiera_l": "large"}
RELEASE_URL = {
    "2.0": "https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_{size}.pt",
    "2.1": "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_{size}.pt",
}


class CheckpointMismatchError(RuntimeError):
    """Raised when a checkpoint's keys do not match the model exactly (no silent partial loads)."""


@dataclass(frozen=True)
class BaseWeights:
    """Identity of the weights a model started from: ``source`` as given, ``sha256`` of the file (or 'none'),
    ``kind``: ``sam2`` (a Meta-format file), ``medsam2`` (the SAM2 part of one of our models) or ``none``."""

    source: str
    sha256: str
    kind: str = "sam2"

    @property
    def random_init(self) -> bool:
        return self.source == "none"

    @property
    def reloadable(self) -> bool:
        """Whether a checkpoint may keep only its trainable tensors and rebuild the rest from ``source``."""
        return self.kind == "sam2" and not self.random_init


def sam2_config_name(backbone: str, version: str) -> str:
    """Hydra config name inside the ``sam2`` package, e.g. ``configs/sam2.1/sam2.1_hiera_t.yaml``."""
    size = BACKBONE_CONFIG[backbone]
    return f"configs/sam2/sam2_hiera_{size}.yaml" if version == "2.0" else f"configs/sam2.1/sam2.1_hiera_{size}.yaml"


def build_sam2_base(backbone: str = "hiera_t", version: str = "2.1", image_size: int = 1024, *,
                    video_predictor: bool = False) -> nn.Module:
    """Instantiate an un-initialised ``SAM2Base`` from Meta's config at ``image_size`` (multiple of 32).

    ``video_predictor``: a ``sam2.sam2_video_predictor.SAM2VideoPredictor`` instead (a ``SAM2Base`` subclass with
    the same parameters and state dict, plus the predictor's API): the reference of the volume parity test."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    if not GlobalHydra.instance().is_initialized():
        initialize_config_module("sam2", version_base="1.2")
    overrides = [f"++model.image_size={image_size}"]
    if video_predictor:
        overrides.append("++model._target_=sam2.sam2_video_predictor.SAM2VideoPredictor")
    cfg = compose(config_name=sam2_config_name(backbone, version), overrides=overrides)
    OmegaConf.resolve(cfg)
    return instantiate(cfg.model, _recursive_=True)


def release_url(name: str) -> str | None:
    """``sam2.1_hiera_tiny`` → Meta's download URL; None if ``name`` is not a release name."""
    for version, url in RELEASE_URL.items():
        prefix = "sam2_hiera_" if version == "2.0" else "sam2.1_hiera_"
        if name.startswith(prefix) and name[len(prefix):] in RELEASE_NAME.values():
            return url.format(size=name[len(prefix):])
    return None


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the missing and unexpected keys."""
    own = set(module.state_dict().keys())
    given = set(state.keys())
    missing, unexpected = sorted(own - given), sorted(given - own)
    if missing or unexpected:
        hint = ""
        if any("no_obj_embed_spatial" in k or "obj_ptr_tpos_proj" in k for k in missing + unexpected):
            hint = " (this looks like a SAM2 vs SAM2.1 mismatch: set model.sam2_version accordingly)"
        raise CheckpointMismatchError(
            f"{what} does not match the model{hint}: {len(missing)} missing keys {missing[:10]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:10]}"
        )
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(module.state_dict()[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(module.state_dict()[k].shape)
    ]
    if shapes:
        raise CheckpointMismatchError(f"{what} has tensors of the wrong shape: {shapes[:10]}")
    module.load_state_dict(state, strict=True)
