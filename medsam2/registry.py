"""One small generic registry per variant family (adapters, decoders, losses, strategies, search spaces).

Usage, timm-style::

    ADAPTERS = Registry("adapter")

    @ADAPTERS.register("lora")
    def lora(model, rank: int = 8): ...

    ADAPTERS.create("lora", model, rank=4)
    ADAPTERS.names()  # ['lora', ...]

A registry is the one source of its family's names: config validation (``medsam2.config``), the CLI's help and
the search spaces (``tuning/spaces.py``) all read ``names()``. The families a config names (adapters,
decoders, semi-supervised strategies, losses, box priors) are declared here, at the bottom layer, with the
``package`` whose import registers its variants; that package is imported on the first lookup (``names()``,
``in``, ``get``), as a plugin lookup by name, so the config layer can check a name without importing the
network. Adding a variant is one module in the family's folder plus its import line in the family's
``__init__``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T", bound=Callable[..., Any])


class Registry(Generic[T]):
    """Maps a name to a factory. Registering a name twice is an error, as is asking for an unknown one.

    ``package``: a module whose import registers the variants; imported on the first lookup (None: the
    variants register where the registry is defined)."""

    def __init__(self, kind: str, package: str | None = None) -> None:
        self.kind = kind
        self.package = package
        self._items: dict[str, T] = {}
        self._loaded = package is None

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # first: the package's own lookups while it imports must not import it again
        try:
            importlib.import_module(self.package)  # type: ignore[arg-type]
        except BaseException:
            self._loaded = False
            raise

    def register(self, name: str) -> Callable[[T], T]:
        def deco(fn: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = fn
            return fn

        return deco

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}") from None

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items


ADAPTERS: Registry = Registry("adapter", package="medsam2.model.adapters")
"""How a SAM2 model is made trainable (``medsam2.model.adapters``): ``fn(model, cfg) -> None``."""
DECODERS: Registry = Registry("decoder", package="medsam2.model.decoders")
"""Mask decoders (``medsam2.model.decoders``): ``DECODERS.create(name, sam, cfg) -> nn.Module``."""
STRATEGIES: Registry = Registry("semisup", package="medsam2.semisup")
"""Semi-supervised strategies (``medsam2.semisup``): ``STRATEGIES.create(name, model, cfg)``."""
LOSSES: Registry = Registry("loss", package="medsam2.losses")
"""Segmentation losses (``medsam2.losses``): ``fn(logits, target, valid=None, **options) -> Tensor``."""
PRIORS: Registry = Registry("box prior", package="medsam2.model.priors")
"""Box priors (``medsam2.model.priors``): ``fn(boxes, size) -> (B,1,S,S)`` log-odds."""
