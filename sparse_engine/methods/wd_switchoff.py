"""wd_switchoff: switch weight decay off partway through training (Jacobs, Zhou, Burkholz 2025,
*Mirror, Mirror of the Flow*).

The implicit bias of a factorised weight depends on the accumulated decay A = Σ η_k λ_k, not on the
current λ, so λ can be set to 0 after a fraction ``at`` of training without losing its effect (the paper
leaves the point open; default 0.5). ``at=0`` never decays, ``at=1`` decays throughout and only logs
the dose. Combinable with every method (see ``Compose``); alone it leaves the model dense.

What is switched off: the weight decay of every optimizer parameter group, so everything the optimizer
decays: the factors m and w of a parameterized weight, and also plain weights, biases and norm
parameters (``make_optimizer`` puts all of them in groups with the same ``weight_decay``). The paper's
schedule is one λ_t for the whole training objective, hence every group here; its lasting effect is a
property of the factorised weights (for a plain parameter, decay that stops simply stops acting). To keep
biases and norms free of decay from the start, give them a parameter group with ``weight_decay=0``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..optim.schedules import WeightDecaySwitchOff
from .base import Method, MethodConfig


@dataclass
class WDSwitchOffConfig(MethodConfig):
    """at: fraction of training (in steps) after which every parameter group's weight decay is 0."""

    density: float = 1.0
    at: float = 0.5

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
        self.schedule.begin(self.optimizer, self.optimizer.num_steps)  # at=0: off before step 1

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
