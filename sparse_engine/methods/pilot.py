"""pilot: PILoT continuous sparsification (Jacobs, Burkholz, ICLR 2025, *Mask in the Mirror*).

Dense to sparse: every sparsified weight is trained as θ = m ⊙ w, factored with β = 1, with the extra
regulariser α_t(‖m‖² + ‖w‖²) on both factors (the optimizer's α, separate from weight decay). The
implicit bias of m ⊙ w moves from L2 to L1 as the accumulated regularisation grows, so θ becomes
sparse-ish while training; at the end θ is magnitude-pruned to the target density.

* α schedule: the controller of Algorithm 1 (once per epoch, fed the train accuracy and ‖θ‖₁; see
  optim.schedules.AlphaController) or a fixed schedule (constant, harmonic, quadratic, geometric). In a
  distributed job every rank calls ``after_epoch`` with its own accuracy and the controller uses the mean
  over the ranks (the global accuracy when the ranks see equally many samples).
* Final prune: one-shot magnitude prune of θ, threshold global or per layer ([open]: both; per layer
  uses the ``distribution``'s layer densities). On an FSDP2-sharded model the threshold is selected over
  the shards (``distributed.select``): the same masks as one process, θ never gathered. Optionally iterative: prune ``prune_fraction`` of the
  remaining weights, retrain ``retrain_epochs``, repeat until the target density, with learning-rate
  rewinding (restart the lr schedule, keep the weights) or weight rewinding (also reset the kept weights
  to their values after epoch ``rewind_epoch``; 0 = initialisation). α is 0 while retraining.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import distributed
from ..masks import SCOPES, layer_densities, magnitude_masks, num_active
from ..optim.schedules import ALPHA_SCHEDULES, AlphaController, AlphaSchedule
from .base import FactoredConfig, Method, Retrain, option

REWIND = ("lr", "weight")


@dataclass
class PILoTConfig(FactoredConfig):
    alpha: float = option(1e-3, "PILoT's initial α (regulariser α(‖m‖² + ‖w‖²))")
    alpha_schedule: str = option("controller", "α's schedule: the controller of Algorithm 1 or a fixed one",
                                 choices=("controller", *ALPHA_SCHEDULES))
    delta: float = option(1.2, "factor by which the α controller raises or lowers α (> 1)")
    target_l1: float | None = option(None, "the controller's ‖θ‖₁ target K (None: target_l1_ratio × the "
                                           "initial ‖θ‖₁)")
    target_l1_ratio: float = option(0.5, "K as a fraction of the initial ‖θ‖₁")
    alpha_rate: float = option(0.95, "rate of the geometric α schedule")
    prune_scope: str = option("global", "PILoT's final prune: one threshold or one per layer", choices=SCOPES)
    iterative: bool = option(False, "PILoT: iterative prune-retrain")
    prune_fraction: float = option(0.2, "PILoT iterative: fraction of the remaining weights pruned per round")
    retrain_epochs: int = option(1, "PILoT iterative: epochs per round")
    rewind: str = option("lr", "PILoT iterative: rewind the lr schedule, or the weights too", choices=REWIND)
    rewind_epoch: int = option(0, "PILoT weight rewinding: the epoch whose weights return (0: the init)")

    def validate(self) -> None:
        super().validate()
        if self.layout not in ("dense", "auto"):
            raise ValueError(f"pilot trains dense until it prunes: layout must be 'dense' or 'auto', got {self.layout!r}")
        if not (isinstance(self.alpha, (int, float)) and 0 <= self.alpha < float("inf")):
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha!r}")
        if self.alpha_schedule not in ("controller", *ALPHA_SCHEDULES):
            raise ValueError(f"alpha_schedule must be one of {('controller', *ALPHA_SCHEDULES)}, "
                             f"got {self.alpha_schedule!r}")
        if not self.delta > 1:
            raise ValueError(f"delta (α controller factor) must be > 1, got {self.delta}")
        if self.prune_scope not in SCOPES:
            raise ValueError(f"prune_scope must be one of {SCOPES}, got {self.prune_scope!r}")
        if not 0 < self.prune_fraction < 1:
            raise ValueError(f"prune_fraction must be in (0, 1), got {self.prune_fraction}")
        if isinstance(self.retrain_epochs, bool) or not isinstance(self.retrain_epochs, int) or self.retrain_epochs < 1:
            raise ValueError(f"retrain_epochs must be an int >= 1, got {self.retrain_epochs!r}")
        if self.rewind not in REWIND:
            raise ValueError(f"rewind must be one of {REWIND}, got {self.rewind!r}")
        if isinstance(self.rewind_epoch, bool) or not isinstance(self.rewind_epoch, int) or self.rewind_epoch < 0:
            raise ValueError(f"rewind_epoch must be an int >= 0, got {self.rewind_epoch!r}")


class PILoT(Method):
    name = "pilot"
    config_class = PILoTConfig
    sparsify_as = "pilot"

    def _layers(self) -> dict[str, Any]:
        from ..optim import parameterizations

        return {name: pz for name, pz in parameterizations(self.model) if pz.kind == "pilot"}

    def setup(self) -> None:
        c = self.config
        if c.iterative and c.rewind == "weight" and any(distributed.is_sharded(pz.m) for pz in self._layers().values()):
            # the snapshot of θ would be per shard, and a checkpoint keeps one copy of the method's state
            raise ValueError("model: pilot's weight rewinding cannot train a sharded (FSDP2) model; use "
                             "rewind='lr' or DistributedDataParallel")
        self.l1_init = self.l1()
        if c.alpha_schedule == "controller":
            k = c.target_l1 if c.target_l1 is not None else c.target_l1_ratio * self.l1_init
            self.alpha_schedule = AlphaController(c.alpha, c.delta, k, self.epochs)
        else:
            self.alpha_schedule = AlphaSchedule(c.alpha_schedule, c.alpha, c.alpha_rate)
        self.optimizer.set_alpha(c.alpha)
        if c.iterative:
            d, self.densities = 1.0, []
            while d > c.density * (1 + 1e-9):
                d = max(c.density, d * (1 - c.prune_fraction))
                self.densities.append(d)
        else:
            self.densities = [c.density]
        self.round = 0
        self.retraining = False
        self.snapshot: dict[str, torch.Tensor] | None = None
        if c.iterative and c.rewind == "weight" and c.rewind_epoch == 0:
            self._snapshot()

    @torch.no_grad()
    def _snapshot(self) -> None:
        self.snapshot = {name: pz.theta().detach().clone() for name, pz in self._layers().items()}

    def after_epoch(self, epoch: int, train_acc: float | None = None) -> dict[str, Any]:
        c = self.config
        if self.retraining:
            return {"alpha": 0.0, "round": self.round}
        if c.iterative and c.rewind == "weight" and epoch == c.rewind_epoch and epoch > 0:
            self._snapshot()
        l1 = self.l1()
        if train_acc is None and c.alpha_schedule == "controller":
            raise ValueError("pilot's α controller needs the epoch's train accuracy (train_acc)")
        if train_acc is not None:
            # each rank of a distributed job passes its own accuracy: all decide on the mean (a collective)
            train_acc = distributed.mean_over_ranks(train_acc)
        alpha = self.alpha_schedule.update(epoch, train_acc if train_acc is not None else 0.0, l1)
        self.optimizer.set_alpha(alpha)
        return {"alpha": alpha, "l1": l1}

    @torch.no_grad()
    def prune(self, density: float) -> dict[str, float]:
        """Magnitude-prune θ of every PILoT layer to ``density`` (global or per-layer threshold)."""
        layers = self._layers()
        if not layers:
            return {}
        if any(distributed.is_sharded(pz.m) for pz in layers.values()):
            masks = self._sharded_masks(layers, density)
        else:
            scores = {name: pz.theta().detach().abs() for name, pz in layers.items()}
            if self.config.prune_scope == "global":
                masks = magnitude_masks(scores, density, scope="global")
            else:
                dens = self._layer_densities(layers, density)
                masks = {name: magnitude_masks({name: s}, dens[name], scope="layer")[name] for name, s in scores.items()}
        for name, pz in layers.items():
            old = pz.dense_mask()
            mask = masks[name].reshape(pz.weight_shape)
            pz.set_mask(mask if old is None else mask & old)
        self.optimizer.mask_changed()
        return {name: pz.density() for name, pz in layers.items()}

    def _layer_densities(self, layers: dict[str, Any], density: float) -> dict[str, float]:
        shapes = {name: pz.weight_shape for name, pz in layers.items()}
        return layer_densities(shapes, density, self.config.distribution)

    def _sharded_masks(self, layers: dict[str, Any], density: float) -> dict[str, torch.Tensor]:
        """FSDP2: the same masks as one process on the whole θ, from each rank's rows (no gather of θ)."""
        from ..distributed.select import topk_masks, whole_from_rows

        scores = [pz.local_values().detach().abs() for pz in layers.values()]
        numel = [pz.shape2d[0] * pz.shape2d[1] for pz in layers.values()]
        if self.config.prune_scope == "global":
            keep = topk_masks(scores, num_active(density, sum(numel)))
        else:
            dens = self._layer_densities(layers, density)
            keep = [topk_masks([s], num_active(dens[name], n))[0] for name, s, n in zip(layers, scores, numel)]
        return {name: whole_from_rows(k, pz.m) for (name, pz), k in zip(layers.items(), keep)}

    def end_of_training(self) -> Retrain | None:
        c = self.config
        if self.round >= len(self.densities):
            return None
        density = self.densities[self.round]
        self.round += 1
        self.log["pruned_to"] = density
        self.log["layer_density"] = self.prune(density)
        if not c.iterative:
            return None
        if c.rewind == "weight" and self.snapshot is not None:
            for name, pz in self._layers().items():
                pz.assign(self.snapshot[name])  # pruned coordinates stay 0 (assign masks)
        self.optimizer.reset_state()
        self.optimizer.set_alpha(0.0)
        self.retraining = True
        return Retrain(epochs=c.retrain_epochs, round=self.round, density=density)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "alpha_schedule": self.alpha_schedule.state_dict(), "round": self.round,
                "retraining": self.retraining, "densities": list(self.densities), "l1_init": self.l1_init,
                "snapshot": self.snapshot}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        self.alpha_schedule.load_state_dict(sd["alpha_schedule"])
        self.round, self.retraining = int(sd["round"]), bool(sd["retraining"])
        self.densities, self.l1_init, self.snapshot = list(sd["densities"]), sd["l1_init"], sd["snapshot"]

    def describe(self) -> str:
        c = self.config
        how = f"iterative {c.prune_fraction:g}/round, {c.rewind} rewind" if c.iterative else "one-shot"
        return f"pilot(α {c.alpha_schedule} from {c.alpha:g}, {c.prune_scope} prune, {how})"

