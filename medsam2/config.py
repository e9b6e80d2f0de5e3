"""Typed, frozen experiment configuration (pydantic v2, ``extra="forbid"``).

A config comes from defaults, then an optional YAML file (``--config``), then dotted overrides
(``--set train.lr=1e-4``). Its identity is :func:`config_hash` of the resolved values.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medsam2.config_input import OneOf, config_error, numbers_as_text, parse_value
from medsam2.errors import ConfigError, register_translator
from medsam2.home import medsam2_home
from medsam2.registry import ADAPTERS, DECODERS, LOSSES, PRIORS, STRATEGIES

#: The relative work dir a config without ``data.workdir`` had before it moved under ``MEDSAM2_HOME``; the config
#: hash still reads the default work dir as this, so that an unchanged config keeps its identity.
_LEGACY_WORKDIR = ".medsam2/work"


def default_workdir() -> str:
    """``data.workdir`` when a config does not set it: ``$MEDSAM2_HOME/work`` (absolute), read when the config is
    built, so nothing is written outside ``MEDSAM2_HOME`` by default."""
    return str(medsam2_home() / "work")


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _typed_numbers_as_text(cls, data: Any) -> Any:
        """``sam2_version: 2.1`` in YAML is a float: a text field takes the number as the text the user typed."""
        return numbers_as_text(cls, data)


class DataCfg(_Cfg):
    workdir: str = Field(default_factory=default_workdir)
    """Ingest work dir: ``manifest.parquet``, ``quarantine.parquet``, ``cache/``. Default: ``$MEDSAM2_HOME/work``
    (:func:`default_workdir`)."""
    source: str | None = None
    """Folder or ``s3://bucket/prefix`` to ingest before training (flows only); None = use the manifest as is."""
    train_datasets: list[str] | None = None
    """Manifest ``dataset`` values to train on (None = every dataset with train rows)."""
    eval_datasets: list[str] | None = None
    """Datasets whose ``test`` rows are evaluated (None = the train datasets)."""
    label_fraction: float = Field(1.0, gt=0, le=1)
    """Fraction of labelled train rows kept as labelled (rest become unlabelled), for label-efficiency runs."""
    weak_labels: bool = False
    """Also train on weak labels: box-only rows (box-supervised loss) and image-level "no finding" rows (empty
    mask). With ``label_fraction`` < 1 the hidden-mask rows keep their box as a weak label instead of joining
    the unlabelled pool."""
    augment: Literal["none", "light", "strong"] = "light"
    num_workers: int = Field(0, ge=0)
    max_train_images: int | None = None
    max_eval_images: int | None = None


