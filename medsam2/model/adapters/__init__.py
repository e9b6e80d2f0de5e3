"""Adapter registry: how a SAM2 model is made trainable (freeze policy + injected modules).

Each adapter is ``fn(model: Segmenter, cfg: ModelCfg) -> None``; it injects modules in place and sets
``requires_grad``. Injected modules start as no-ops (zero-initialised), so the adapted model computes exactly
what the base model computed until it is trained.
"""

from medsam2.model.adapters import bottleneck, freeze, lora  # noqa: E402,F401  (registers the variants)
from medsam2.model.adapters.base import ADAPTERS

__all__ = ["ADAPTERS"]
