"""acdc: alternating compressed / decompressed training (Peste et al. 2021, *AC/DC*), Sign-In compatible.

Training alternates dense and sparse phases of ``acdc_phase`` units (epochs or steps): a dense warm-up
phase, then sparse, dense, sparse, ..., and a final sparse phase over the last ``acdc_final`` of training.
A sparse phase starts with a magnitude prune of θ to ``density`` (per layer or global, ``prune_scope``);
a dense phase frees every weight again, the pruned ones restarting at θ = 0 with zero optimizer state.

With ``signin=True`` the weights are trained as θ = m ⊙ w with the Sign-In resets of the signin method (its
reset options apply); a freed weight restarts at m = √β, w = 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..masks import SCOPES
from ..optim.schedules import UNITS, ResetSchedule
from .base import option
from .dynamic import magnitude_prune
from .signin import SignIn, SignInConfig


@dataclass
class ACDCConfig(SignInConfig):
    signin: bool = option(False, "acdc: train θ = m ⊙ w with Sign-In resets")
    acdc_phase: int = option(5, "acdc: length of a dense or sparse phase (also the dense warm-up)")
    acdc_unit: str = option("epoch", "acdc: unit of the phase length", choices=UNITS)
    acdc_final: float = option(0.15, "acdc: the final sparse phase, as a fraction of training")
    prune_scope: str = option("layer", "final / gradual magnitude prune: one threshold per layer or over all "
                                       "layers", choices=SCOPES)

    def validate(self) -> None:
        super().validate()
        if self.layout != "dense":
            raise ValueError(f"acdc alternates dense and sparse phases: layout must be 'dense', got {self.layout!r}")
        if self.dynamic is not None or self.mask != "random":
            raise ValueError("acdc chooses its masks itself: dynamic and mask do not apply")
        if isinstance(self.acdc_phase, bool) or not isinstance(self.acdc_phase, int) or self.acdc_phase < 1:
            raise ValueError(f"acdc_phase must be an int >= 1, got {self.acdc_phase!r}")
        if self.acdc_unit not in UNITS:
            raise ValueError(f"acdc_unit must be one of {UNITS}, got {self.acdc_unit!r}")
        if isinstance(self.acdc_final, bool) or not isinstance(self.acdc_final, (int, float)) \
                or not 0 < self.acdc_final <= 1:
            raise ValueError(f"acdc_final must be in (0, 1] (training ends in a sparse phase), got {self.acdc_final!r}")
        if self.prune_scope not in SCOPES:
            raise ValueError(f"prune_scope must be one of {SCOPES}, got {self.prune_scope!r}")


def acdc_sparse(unit: int, phase: int, total: int, final: float) -> bool:
    """Whether unit ``unit`` (0-based) of ``total`` is in a sparse phase."""
    if unit >= total - max(1, round(final * total)):  # the last unit at least: training ends sparse
        return True
    if unit < phase:
        return False
    return ((unit - phase) // phase) % 2 == 0


class ACDC(SignIn):
    name = "acdc"
    config_class = ACDCConfig

    @property
    def sparsify_as(self) -> str:  # type: ignore[override]
        return "signin" if self.config.signin else "dense"

    def sparsify_options(self) -> dict[str, Any]:
        return {**super().sparsify_options(), "density": 1.0}  # dense warm-up: the first prune makes the mask

    def setup(self) -> None:
        super().setup()
        c = self.config
        self.total = self.epochs if c.acdc_unit == "epoch" else self.epochs * self.steps_per_epoch
        if not c.signin:  # masked weights: nothing to reset
            self.schedule = ResetSchedule(c.reset_every, c.reset_unit, 0.0, max(1, self.total))
        from ..param import sparse_layers

        self.layers = sparse_layers(self.model)
        self.sparse = False
        self.phases = 0
        self._enter(0)

    def _enter(self, unit: int) -> None:
        """Before unit ``unit`` (0-based): switch phase when it changes."""
        c = self.config
        sparse = acdc_sparse(unit, c.acdc_phase, self.total, c.acdc_final) if unit < self.total else self.sparse
        if sparse == self.sparse:
            return
        if sparse:
            self.log["layer_density"] = magnitude_prune(self.layers, c.density, c.prune_scope, c.distribution,
                                                        self.optimizer)
        else:
            for _, module in self.layers:
                module.set_mask(None)  # pruned weights hold θ = 0 and zero state: they restart from there
        self.sparse = sparse
        self.phases += 1

    def after_step(self, step: int) -> None:
        super().after_step(step)
        if self.config.acdc_unit == "step":
            self._enter(step)

    def after_epoch(self, epoch: int, train_acc: float | None = None) -> dict[str, Any]:
        out = super().after_epoch(epoch, train_acc)
        if self.config.acdc_unit == "epoch":
            self._enter(epoch)
        return {**out, "sparse_phase": self.sparse, "phases": self.phases}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "sparse": self.sparse, "phases": self.phases}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        self.sparse, self.phases = bool(sd["sparse"]), int(sd["phases"])

    def describe(self) -> str:
        c = self.config
        how = "m ⊙ w with Sign-In resets" if c.signin else "θ"
        return f"acdc(phases of {c.acdc_phase} {c.acdc_unit}s, final {c.acdc_final:g} sparse, {how})"
