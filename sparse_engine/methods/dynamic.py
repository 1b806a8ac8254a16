"""Masks that move while training: RigL and SET (dynamic sparse training) for static and Sign-In.

Every ``update_every`` steps until ``stop_at`` of training, each sparse layer with k active weights drops
the n = round(f_t · k) active weights of smallest |θ| and grows n inactive ones, so its density stays
exactly what it was. f_t = ``drop_fraction`` decayed by ``drop_schedule`` ("cosine": f/2 · (1 + cos(π t /
T_stop)), Evci et al. 2020; "constant"). Grown coordinates are chosen

* rigl: by the largest |∂L/∂θ| of the last batch before the update. The dense gradient of a layer is
  formed only in the backward pass of that step, one layer at a time, from the layer's input and output
  gradient, and reduced at once to the n candidates (indices), so memory stays ∝ density;
* set: uniformly at random (seeded by the seed, the step and the layer: the same on every process).

Only coordinates inactive before the update are grown (a weight dropped now cannot come back in the same
update). A grown weight starts at θ = 0 (m = √β, w = 0 for Sign-In's m ⊙ w) with zero optimizer state;
a dropped one becomes θ = 0 with zero state. Layouts: dense and block (the mask changes), csr and bsr
(the index is rebuilt and the optimizer state moves with its coordinates); the block layouts drop and grow
whole blocks (scored by the sum of |θ| and of |∂L/∂θ| over the block), k and n then count blocks. Under
torch.distributed (DDP) RigL grows by the all-reduced gradient (the global batch's, as in one process), and
rank 0's masks are broadcast, so every process keeps the same masks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import distributed
from ..checks import check_choice
from ..layout import block_grid, expand_block_mask, to_blocks
from ..masks import SCOPES, SOURCES, _topk_mask
from .base import option

DYNAMIC = ("rigl", "set")
DROP_SCHEDULES = ("cosine", "constant")
DYNAMIC_LAYOUTS = ("dense", "csr", "block", "bsr")


def _block(module) -> tuple[int, int] | None:
    """The block shape a layer's mask moves by (layouts block and bsr), None: single weights."""
    return tuple(module.block_shape) if module.resolved_layout in ("block", "bsr") else None


def _units(t: Tensor, block) -> Tensor:
    """(N, K) -> the flat values per unit of the mask: the tensor itself, or its block sums."""
    return (t if block is None else to_blocks(t, block).sum(dim=(2, 3))).reshape(-1)


def _active_units(module, block) -> Tensor:
    if block is None:
        return module.mask2d().reshape(-1)
    return _units(module.mask2d().to(torch.int32), block) > 0


def _expand(units: Tensor, block, shape2d) -> Tensor:
    """Flat unit mask -> (N, K) element mask."""
    if block is None:
        return units.reshape(shape2d)
    return expand_block_mask(units.reshape(block_grid(shape2d, block)), block, shape2d)


def _drop_fraction(step: int, fraction: float, schedule: str, stop: float) -> float:
    if schedule == "constant":
        return fraction
    return fraction / 2 * (1 + math.cos(math.pi * min(step, stop) / stop))


@torch.no_grad()
def zero_state_outside(optimizer, params, keep: Tensor) -> None:
    """Zero every optimizer buffer of ``params`` (stored like ``keep``) where ``keep`` is False."""
    for p in params:
        st = optimizer.state.get(p)
        if not st:
            continue
        rows = distributed.local_rows(keep.reshape(p.shape), p)  # FSDP2: the rows of this rank's shard
        for name in optimizer.buffer_names:
            buf = st.get(name)
            if buf is not None:
                buf = distributed.local(buf)
                buf.masked_fill_(~rows.reshape(buf.shape), 0)


