"""Build SAM2 / SAM2.1 from the ``sam2`` package's own configs and load weights strictly.

This is the only module that imports ``sam2`` or hydra. The model is never forked: we compose Meta's config,
instantiate ``SAM2Base`` and wrap it (see ``segmenter.py``).

Checkpoint sources (``model.checkpoint``): a local path, ``s3://bucket/key``, ``https://…``, an MLflow model URI
(``models:/name@alias``, ``runs:/…``), a release name such as ``sam2.1_hiera_tiny``, or ``none`` (random init,
recorded loudly). Meta's files hold ``{"model": state_dict}``. Our own models (a ``final.pt``, or a registered /
logged MLflow model) hold ``{"model": …, "config": …}``: used as a base, the model is rebuilt
(``engine.checkpoint``) and the SAM2 part of it is taken — LoRA merged into the weights it adapts, other injected
modules (bottleneck adapters) and the decoder head outside SAM2 dropped with a warning — so a new run can
fine-tune starting from the champion.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medsam2.hashing import file_sha256

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


def build_sam2_base(backbone: str = "hiera_t", version: str = "2.1", image_size: int = 1024) -> nn.Module:
    """Instantiate an un-initialised ``SAM2Base`` from Meta's config at ``image_size`` (multiple of 32)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    if not GlobalHydra.instance().is_initialized():
        initialize_config_module("sam2", version_base="1.2")
    overrides = [f"++model.image_size={image_size}"]
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


def _cache_dir() -> Path:
    from medsam2.home import medsam2_home

    home = medsam2_home()
    return Path(os.environ.get("MEDSAM2_WEIGHTS_CACHE", home / "weights"))


def _download(url: str, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 (https release URLs only)
                shutil.copyfileobj(resp, tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        except Exception:
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, dest)
    return dest


def resolve_checkpoint(source: str) -> Path | None:
    """Turn ``model.checkpoint`` into a local file (downloading / fetching into the weights cache if needed).

    Returns None for ``none``. Raises ``FileNotFoundError`` with the source named when it cannot be had
    (e.g. offline and not cached).
    """
    if source in ("none", "", None):
        return None
    url = release_url(source)
    if url is not None:
        dest = _cache_dir() / f"{source}.pt"
        if dest.exists():
            return dest
        try:
            return _download(url, dest)
        except OSError as exc:
            raise FileNotFoundError(
                f"release {source!r} is not cached at {dest} and could not be downloaded from {url}: {exc}. "
                "Copy the file there, or pass a local path."
            ) from exc
    if source.startswith(("https://", "http://")):
        dest = _cache_dir() / hashlib.sha256(source.encode()).hexdigest()[:16] / Path(source).name
        return dest if dest.exists() else _download(source, dest)
    if source.startswith("s3://"):
        import boto3

        bucket, _, key = source[5:].partition("/")
        dest = _cache_dir() / "s3" / bucket / key
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            endpoint = os.environ.get("MEDSAM2_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
            boto3.client("s3", endpoint_url=endpoint).download_file(bucket, key, str(dest))
        return dest
    if source.startswith(("models:/", "runs:/")):
        from medsam2.tracking import download_model_checkpoint

        return download_model_checkpoint(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {source!r} does not exist")
    return path


@contextmanager
def local_weights(source: str) -> Iterator[tuple[Path, Path | None]]:
    """``model.checkpoint`` (not ``none``) → (local file, base-weights file of that model or None) while the
    ``with`` lasts. Only an MLflow model has the second, the base weights logged with it (``tracking.log_model``);
    its download is removed afterwards."""
    if source.startswith(("models:/", "runs:/")):
        from medsam2.tracking import downloaded_model

        with downloaded_model(source) as files:
            yield files["checkpoint"], files.get("base_weights")
    else:
        yield resolve_checkpoint(source), None


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

    The model is rebuilt (``engine.checkpoint.model_from_payload``, base weights from ``base_weights`` when
    given), LoRA layers are merged into the weights they wrap, ``base_layer`` wrappers are unwrapped; keys that
    are still not SAM2 keys (bottleneck adapters) are dropped with a warning, as is the decoder head outside
    SAM2 (``model.decoder`` ≠ ``sam2``). ``target_keys`` are the state-dict keys of the bare SAM2 to load into.
    """
    from medsam2.engine.checkpoint import model_from_payload

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
