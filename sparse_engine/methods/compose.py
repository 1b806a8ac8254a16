"""Compose: several methods on one model, e.g. Sign-In + weight-decay switch-off.

At most one member may sparsify the model (the others must have ``sparsify_as = None``). Hooks run in
the given order; the logs are merged; the first Retrain request wins.
"""
from __future__ import annotations

from typing import Any

from .base import Method, Retrain


class Compose(Method):
    def __init__(self, methods: list[Method]) -> None:
        if not methods or not all(isinstance(m, Method) for m in methods):
            raise ValueError("methods must be a non-empty list of Method objects")
        sparsifiers = [m.name for m in methods if m.sparsify_as is not None]
        if len(sparsifiers) > 1:
            raise ValueError(f"only one method may sparsify the model, got {sparsifiers}")
        self.methods = list(methods)
        self.name = "+".join(m.name for m in methods)
        self.config = next((m.config for m in methods if m.sparsify_as is not None), methods[0].config)
        self.model = None
        self.optimizer = None
        self.epochs = self.steps_per_epoch = 0
        self._hook = None
        self._last_step = 0
        self.log = {}

    @property
    def sparsify_as(self) -> str | None:  # type: ignore[override]
        return next((m.sparsify_as for m in self.methods if m.sparsify_as is not None), None)

    @property
    def factor_lr_scale(self) -> float | None:  # type: ignore[override]
        return next((m.factor_lr_scale for m in self.methods if m.factor_lr_scale), None)

    def prepare(self, model, batch=None, loss_fn=None):
        main = next((m for m in self.methods if m.sparsify_as is not None), None)
        return None if main is None else main.prepare(model, batch, loss_fn)

    def setup(self) -> None:
        for m in self.methods:
            m.model, m.optimizer = self.model, self.optimizer
            m.epochs, m.steps_per_epoch = self.epochs, self.steps_per_epoch
            m._last_step = self._last_step
            m.setup()

    def after_step(self, step: int) -> None:
        for m in self.methods:
            m.after_step(step)

    def after_epoch(self, epoch: int, train_acc: float | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for m in self.methods:
            out.update(m.after_epoch(epoch, train_acc))
        return out

    def end_of_training(self) -> Retrain | None:
        requests = [m.end_of_training() for m in self.methods]
        for m in self.methods:
            self.log.update(m.log)
        return next((r for r in requests if r is not None), None)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "members": [m.state_dict() for m in self.methods]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        for m, s in zip(self.methods, sd["members"]):
            m.load_state_dict(s)

    def describe(self) -> str:
        return " + ".join(m.describe() for m in self.methods)