@torch.no_grad()
def apply_mask(module, new: Tensor, optimizer) -> None:
    """Give a sparse layer the (N, K) mask ``new``: kept coordinates keep θ and state, the others restart
    at θ = 0 with zero state. Dense storage: the mask changes; csr / bsr: the index is rebuilt and every
    optimizer buffer moves with its coordinates."""
    pz = module.param
    old = module.mask2d()
    if pz.layout == "dense":
        module.set_mask(new.reshape(module.weight_shape))
        keep = new if old is None else old & new
        zero_state_outside(optimizer, [p for _, p, _ in pz.step_targets()], keep)
        return
    if pz.layout not in ("csr", "bsr"):
        raise RuntimeError(f"mask updates support the layouts {DYNAMIC_LAYOUTS}, this layer stores {pz.layout!r}")
    index = pz.index
    params = [p for _, p, _ in pz.step_targets()]
    # Buffers as dense (N, K) (one layer at a time): zero outside the old mask, so grown coordinates get 0.
    dense = {}
    for p in params:
        st = optimizer.state.get(p) or {}
        dense[p] = {n: index.scatter(st[n]) for n in optimizer.buffer_names if st.get(n) is not None}
    module._set_storage(pz.layout, new)
    index = pz.index
    for p in params:
        for n, buf in dense[p].items():
            optimizer.state[p][n] = index.gather(buf).contiguous()