class ModelCfg(_Cfg):
    backbone: Literal["hiera_t", "hiera_s", "hiera_b+", "hiera_l"] = "hiera_t"
    sam2_version: Literal["2.0", "2.1"] = "2.1"
    image_size: int = Field(1024, ge=64)
    """Square input side in pixels; must be a multiple of 32 (Hiera patch 4 × 3 poolings)."""
    checkpoint: str = "none"
    """Local path, s3://, https://, MLflow model URI, release name (``sam2.1_hiera_tiny``) or ``none``."""
    adapter: Annotated[str, OneOf(ADAPTERS)] = "full"
    """A registered adapter (``medsam2.model.adapters``; ``medsam2 train --help`` lists them)."""
    adapter_rank: int = Field(8, ge=1)
    """LoRA rank (``adapter: lora``)."""
    bottleneck_ratio: float = Field(0.25, gt=0, le=4)
    """Bottleneck adapter width as a fraction of each Hiera stage's width (``adapter: bottleneck``)."""
    lora_decoder: bool = False
    decoder: Annotated[str, OneOf(DECODERS)] = "sam2"
    """A registered decoder (``medsam2.model.decoders``)."""
    prompt: Literal["box", "points", "none"] = "box"
    box_jitter: float = Field(0.1, ge=0, le=1)
    """Max box-corner shift as a fraction of the box side (training only)."""
    box_mask: bool = False
    """Also give the box to SAM's prompt encoder as a dense mask (the box filled, at S/4): a spatial prior that a
    randomly initialised model learns from far sooner than from the corner tokens alone. ``prompt: box`` only."""
    box_prior: Annotated[str, OneOf(PRIORS, ("none",))] = "none"
    """``none`` or a registered box prior (``medsam2.model.priors``: ``ellipse``, ``box``): the mask logits are the
    prior's log-odds plus a zero-initialised learned correction, so an untrained model already scores the trivial
    baseline and training refines it. ``prompt: box`` only."""
    box_crop: float | None = Field(None, ge=0, le=4)
    """Box-centred crops: train and predict on the box grown by this fraction of its side on each side, resized
    to the model input and pasted back at full resolution (``medsam2.data.crops``). None = the whole image.
    ``prompt: box`` only."""
    tta_flip: bool = False
    """Inference only: average the logits of the image and of its left-right mirror image (2× the compute)."""
    num_pos_points: int = Field(1, ge=0)
    num_neg_points: int = Field(0, ge=0)
    prompt_tokens: int = Field(4, ge=1)
    """Learned prompt tokens of the ``prompt_free`` decoder."""
    memory: bool = False
    """Train SAM2's memory (memory encoder, memory attention, object pointers) on clips of ``train.clip_length``
    consecutive volume slices, the prompt (box) on the first, the loss on every slice (``medsam2.data.clips``);
    those modules then train beside the adapter's. Needs ``decoder: sam2``, ``prompt: box``, ``semisup: none``."""

    @model_validator(mode="after")
    def _check(self) -> ModelCfg:
        if self.memory and (self.decoder != "sam2" or self.prompt != "box" or self.box_crop is not None
                            or self.box_prior != "none" or self.box_mask):
            raise ValueError("model.memory=true trains SAM2's own memory path: it needs model.decoder=sam2 and "
                             "model.prompt=box, without box_crop, box_prior or box_mask")
        if self.image_size % 32:
            raise ValueError(f"model.image_size must be a multiple of 32, got {self.image_size}")
        if self.decoder == "prompt_free" and self.prompt != "none":
            raise ValueError("model.decoder=prompt_free takes no user prompt: set model.prompt=none")
        for name, on in (("box_mask", self.box_mask), ("box_prior", self.box_prior != "none"),
                         ("box_crop", self.box_crop is not None)):
            if on and self.prompt != "box":
                raise ValueError(f"model.{name} needs model.prompt=box (got model.prompt={self.prompt})")
        if self.prompt == "points" and self.num_pos_points + self.num_neg_points == 0:
            raise ValueError("model.prompt=points needs num_pos_points + num_neg_points > 0")
        return self


class TrainCfg(_Cfg):
    clip_length: int = Field(4, ge=2, le=64)
    """Slices per training clip with ``model.memory: true`` (K consecutive slices of one volume)."""
    max_steps: int = Field(300, ge=1)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(20, ge=0)
    clip_grad: float = Field(1.0, ge=0)
    ema_decay: float = Field(0.0, ge=0, lt=1)
    loss: Annotated[str, OneOf(LOSSES)] = "dice_bce"
    loss_options: dict[str, float] = Field(default_factory=dict)
    """Keyword options of the loss (``train.loss_options.bce_weight=2``); see ``medsam2.losses``."""
    iou_weight: float = Field(0.1, ge=0)
    """Weight of the IoU-head MSE (SAM's predicted IoU, used for pseudo-label confidence) in the total loss."""
    seed: int = 0
    output_dir: str | None = None
    """Checkpoints go here; rerunning with the same dir resumes from its last checkpoint. None (the default):
    ``$MEDSAM2_HOME/runs/<name>/<config hash>-<data version>`` (``engine.train.output_dir_of``), so a rerun of
    the same settings on the same data resumes and anything else starts its own run."""
    checkpoint_every: int = Field(50, ge=1)
    eval_every: int = Field(100, ge=1)
    max_minutes: float | None = Field(None, gt=0)
    """Wall-clock budget: stop (with a final checkpoint) once training has run this long. None = no limit."""
    early_stop_patience: int = Field(0, ge=0)
    """Evaluations without val-Dice improvement before stopping (0 = never stop early)."""
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    """torch.compile the image encoder (GPU; compile time is logged; falls back to eager on failure)."""
    activation_checkpointing: bool = False
    """Recompute Hiera block activations in backward (hiera_l / large batches at 1024 px)."""
    progress: bool = True
    num_workers: int = Field(1, ge=1)
    """Data-parallel workers training one model (Ray Train's ``TorchTrainer``, launched by ``tuning.distributed``;
    gloo on CPU, NCCL on GPU). ``batch_size`` stays the global batch: each worker takes ``batch_size /
    num_workers`` of it. Where a run trains, not what it trains: not in the config hash (1 and N workers reach
    the same weights, ``tests/tuning/test_distributed.py``)."""
    use_gpu: bool = False
    """One GPU per worker (``gpus_per_worker``) when ``num_workers > 1``."""
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _check_workers(self) -> TrainCfg:
        if self.batch_size % self.num_workers:
            raise ValueError(f"train.batch_size is the global batch and must split evenly over "
                             f"train.num_workers: {self.batch_size} images over {self.num_workers} workers")
        return self

    @model_validator(mode="after")
    def _check_loss(self) -> TrainCfg:
        from medsam2.losses import create_loss

        try:
            create_loss(self.loss, **self.loss_options)  # unknown option: an error now, not mid-run
        except (KeyError, TypeError) as e:
            raise ValueError(str(e).strip("'\"")) from None
        return self


