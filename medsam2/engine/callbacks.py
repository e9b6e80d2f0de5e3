"""Training callbacks: tracking (MLflow, in ``medsam2.tracking``), Tune reporting (in ``tuning/``), ..."""

from __future__ import annotations

from typing import Any


class Callback:
    """Override what you need. ``logs``/``metrics`` hold plain floats (already synced to the host)."""

    def on_train_start(self, info: dict[str, Any]) -> None: ...

    def on_step(self, step: int, logs: dict[str, float]) -> None: ...

    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, step: int, path: str) -> None: ...

    def on_train_end(self, result: Any) -> None: ...


class CallbackList(Callback):
    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = list(callbacks)

    def on_train_start(self, info):
        for c in self.callbacks:
            c.on_train_start(info)

    def on_step(self, step, logs):
        for c in self.callbacks:
            c.on_step(step, logs)

    def on_eval(self, step, metrics):
        for c in self.callbacks:
            c.on_eval(step, metrics)

    def on_checkpoint(self, step, path):
        for c in self.callbacks:
            c.on_checkpoint(step, path)

    def on_train_end(self, result):
        for c in self.callbacks:
            c.on_train_end(result)
