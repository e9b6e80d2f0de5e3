"""Semi-supervised strategies behind one interface, plugged into the one training loop.

A strategy is built by ``STRATEGIES.create(name, model, cfg)`` and offers::

    needs_unlabelled: bool
    extra_modules() -> list[nn.Module]          # e.g. a discriminator; their parameters join the optimiser
    losses(model, batch, unlabelled, step) -> dict[str, Tensor]   # must hold "loss" (scalar to minimise)
    after_step(model) -> None                   # e.g. EMA-teacher update

``none`` is plain supervised training; it is what every other strategy adds to.
"""

from medsam2.semisup import (  # noqa: E402,F401,I001
    adversarial,
    mean_teacher,
    mutual_consistency,
    supervised,  # noqa: E402,F401  (registers "none")
)
from medsam2.semisup.base import STRATEGIES

__all__ = ["STRATEGIES"]
