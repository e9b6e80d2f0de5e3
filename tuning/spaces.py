"""Search spaces for ``run_sweep``, registered in ``SPACES`` (one registry per variant family).

A space is a function returning ``(param_space, base_overrides)``:

* ``param_space``: ``{dotted config key: tune sampler}``, e.g. ``{"model.adapter": tune.choice([...])}``.
  Keys are flat dotted strings (opaque names to Tune), applied to the base config per trial.
* ``base_overrides``: ``{dotted config key: value}`` fixed for every trial of the sweep (tiny model for
  ``smoke``, realistic steps for ``gpu_h100``). The user's ``--config`` / ``--set`` values come first and the
  space's base overrides win for the keys it names, so a space always runs what its name promises.

Constraints between sampled keys are resolved per trial by :func:`resolve_constraints` (not by
``tune.sample_from``), so every searcher — random or Optuna, which cannot take ``sample_from`` — sees a plain
space. Today: ``model.decoder=prompt_free`` forces ``model.prompt=none``.

``SPACE_RESOURCES`` gives each space's default per-trial resources (the GPU plan in ``infra/README.md``).

The adapters × decoders spaces search every registered adapter and decoder (``medsam2.registry``): a new
variant joins them by being registered.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from medsam2.config import ExperimentCfg, with_overrides
from medsam2.registry import ADAPTERS, DECODERS, Registry

SPACES = Registry("search_space")

SpaceFn = tuple[dict[str, Any], dict[str, Any]]

# Per-trial resources each space is sized for. hiera_t @1024 batch 8 peaks at ~11.5 GiB (bf16, BENCHMARKS.md),
# so four trials share one 80 GB H100 with room for the allocator's slack; a CPU trial takes one core.
SPACE_RESOURCES: dict[str, dict[str, float]] = {
    "smoke": {"cpus_per_trial": 1, "gpus_per_trial": 0},
    "adapters_x_decoders": {"cpus_per_trial": 3, "gpus_per_trial": 0.25},
    "gpu_h100": {"cpus_per_trial": 3, "gpus_per_trial": 0.25},
}


@SPACES.register("smoke")
def smoke() -> SpaceFn:
    """Four trials of a tiny random-init hiera_t at 64 px finish on two CPU cores in a couple of minutes.

    Two evaluations per trial (steps 2 and 4): ASHA decides at step 2 which trials go on.
    """
    space = {
        "model.adapter": tune.choice(["decoder_only", "lora"]),
        "model.decoder": tune.choice(["sam2", "multiscale"]),
        "train.lr": tune.loguniform(1e-5, 3e-3),
    }
    base = {
        "model.backbone": "hiera_t",
        "model.checkpoint": "none",
        "model.image_size": 64,
        "model.prompt": "box",
        "train.max_steps": 4,
        "train.batch_size": 1,
        "train.eval_every": 2,
        "train.checkpoint_every": 4,  # stopped trials need no checkpoint; the final one is reported
        "train.warmup_steps": 1,
        "train.progress": False,
        "train.device": "cpu",
        "data.num_workers": 0,
        "data.max_train_images": 8,
    }
    return space, base


def _adapter_decoder_space() -> dict[str, Any]:
    return {
        "model.adapter": tune.choice(ADAPTERS.names()),
        "model.decoder": tune.choice(DECODERS.names()),
        "train.lr": tune.loguniform(3e-5, 1e-3),
        "model.adapter_rank": tune.choice([4, 8, 16]),
        "model.bottleneck_ratio": tune.choice([0.125, 0.25, 0.5]),
        "train.loss": tune.choice(["dice_bce", "focal_dice"]),
        "data.augment": tune.choice(["light", "strong"]),
    }


@SPACES.register("adapters_x_decoders")
def adapters_x_decoders() -> SpaceFn:
    """Adapter × decoder × LR × adapter size × loss × augmentation × resolution (512 or 1024), from the released
    SAM2.1 hiera-t weights (frozen-trunk adapters on random features would rank nothing; ``--set
    model.checkpoint=none`` for an offline machine)."""
    space = {**_adapter_decoder_space(), "model.image_size": tune.choice([512, 1024])}
    base = {
        "model.backbone": "hiera_t",
        "model.checkpoint": "sam2.1_hiera_tiny",
        "train.max_steps": 1500,
        "train.batch_size": 8,
        "train.eval_every": 100,
        "train.checkpoint_every": 100,
        "train.warmup_steps": 50,
        "train.progress": False,
        "data.num_workers": 2,
    }
    return space, base


@SPACES.register("gpu_h100")
def gpu_h100() -> SpaceFn:
    """The adapters × decoders space at 1024 px with realistic steps, four trials per H100 (0.25 GPU each), from the
    released SAM2.1 hiera-t weights (downloaded once into the weights cache)."""
    space = _adapter_decoder_space()
    base = {
        "model.backbone": "hiera_t",
        "model.checkpoint": "sam2.1_hiera_tiny",
        "model.image_size": 1024,
        "train.max_steps": 3000,
        "train.batch_size": 8,
        "train.eval_every": 250,
        "train.checkpoint_every": 250,
        "train.warmup_steps": 100,
        "train.precision": "bf16",
        "train.device": "cuda",
        "train.progress": False,
        "data.num_workers": 2,
    }
    return space, base


def nest(dotted: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"model.adapter": "lora"}`` → ``{"model": {"adapter": "lora"}}``  (for ``with_overrides``)."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def resolve_constraints(params: dict[str, Any]) -> dict[str, Any]:
    """Make a sampled point valid: a prompt-free decoder takes no user prompt, so it gets
    ``model.prompt=none``. Other decoders keep the base config's prompt mode (box by default)."""
    out = dict(params)
    if out.get("model.decoder") == "prompt_free":
        out["model.prompt"] = "none"
    return out


def apply_params(cfg: ExperimentCfg, params: dict[str, Any]) -> ExperimentCfg:
    """``cfg`` with the dotted ``params`` applied (constraints resolved); validated by pydantic."""
    return with_overrides(cfg, **nest(resolve_constraints(params)))


def space_base_cfg(name: str, cfg: ExperimentCfg) -> ExperimentCfg:
    """``cfg`` with the space's base overrides applied."""
    _, base = SPACES.create(name)
    return apply_params(cfg, base)
