"""The decoder registry: the one source of the decoders' names (config validation, CLI help and search
spaces read it). A leaf module, so that the variants register into it without importing their package."""

from medsam2.registry import Registry

DECODERS: Registry = Registry("decoder")
