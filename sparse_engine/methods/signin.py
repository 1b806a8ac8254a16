"""signin: Sign-In (Gadhikar, Jacobs, Zhou, Burkholz 2025, *Sign-In to the Lottery*).

Pruning at initialisation with sign flips: a random mask is fixed, every active weight is trained as
θ = m ⊙ w factored with m² − w² = β (β = 1), and every ``reset_every`` epochs (or steps) θ is
re-factored back to β, leaving θ unchanged. Training erodes β (weight decay and
gradient noise shrink it every step); a small β freezes the signs of θ, the reset
restores the ability to flip them.

[open] choices and their defaults (see the README for the measurements behind them):
* period ``reset_every`` in ``reset_unit`` ("epoch" or "step"), resets until ``reset_until`` of training;
* what happens to the optimizer state at a reset: ``reset_policy`` "keep", "zero" or "transform"
  (sparse_engine.optim.reset);
* the learning rate of m and w relative to the other parameters: ``factor_lr_scale``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import distributed
from ..optim.base import RESET_POLICIES
from ..optim.schedules import UNITS, ResetSchedule
from .base import FactoredConfig, Method, option
from .dynamic import MaskOptions, MovingMask


@dataclass
class SignInConfig(MaskOptions, FactoredConfig):
    reset_every: int = option(1, "Sign-In reset period, in reset units")
    reset_unit: str = option("epoch", "unit of the reset period", choices=UNITS)
    reset_until: float = option(1.0, "reset only in this first fraction of training")
    reset_policy: str = option("transform", "optimizer state at a reset", choices=RESET_POLICIES)

    def validate(self) -> None:
        super().validate()
        if isinstance(self.reset_every, bool) or not isinstance(self.reset_every, int) or self.reset_every < 1:
            raise ValueError(f"reset_every must be an int >= 1, got {self.reset_every!r}")
        if self.reset_unit not in UNITS:
            raise ValueError(f"reset_unit must be one of {UNITS}, got {self.reset_unit!r}")
        if not 0.0 <= self.reset_until <= 1.0:
            raise ValueError(f"reset_until must be in [0, 1], got {self.reset_until}")
        if self.reset_policy not in RESET_POLICIES:
            raise ValueError(f"reset_policy must be one of {RESET_POLICIES}, got {self.reset_policy!r}")


class SignIn(MovingMask, Method):
    name = "signin"
    config_class = SignInConfig
    sparsify_as = "signin"

    def setup(self) -> None:
        super().setup()
        c = self.config
        total = self.epochs if c.reset_unit == "epoch" else self.epochs * self.steps_per_epoch
        self.schedule = ResetSchedule(c.reset_every, c.reset_unit, c.reset_until, total)
        self.beta_before: list[float] = []  # mean β over active weights just before each reset

    @torch.no_grad()
    def _mean_beta(self) -> float:
        from ..optim import parameterizations

        num, den, sharded = 0.0, 0, False
        for _, pz in parameterizations(self.model):
            if pz.kind != "signin":
                continue
            sharded = sharded or distributed.is_sharded(pz.m)  # FSDP2: sum this rank's shard, then all ranks
            m, w = distributed.local(pz.m.detach()), distributed.local(pz.w.detach())
            beta = m.float() ** 2 - w.float() ** 2
            mask = distributed.local_rows(pz.step_mask(), pz.m)
            if mask is not None:
                beta = beta[mask]
            num += float(beta.sum())
            den += beta.numel()
        if sharded:
            num, den = distributed.sum_over_ranks([num, den]).tolist()
        return num / den if den else float("nan")

    def _reset(self, k: int) -> None:
        self.beta_before.append(self._mean_beta())
        self.optimizer.signin_reset(self.config.beta, self.config.reset_policy, kinds=("signin",))
        self.schedule.fired(k)

    def after_step(self, step: int) -> None:
        if self.config.reset_unit == "step" and self.schedule.due(step):
            self._reset(step)
        super().after_step(step)

    def after_epoch(self, epoch: int, train_acc: float | None = None) -> dict[str, Any]:
        out: dict[str, Any] = super().after_epoch(epoch, train_acc)
        if self.config.reset_unit == "epoch" and self.schedule.due(epoch):
            self._reset(epoch)
            out["beta_before_reset"] = self.beta_before[-1]
        out["resets"] = self.schedule.count
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "schedule": self.schedule.state_dict(), "beta_before": list(self.beta_before)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        self.schedule.load_state_dict(sd["schedule"])
        self.beta_before = list(sd["beta_before"])

    def describe(self) -> str:
        c = self.config
        words = [f"reset every {c.reset_every} {c.reset_unit}", c.reset_policy, *self.mask_words()]
        return f"signin({', '.join(words)})"