@dataclass
class MaskOptions:
    """Where the mask comes from and how it moves: the options of static and signin (a mixin of their
    configs, listed before the config base so that its ``validate`` runs first and calls the base's).

    mask: "random" | "magnitude" | "snip" | "synflow", a dict layer name -> bool tensor, or the path of a
    file holding such a dict (``torch.save``); mask_scope: "layer" | "global" for scored masks (None: the
    source's default, see nn.sparsify). dynamic: None (fixed mask), "rigl" or "set" (module docstring).
    """

    mask: str | dict = option("random", "where the mask comes from: random, magnitude, snip, synflow, or a "
                                        "file of masks (torch.save of a dict layer name -> bool tensor)")
    mask_scope: str | None = option(None, "scored masks: one threshold per layer or over all layers (default: "
                                          "layer for magnitude, global for snip / synflow)", choices=SCOPES)
    dynamic: str | None = option(None, "mask updates while training (default: none, the mask is fixed)",
                                 choices=DYNAMIC)
    update_every: int = option(100, "dynamic masks: steps between mask updates")
    drop_fraction: float = option(0.3, "dynamic masks: fraction of each layer's active weights dropped "
                                       "and regrown at the first update")
    drop_schedule: str = option("cosine", "dynamic masks: decay of the drop fraction", choices=DROP_SCHEDULES)
    stop_at: float = option(0.75, "dynamic masks: no update after this fraction of training")

    def validate(self) -> None:
        super().validate()  # the config base (MethodConfig and its subclasses)
        self._check_mask()
        if self.dynamic is None:
            return
        check_choice("dynamic", self.dynamic, DYNAMIC)
        if self.layout not in DYNAMIC_LAYOUTS:
            raise ValueError(f"dynamic={self.dynamic!r} works on the layouts {DYNAMIC_LAYOUTS}, "
                             f"got layout={self.layout!r}")
        if isinstance(self.update_every, bool) or not isinstance(self.update_every, int) or self.update_every < 1:
            raise ValueError(f"update_every must be an int >= 1, got {self.update_every!r}")
        for name in ("drop_fraction", "stop_at"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {v!r}")
        check_choice("drop_schedule", self.drop_schedule, DROP_SCHEDULES)

    def _check_mask(self) -> None:
        if self.mask_scope is not None:
            check_choice("mask_scope", self.mask_scope, SCOPES)
        if isinstance(self.mask, dict) or self.mask in SOURCES:
            return
        if not isinstance(self.mask, str) or not Path(self.mask).is_file():
            raise ValueError(f"mask must be one of {SOURCES}, a dict of masks or a file of masks, got {self.mask!r}")

    def mask_dict(self) -> str | dict:
        """The mask source for sparsify: a file is read here (a dict layer name -> bool tensor)."""
        if isinstance(self.mask, dict) or self.mask in SOURCES:
            return self.mask
        masks = torch.load(self.mask, map_location="cpu", weights_only=True)
        if not isinstance(masks, dict):
            raise ValueError(f"mask file {self.mask!r} must hold a dict layer name -> bool tensor, "
                             f"got {type(masks).__name__}")
        return masks


class MovingMask:
    """Mixin of the methods with :class:`MaskOptions` (before Method in the bases): runs the mask updates."""

    updater: "MaskUpdater | None" = None

    @property
    def shardable(self) -> bool:
        """Mask updates read whole weights and gradients: not on FSDP2 shards."""
        return self.config.dynamic is None

    def setup(self) -> None:
        super().setup()
        c = self.config
        self.updater = None
        if c.dynamic is not None:
            self.updater = MaskUpdater(c, c.seed)
            self.updater.bind(self.model, self.optimizer, self.epochs * self.steps_per_epoch)

    def mask_words(self) -> list[str]:
        """How the mask is made and moves, for describe(): e.g. ["snip mask", "rigl every 100 steps"]."""
        c = self.config
        words = [] if c.mask == "random" else [f"{c.mask if c.mask in SOURCES else 'given'} mask"]
        return words + ([] if c.dynamic is None else [f"{c.dynamic} every {c.update_every} steps"])

    def after_step(self, step: int) -> None:
        super().after_step(step)
        if self.updater is not None:
            self.updater.after_step(step)

    def after_epoch(self, epoch: int, train_acc: float | None = None) -> dict[str, Any]:
        out = super().after_epoch(epoch, train_acc)
        if self.updater is not None:
            out.update(mask_updates=self.updater.updates, regrown=self.updater.regrown)
        return out

    def remove(self) -> None:
        super().remove()
        if self.updater is not None:
            self.updater.disarm()

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self.updater is not None:
            sd["mask_updates"] = self.updater.state_dict()
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        if self.updater is not None and "mask_updates" in sd:
            self.updater.load_state_dict(sd["mask_updates"], self._last_step + 1)


class MaskUpdater:
    """Runs the mask updates of one method (see the module docstring); the method calls :meth:`after_step`."""

    def __init__(self, opts: MaskOptions, seed: int) -> None:
        self.opts, self.seed = opts, seed
        self.updates = 0
        self.regrown = 0
        self._hooks: list = []
        self._armed = False
        self._candidates: dict[str, Tensor] = {}
        self._planned: dict[str, int] = {}

    def bind(self, model, optimizer, total_steps: int) -> None:
        from ..param import sparse_layers

        self.optimizer = optimizer
        self.layers = [(n, m) for n, m in sparse_layers(model) if m.mask2d() is not None]
        self.stop = max(1, int(self.opts.stop_at * total_steps))
        self.disarm()
        if self.opts.dynamic == "rigl":
            self._hooks = [module.register_forward_hook(self._forward_hook(name)) for name, module in self.layers]
        self.arm(optimizer.num_steps + 1)

    def is_update(self, step: int) -> bool:
        return step % self.opts.update_every == 0 and step < self.stop

    def _counts(self, step: int) -> dict[str, int]:
        f = _drop_fraction(step, self.opts.drop_fraction, self.opts.drop_schedule, self.stop)
        out = {}
        for name, module in self.layers:
            active = _active_units(module, _block(module))
            numel, k = active.numel(), int(torch.count_nonzero(active))
            out[name] = min(round(f * k), numel - k)
        return out

    # ------------------------------------------------------------------ rigl: gradient candidates

    def arm(self, step: int) -> None:
        """Before step ``step``: for RigL, capture gradient candidates in its backward if it updates.

        The forward hooks are registered once, in :meth:`bind` (torch.compile does not see hooks added
        after it traced the model); a plain bool says whether they capture, so a compiled model holds
        at most two graphs (armed or not)."""
        self._armed = False
        if self.opts.dynamic != "rigl" or not self.is_update(step):
            return
        self._planned = self._counts(step)
        self._armed = True

    def disarm(self) -> None:
        """Remove the hooks (the method's remove())."""
        self._armed = False
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _forward_hook(self, name: str):
        def hook(module, args, output):
            if self._armed and torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad:
                x = args[0].detach()
                output.register_hook(lambda g: self._capture(name, module, x, g))
        return hook

    def _capture(self, name: str, module, x: Tensor, g: Tensor) -> None:
        """The layer's dense gradient ∂L/∂θ (formed here, freed on return) reduced to its best n inactive
        coordinates."""
        if self._planned.get(name, 0) <= 0:
            return None
        dtype = module.param.w.dtype
        xs, gs = x.to(dtype), g.detach().to(dtype)
        if hasattr(module, "_conv"):  # a convolution: let autograd form ∂L/∂θ of the dense op
            with torch.enable_grad():
                weight = module.theta().detach().clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(module._conv(xs, weight, None), weight, gs)
        else:  # a linear layer: ∂L/∂θ = gᵀ x over every leading dim
            n, k = module.param.shape2d
            grad = gs.reshape(-1, n).t() @ xs.reshape(-1, k)
        if distributed.world_size() > 1:  # DDP: grow by the gradient of the global batch, as one process would
            torch.distributed.all_reduce(grad)  # every rank captures the same layers in the same order
        block = _block(module)
        score = _units(grad.detach().abs().reshape(module.param.shape2d), block)
        active = _active_units(module, block)
        score = torch.where(active, torch.full_like(score, -1.0), score)
        grow = _topk_mask(score, self._planned[name])
        self._candidates[name] = grow.nonzero().squeeze(1)
        return None

    # --------------------------------------------------------------------------------- the update

    def after_step(self, step: int) -> None:
        if self.is_update(step):
            self.update(step)
        self.arm(step + 1)

    @torch.no_grad()
    def update(self, step: int) -> dict[str, int]:
        """Drop and grow in every layer (one at a time); returns name -> number regrown."""
        counts = self._counts(step) if self.opts.dynamic == "set" else self._planned
        if self.opts.dynamic == "rigl" and any(counts.values()) and not self._candidates:
            raise RuntimeError(
                f"RigL update at step {step}: no layer's gradient was captured in this step's backward (a model "
                "compiled before method.apply() runs without the capture hooks: compile it after apply())")
        out = {}
        for i, (name, module) in enumerate(self.layers):
            n = counts.get(name, 0)
            grow_idx = self._grow(i, name, module, n, step)
            if grow_idx is None:
                continue
            n, block = grow_idx.numel(), _block(module)
            active = _active_units(module, block)
            idx = active.nonzero().squeeze(1)  # rank only the k active units (not all of them)
            if block is None and module.param.layout == "csr":  # csr values are in row-major order, like idx
                score = module.param.values().detach().abs()
            else:
                score = _units(module.theta().detach().abs().reshape(module.param.shape2d), block)[idx]
            new = torch.zeros_like(active)
            new[idx[_topk_mask(score, idx.numel() - n)]] = True
            new[grow_idx] = True
            new = _same_on_every_rank(_expand(new, block, module.param.shape2d))
            apply_mask(module, new, self.optimizer)
            out[name] = n
        self._candidates.clear()
        self.updates += 1
        self.regrown += sum(out.values())
        return out

    def _grow(self, i: int, name: str, module, n: int, step: int) -> Tensor | None:
        if n <= 0:
            return None
        if self.opts.dynamic == "rigl":
            return self._candidates.get(name)  # None: no backward ran through this layer since arming
        inactive = (~_active_units(module, _block(module))).nonzero().squeeze(1)
        gen = torch.Generator(device="cpu")
        gen.manual_seed((self.seed * 1_000_003 + step * 1009 + i) % (2**63))
        pick = torch.randperm(inactive.numel(), generator=gen)[:n].to(inactive.device)
        return inactive[pick]

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "regrown": self.regrown}

    def load_state_dict(self, sd: dict[str, Any], next_step: int) -> None:
        self.updates, self.regrown = int(sd["updates"]), int(sd["regrown"])
        self.arm(next_step)