class SemiSupCfg(_Cfg):
    method: Annotated[str, OneOf(STRATEGIES)] = "none"
    """A registered semi-supervised strategy (``medsam2.semisup``); ``none`` is plain supervised training."""
    unlabelled_weight: float = Field(0.5, ge=0)
    self_training_rounds: int = Field(0, ge=0)
    confidence: Literal["mean_prob", "entropy", "pred_iou"] = "mean_prob"
    threshold: float = Field(0.8, ge=0, le=1)


class VolumeCaseCfg(_Cfg):
    """One volume of the 3-D evaluation (``eval.volumes``): an image volume and its label volume."""

    image: str
    """NIfTI image volume (``.nii`` / ``.nii.gz``)."""
    label: str
    """NIfTI label volume on the image's voxel grid."""
    labels: tuple[int, ...] = ()
    """Label values that make the target; empty: every non-zero value."""
    name: str | None = None
    """Name in the report (default: the image file's name)."""


class EvalCfg(_Cfg):
    split: str = "test"
    gallery_size: int = Field(8, ge=0)
    baselines: bool = True
    batch_size: int = Field(8, ge=1)
    robustness: bool = False
    cross_dataset: bool = False
    images: bool = True
    """Score the manifest split's images; false (with ``eval.volumes``) scores the volumes only."""
    volumes: tuple[VolumeCaseCfg, ...] = ()
    """3-D evaluation: per-volume Dice, HD95, NSD of SAM2-memory propagation from the key slice's prompt, beside
    the oracle slice-by-slice and the key prompt reused on every slice (``medsam2.engine.volume_eval``)."""
    nsd_tolerance_mm: float = Field(2.0, gt=0)
    """Tolerance of the normalised surface Dice, in mm."""


class PromotionCfg(_Cfg):
    model_name: str = "medsam2"
    metric: str = "dice"
    margin: float = 0.0
    """Challenger must beat the champion's mean metric by at least this much (and always by more than 0)."""
    guarded: dict[str, float] = Field(default_factory=dict)
    """metric → largest tolerated regression (challenger − champion ≥ −tolerance)."""
    n_bootstrap: int = Field(1000, ge=0)
    """Paired-bootstrap resamples; 0 turns the confidence test off (mean differences only)."""
    confidence: float = Field(0.95, ge=0, lt=1)
    """Required P(improvement > 0) under the paired bootstrap, against the trivial baseline and the champion."""
    seed: int = 0
    """Seed of the gate's bootstrap: the same results always give the same decision."""
    selection_split: str = "val"
    """Labelled non-test split the gate decides on; the frozen test split is only reported, never decided on."""

    @model_validator(mode="after")
    def _never_decide_on_test(self) -> PromotionCfg:
        if self.selection_split == "test":
            raise ValueError("promotion.selection_split must not be 'test': the frozen test split is for "
                             "reporting only (use 'val')")
        return self


class TrackingCfg(_Cfg):
    tracking_uri: str | None = None
    """None = ``MLFLOW_TRACKING_URI`` or the local ``.medsam2/mlruns`` store."""
    experiment: str = "medsam2"


