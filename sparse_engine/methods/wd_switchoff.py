"""wd_switchoff: switch weight decay off partway through training (Jacobs, Zhou, Burkholz 2025,
*Mirror, Mirror of the Flow*).

The implicit bias of a factorised weight depends on the accumulated decay A = Σ η_k λ_k, not on the
current λ, so λ can be set to 0 after a fraction ``at`` of training without losing its effect
(METHODS.md §3; the fraction is [open], default 0.5). Combinable with every method (see ``Compose``);
alone it leaves the model dense.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..optim.schedules import WeightDecaySwitchOff
from .base import Method, MethodConfig, option


@dataclass
class WDSwitchOffConfig(MethodConfig):
    """at: fraction of training (in steps) after which every group's weight decay is 0."""

    density: float = 1.0
    at: float = option(0.5, "switch weight decay off after this fraction of training (any method: composed "
                            "with it)", name="wd_switchoff")

    def validate(self) -> None:
        super().validate()
        if isinstance(self.at, bool) or not isinstance(self.at, (int, float)) or not 0.0 <= self.at <= 1.0:
            raise ValueError(f"at (weight-decay switch-off point, a fraction of training) must be in [0, 1], "
                             f"got {self.at!r}")


class WDSwitchOff(Method):
    name = "wd_switchoff"
    config_class = WDSwitchOffConfig
    sparsify_as = None

    def setup(self) -> None:
        self.schedule = WeightDecaySwitchOff(self.config.at, self.epochs * self.steps_per_epoch)

    def after_step(self, step: int) -> None:
        self.schedule.after_step(self.optimizer, step)

    def after_epoch(self, epoch: int, train_acc: float | None = None) -> dict[str, Any]:
        dose = self.schedule.dose()
        return {"wd_dose": max(dose) if dose else 0.0, "wd_off": self.schedule.switched}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "schedule": self.schedule.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        self.schedule.load_state_dict(sd["schedule"])

    def describe(self) -> str:
        return f"wd_switchoff@{self.config.at:g}"