def _same_on_every_rank(mask: Tensor) -> Tensor:
    """Rank 0's mask on every process of an initialised process group: the decisions are taken from the
    same numbers on every rank, this keeps float ties from ever splitting the replicas."""
    import torch.distributed as dist

    if distributed.world_size() == 1:
        return mask
    buf = mask.to(torch.uint8)
    dist.broadcast(buf, src=0)
    return buf.bool()


@torch.no_grad()
def magnitude_prune(layers, density: float, scope: str, distribution: str, optimizer) -> dict[str, float]:
    """Keep the largest |θ| of the active weights of ``layers`` ((name, sparse layer) pairs) at
    ``density`` (of all their weights): per layer with the counts of ``distribution``, or one global
    threshold; a weight pruned before stays pruned. The rest restarts at θ = 0 with zero state (GMP, AC/DC).
    Returns name -> density."""
    from ..masks import layer_counts, num_active

    if any(distributed.is_sharded(module.param.w) for _, module in layers):
        masks = _sharded_magnitude_masks(layers, density, scope, distribution)
        for name, module in layers:
            apply_mask(module, masks[name], optimizer)
        return {name: module.density() for name, module in layers}
    scores = {}
    for name, module in layers:
        active = module.mask2d()
        s = module.theta().detach().abs().reshape(module.param.shape2d).to(torch.float64)
        scores[name] = s if active is None else torch.where(active, s, torch.full_like(s, -1.0))
    if scope == "global":
        flat = torch.cat([s.flatten() for s in scores.values()])
        keep = _topk_mask(flat, num_active(density, flat.numel()))
        masks, start = {}, 0
        for name, s in scores.items():
            masks[name] = keep[start:start + s.numel()].reshape(s.shape)
            start += s.numel()
    else:
        counts = layer_counts({n: tuple(s.shape) for n, s in scores.items()}, density, distribution)
        # never more than a layer still has: the rounding of the layer counts may give a layer one weight
        # more at a lower density, and a pruned weight (score −1) must stay pruned
        masks = {n: _topk_mask(s.flatten(), min(counts[n], int((s >= 0).sum()))).reshape(s.shape)
                 for n, s in scores.items()}
    out = {}
    for name, module in layers:
        apply_mask(module, masks[name], optimizer)
        out[name] = module.density()
    return out


