"""gmp: gradual magnitude pruning (Zhu & Gupta 2017, *To prune, or not to prune*), dense to sparse.

The model trains dense (θ directly, a pretrained model as it is); from ``prune_start`` to ``prune_end`` of
training, every ``prune_every`` steps, θ is magnitude-pruned to the density of the cubic schedule

    d_t = d_f + (1 − d_f) · (1 − (t − t_0) / (t_1 − t_0))³

(sparsity rises fast at first, slowly near the end), and fine-tunes at ``density`` d_f after t_1. A pruned
weight stays pruned (θ = 0, zero optimizer state). The natural dense-to-sparse baseline for PILoT.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..masks import SCOPES
from .base import Method, MethodConfig, option
from .dynamic import magnitude_prune


@dataclass
class GMPConfig(MethodConfig):
    prune_start: float = option(0.0, "gmp: pruning starts at this fraction of training")
    prune_end: float = option(0.75, "gmp: the final density is reached at this fraction of training")
    prune_every: int = option(100, "gmp: steps between two prunes")
    prune_scope: str = option("layer", "final / gradual magnitude prune: one threshold per layer or over all "
                                       "layers", choices=SCOPES)

    def validate(self) -> None:
        super().validate()
        if self.layout != "dense":
            raise ValueError(f"gmp trains dense until it prunes: layout must be 'dense', got {self.layout!r}")
        for name in ("prune_start", "prune_end"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        if not self.prune_start < self.prune_end:
            raise ValueError(f"prune_start must be < prune_end, got {self.prune_start} and {self.prune_end}")
        if isinstance(self.prune_every, bool) or not isinstance(self.prune_every, int) or self.prune_every < 1:
            raise ValueError(f"prune_every must be an int >= 1, got {self.prune_every!r}")
        if self.prune_scope not in SCOPES:
            raise ValueError(f"prune_scope must be one of {SCOPES}, got {self.prune_scope!r}")


def cubic_density(step: int, final: float, start: int, end: int) -> float:
    """Zhu & Gupta's schedule: 1 before ``start``, ``final`` from ``end`` on, cubic in between."""
    if step <= start:
        return 1.0
    progress = min(1.0, (step - start) / max(1, end - start))
    return final + (1.0 - final) * (1.0 - progress) ** 3


class GMP(Method):
    name = "gmp"
    config_class = GMPConfig
    sparsify_as = "dense"  # masked layers without a mask: the mask appears at the first prune

    def prepare(self, model, batch=None, loss_fn=None):
        report = super().prepare(model, batch, loss_fn)
        if report is not None:
            report.requested_density = self.config.density
        return report

    def sparsify_options(self) -> dict[str, Any]:
        return {**super().sparsify_options(), "density": 1.0}

    def setup(self) -> None:
        from ..param import sparse_layers

        c = self.config
        total = self.epochs * self.steps_per_epoch
        self.start, self.end = int(c.prune_start * total), max(1, int(c.prune_end * total))
        self.layers = sparse_layers(self.model)
        self.current = 1.0
        self.prunes = 0

    def after_step(self, step: int) -> None:
        c = self.config
        if step <= self.start or self.current <= c.density:
            return
        if (step - self.start) % c.prune_every and step < self.end:
            return
        target = cubic_density(step, c.density, self.start, self.end)
        self.log["layer_density"] = magnitude_prune(self.layers, target, c.prune_scope, c.distribution,
                                                    self.optimizer)
        self.current = target
        self.prunes += 1

    def after_epoch(self, epoch: int, train_acc: float | None = None) -> dict[str, Any]:
        return {"density": self.current, "prunes": self.prunes}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "current": self.current, "prunes": self.prunes}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        self.current, self.prunes = float(sd["current"]), int(sd["prunes"])

    def describe(self) -> str:
        c = self.config
        return f"gmp(cubic to {c.density:g} from {c.prune_start:g} to {c.prune_end:g} of training, " \
               f"every {c.prune_every} steps, {c.prune_scope})"
