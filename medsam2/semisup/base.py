"""The semi-supervised strategy registry, ``STRATEGIES``. It is declared in ``medsam2.registry``, so that config
validation, the CLI's help and the search spaces read its names without importing this package, and re-exported
here, a leaf module, so that the variants register into it without importing their package."""

from medsam2.registry import STRATEGIES

__all__ = ["STRATEGIES"]