def _sharded_magnitude_masks(layers, density: float, scope: str, distribution: str) -> dict[str, Tensor]:
    """:func:`magnitude_prune`'s masks on FSDP2 row shards (dense storage): the same as one process's, the
    threshold selected over the shards without gathering θ (``distributed.select``)."""
    from ..distributed.select import topk_masks, whole_from_rows
    from ..masks import layer_counts, num_active

    scores, active = [], []
    for name, module in layers:
        pz = module.param
        if pz.layout != "dense":
            raise RuntimeError(f"layer {name!r}: a sharded magnitude prune needs the dense layout, got {pz.layout!r}")
        scores.append(pz.local_values().detach().abs().reshape(-1, pz.shape2d[1]).to(torch.float64))
        active.append(distributed.local_rows(module.mask2d(), pz.w))
    if scope == "global":
        total = sum(module.param.shape2d[0] * module.param.shape2d[1] for _, module in layers)
        keep = topk_masks(scores, num_active(density, total), active)
    else:
        shapes = {name: module.param.shape2d for name, module in layers}
        counts = layer_counts(shapes, density, distribution)
        keep = []
        for (name, module), s, a in zip(layers, scores, active):
            mask = module.mask2d()  # a pruned weight stays pruned: at most the weights the layer still has
            n_active = math.prod(module.param.shape2d) if mask is None else int(mask.sum())
            keep.append(topk_masks([s], min(counts[name], n_active), [a])[0])
    return {name: whole_from_rows(k, module.param.w) for (name, module), k in zip(layers, keep)}
