"""Training callbacks: tracking (MLflow, in ``medsam2.tracking``), Tune reporting (in ``tuning/``), ..."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medsam2.config import ExperimentCfg


@dataclass(frozen=True, eq=False)
class TrainStart(Mapping[str, Any]):
    """What ``on_train_start`` is told about a run. Read it by attribute (``info.data_version``) or, as a
    read-only mapping, by key (``info["data_version"]``)."""

    config: ExperimentCfg
    trainable_params: int
    total_params: int
    device: str
    base_weights: dict[str, str]
    """``source``, ``sha256`` and the rest of the base weights' ``BaseWeights``."""
    data_version: str
    train_images: int
    val_images: int
    unlabelled_images: int
    resumed_from: int
    """The step this attempt starts from (0: a fresh run)."""

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    @classmethod
    def _keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


class Callback:
    """Override what you need. ``logs``/``metrics`` hold plain floats (already synced to the host)."""

    def on_train_start(self, info: TrainStart) -> None: ...

    def on_step(self, step: int, logs: dict[str, float]) -> None: ...

    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, step: int, path: str) -> None: ...

    def on_train_end(self, result: Any) -> None: ...


class CallbackList(Callback):
    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = list(callbacks)

    def on_train_start(self, info: TrainStart) -> None:
        for c in self.callbacks:
            c.on_train_start(info)

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        for c in self.callbacks:
            c.on_step(step, logs)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        for c in self.callbacks:
            c.on_eval(step, metrics)

    def on_checkpoint(self, step: int, path: str) -> None:
        for c in self.callbacks:
            c.on_checkpoint(step, path)

    def on_train_end(self, result: Any) -> None:
        for c in self.callbacks:
            c.on_train_end(result)
