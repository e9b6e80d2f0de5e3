"""Training callbacks: tracking (MLflow, in ``medsam2.tracking``), Tune reporting (in ``tuning/``), ..."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medsam2.config import ExperimentCfg


@dataclass(frozen=True, eq=False)
class TrainStart:
    """What ``on_train_start`` is told about a run (``info.data_version``, ``info.resumed_from``, …)."""

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
    precision: str = "fp32"
    """What autocast runs: ``bf16`` or ``fp32`` (``train.precision`` after the CPU fallback)."""
    compiled: bool = False
    """Whether the image encoder runs ``torch.compile``d (``train.compile`` and the compile succeeded)."""
    compile_error: str | None = None
    num_workers: int = 1
    """Data-parallel workers training this run (``train.num_workers``)."""


class Callback:
    """Override what you need. ``logs``/``metrics`` hold plain floats (already synced to the host).

    With N data-parallel workers each runs its own callbacks, every hook on every rank at the same steps
    (``on_eval`` with rank 0's metrics: it alone evaluates); the launcher gives logging callbacks to rank 0."""

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
