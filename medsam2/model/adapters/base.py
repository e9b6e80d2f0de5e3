"""The adapter registry, ``ADAPTERS``. It is declared in ``medsam2.registry``, so that config validation, the
CLI's help and the search spaces read its names without importing this package, and re-exported here, a leaf
module, so that the variants register into it without importing their package."""

from medsam2.registry import ADAPTERS

__all__ = ["ADAPTERS"]
