"""The semisup registry: the one source of the semi-supervised strategies' names (config validation, CLI help and search
spaces read it). A leaf module, so that the variants register into it without importing their package."""

from medsam2.registry import Registry

STRATEGIES: Registry = Registry("semisup")