class ExperimentCfg(_Cfg):
    name: str = "medsam2"
    data: DataCfg = Field(default_factory=DataCfg)  # a factory: the default work dir is read per config
    model: ModelCfg = ModelCfg()
    train: TrainCfg = TrainCfg()
    semisup: SemiSupCfg = SemiSupCfg()
    eval: EvalCfg = EvalCfg()
    promotion: PromotionCfg = PromotionCfg()
    tracking: TrackingCfg = TrackingCfg()

    @model_validator(mode="after")
    def _memory_is_supervised(self) -> ExperimentCfg:
        if self.model.memory and self.semisup.method != "none":
            raise ValueError(f"model.memory=true trains on labelled clips only: semisup.method={self.semisup.method}"
                             " needs model.memory=false")
        return self


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override key {key!r} has an empty part", "write --set section.key=value, e.g. "
                          "--set train.lr=1e-4")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {key!r}: {p!r} is not a section", "set its value with --set "
                              f"{'.'.join(parts[: parts.index(p) + 1])}=VALUE")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["train.lr=1e-4", "model.prompt=none"]`` → nested dict.

    Values are YAML scalars (``true``, ``null``, ``[a, b]``, ``1e-4``), except that a text field (``str`` or a
    ``Literal`` of strings) keeps the text as typed: ``model.sam2_version=2.1`` is ``"2.1"``, not ``2.1``.
    """
    tree: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value", "write --set section.key=value, e.g. "
                              "--set train.lr=1e-4")
        key, raw = item.split("=", 1)
        key = key.strip()
        _set_dotted(tree, key, parse_value(ExperimentCfg, key, raw))
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _validate(tree: dict[str, Any], where: str) -> ExperimentCfg:
    try:
        return ExperimentCfg.model_validate(tree)
    except ValidationError as e:
        raise config_error(e, ExperimentCfg, where) from None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> ExperimentCfg:
    """Resolve defaults ← ``base`` ← YAML file ← dotted overrides into a validated :class:`ExperimentCfg`.

    Raises:
        ConfigError: (a ``ValueError``) a missing or malformed file, an unknown key (naming the closest valid
            ones), a bad value (naming the choices).
    """
    tree: dict[str, Any] = dict(base or {})
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist", "pass an existing YAML file to --config "
                              "(see configs/)")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {' '.join(str(e).split())}", "fix the file") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config file must hold a mapping", "write section: {key: value} pairs, "
                              "e.g. train: {lr: 0.0001}")
        tree = _merge(tree, loaded)
    tree = _merge(tree, parse_overrides(overrides))
    where = " and ".join(w for w, on in ((f"--config {path}", path), ("--set", overrides)) if on) or "config"
    return _validate(tree, where)


def with_overrides(cfg: ExperimentCfg, **sections: dict[str, Any]) -> ExperimentCfg:
    """Copy ``cfg`` with some section fields replaced, re-validated: ``with_overrides(cfg, train={"lr": 1e-3})``."""
    return _validate(_merge(cfg.model_dump(), sections), "--set")


RUN_ENVIRONMENT = ("num_workers", "use_gpu", "cpus_per_worker", "gpus_per_worker")
"""``train`` fields that say where a run trains, not what it trains: left out of :func:`config_hash`."""


#: fields added after runs were identified by their hash, with their defaults: left out of the hash when they hold
#: their default, so every earlier config keeps its identity (and its run directory, and its resume)
_ADDED_DEFAULTS: dict[tuple[str, str], Any] = {
    ("model", "memory"): False, ("train", "clip_length"): 4,
    ("eval", "images"): True, ("eval", "volumes"): [], ("eval", "nsd_tolerance_mm"): 2.0,
}


def config_hash(cfg: ExperimentCfg) -> str:
    """Stable 12-hex identity of the resolved config (paths are part of identity; how many workers train it,
    :data:`RUN_ENVIRONMENT`, is not). The default
    work dir (``$MEDSAM2_HOME/work``) counts as the relative ``.medsam2/work`` it replaced, so a config that sets
    no work dir has the same hash as before, wherever ``MEDSAM2_HOME`` is."""
    values = cfg.model_dump(mode="json")
    for key in RUN_ENVIRONMENT:
        values["train"].pop(key)
    for (section, key), default in _ADDED_DEFAULTS.items():  # fields added later count only when set
        if values[section].get(key) == default:
            values[section].pop(key)
    if values["data"]["workdir"] == default_workdir():
        values["data"]["workdir"] = _LEGACY_WORKDIR
    blob = json.dumps(values, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _translate_validation_error(exc: BaseException) -> ConfigError | None:
    """A pydantic ValidationError raised while building an :class:`ExperimentCfg` (or one of its parts) anywhere
    → the CLI's one-line config error (``medsam2.errors.describe``)."""
    if isinstance(exc, ValidationError):
        return config_error(exc, ExperimentCfg)
    return None


register_translator(_translate_validation_error)
