"""The fused optimizer over parameterized weights: shared machinery of :class:`SGD` and :class:`AdamW`.

What it adds to ``torch.optim``
-------------------------------
* **Roles.** Every trainable tensor has a role: ``"m"`` / ``"w"`` (the factors of a Sign-In or PILoT
  :class:`~sparse_engine.param.Parameterization`), ``"theta"`` (a Masked weight trained directly) or
  ``"other"`` (biases, norms, embeddings: exactly ``torch.optim``). Roles and masks are discovered from the
  model (:meth:`SparseOptimizer.bind`); masks are looked up at every step because PILoT's prune and
  dynamic masks replace them during training.
* **One fused pass per tensor, one call per group.** ``ops.fused_step`` reads the gradient once and
  applies the optimizer, weight decay λ_t, PILoT's α_t (only on the ``m`` / ``w`` roles) and the mask
  (pruned coordinates keep their value and get exactly zero state). :meth:`SparseOptimizer._apply` hands
  all tensors of a group to ``ops.fused_step_multi`` at once (one C++ call on CPU: the per-call overhead
  of a small model's many tensors was a large part of its step).
* **Learning rate as a tensor** (0-dim, float64, on the parameters' device): a schedule writes into it
  (``torch.optim.lr_scheduler`` does ``fill_``) and nothing that captured it needs recompiling.
* **Sign-In reset** (:meth:`SparseOptimizer.signin_reset`) with an optimizer-state policy:
  ``keep`` (buffers untouched), ``zero`` (fresh state, step count 0) or ``transform`` (re-express the state
  in the new coordinates; see :mod:`sparse_engine.optim.reset`).
* **Non-finite gradients never reach the weights**: ``nonfinite="skip"`` skips the whole step and counts
  it (``skipped_steps``), ``"raise"`` raises :class:`NonFiniteGradError`. Only active (unmasked)
  coordinates are checked: a NaN at a pruned coordinate is ignored by the update anyway.
* **Step-in-backward** (:meth:`SparseOptimizer.attach`): each tensor is updated inside ``backward()`` as
  soon as its gradient is accumulated, and its gradient is freed at once, so no full set of gradients is
  ever alive. Call ``optimizer.step()`` once per iteration all the same: it applies nothing then, but it
  counts the step and runs the step hooks (method schedules). In this mode the finiteness check is per
  tensor: a tensor whose gradient is non-finite is not updated (``skipped_updates``), or it raises.
  Gradient accumulation over several backward passes is not possible in this mode. Under
  DistributedDataParallel, attach the wrapped model (``attach(ddp_model)``): each tensor is then stepped
  after its bucket's all-reduce (:mod:`sparse_engine.distributed.ddp`), never on a local gradient.
* **Distributed jobs**: the first step (and ``attach``) checks that the masks are equal on every rank
  (:func:`sparse_engine.distributed.check_masks`).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed, ops
from ..checks import check_choice
from ..param import Parameterization

ROLES = ("m", "w", "theta", "other")
RESET_POLICIES = ("keep", "zero", "transform")
NONFINITE_POLICIES = ("skip", "raise")


class NonFiniteGradError(FloatingPointError):
    """A gradient holds NaN or inf at an active coordinate and the optimizer was told to raise."""


def check_number(name: str, value, *, low: float = 0.0, high: float | None = None, high_open: bool = False) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    ok = math.isfinite(value) and value >= low
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        hi = "" if high is None else (f" and < {high}" if high_open else f" and <= {high}")
        raise ValueError(f"{name} must be a finite number >= {low}{hi}, got {value}")
    return value


def parameterizations(model: nn.Module) -> list[tuple[str, Parameterization]]:
    """(qualified name, Parameterization) of every parameterized weight in ``model``, in module order."""
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, Parameterization)]


class SparseOptimizer(torch.optim.Optimizer):
    """Base class; use :class:`SGD` or :class:`AdamW`.

    Args:
        params: a model (``nn.Module``: its parameters, roles discovered from its Parameterizations) or
            what ``torch.optim`` accepts (tensors or param-group dicts; call :meth:`bind` with the model
            afterwards, or :meth:`SparseOptimizer.bind` is called by ``Method.apply``). A group's
            ``"params"`` may also hold modules: their parameters are used and their roles bound.
        defaults: per-group hyperparameters (each subclass validates its own).
        factor_lr: with a model, put the factors m, w of Sign-In / PILoT weights in their own group with
            this learning rate (the products m ⊙ w move at a rate ∝ m² + w² = sqrt(β² + 4θ²)).
        nonfinite: "skip" or "raise" (module docstring).
        reset_policy: default state policy of :meth:`signin_reset`: "keep", "zero" or "transform".
    """

    #: "sgd" or "adamw": the ``kind`` argument of ops.fused_step
    kind: str = ""
    #: names of the per-tensor state buffers, in the order of fused_step's buf1, buf2
    buffer_names: tuple[str, ...] = ()

    def __init__(
        self,
        params: nn.Module | Iterable,
        defaults: dict[str, Any],
        *,
        factor_lr: float | None = None,
        nonfinite: str = "skip",
        reset_policy: str = "transform",
    ) -> None:
        self.nonfinite = check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        self.reset_policy = check_choice("reset_policy", reset_policy, RESET_POLICIES)
        self._bindings: dict[Tensor, tuple[str, Parameterization]] = {}
        self._names: dict[int, str] = {}  # id(parameterization) -> its name in the bound model (messages)
        self._handles: list = []
        self.num_steps = 0        # steps applied (or, attached, iterations whose step() was called)
        self.skipped_steps = 0    # whole steps skipped for a non-finite gradient
        self.skipped_updates = 0  # single-tensor updates skipped (attached mode)
        self.num_resets = 0
        self._skipped_in_iteration = False
        self._masks_checked = False
        self._reduced_grads: list[Tensor] = []  # attached under DDP: DDP still fills .grad, freed at step()
        model = params if isinstance(params, nn.Module) else None
        if model is not None:
            params = self._groups_from_model(model, factor_lr)
        elif factor_lr is not None:
            raise ValueError("factor_lr needs a model as params (to know which tensors are factors)")
        defaults = dict(defaults, alpha=0.0)
        super().__init__(params, defaults)
        if model is not None:
            self.bind(model)

    # ----------------------------------------------------------------------------------- groups, roles

    @staticmethod
    def _groups_from_model(model: nn.Module, factor_lr: float | None) -> list[dict]:
        params = list(dict.fromkeys(p for p in model.parameters() if p.requires_grad))
        if not params:
            raise ValueError("params: the model has no trainable parameters")
        if factor_lr is None:
            return [{"params": params}]
        check_number("factor_lr", factor_lr)
        factors = {id(p) for _, pz in parameterizations(model) if pz.factored for p in (pz.m, pz.w)}
        groups = [
            {"params": [p for p in params if id(p) in factors], "lr": factor_lr, "name": "factors"},
            {"params": [p for p in params if id(p) not in factors], "name": "other"},
        ]
        return [g for g in groups if g["params"]]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        params = group.get("params")
        if isinstance(params, (Tensor, nn.Module)):
            params = [params]
        expanded: list[Tensor] = []
        for p in params:
            if isinstance(p, nn.Module):
                self.bind(p)
                expanded.extend(q for q in p.parameters() if q.requires_grad)
            else:
                expanded.append(p)
        group["params"] = list(dict.fromkeys(expanded))
        super().add_param_group(group)
        group = self.param_groups[-1]
        self._validate_group(group)
        device = group["params"][0].device if group["params"] else torch.device("cpu")
        group["lr"] = torch.tensor(check_number("lr", group["lr"]), dtype=torch.float64, device=device)
        group["alpha"] = check_number("alpha", group.get("alpha", 0.0))

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Subclasses check their hyperparameters (errors name the argument)."""

    def bind(self, model: nn.Module) -> SparseOptimizer:
        """Learn the role (m / w / theta) and mask source of every parameterized tensor in ``model``."""
        for name, pz in parameterizations(model):  # includes ``model`` itself if it is a Parameterization
            self._names[id(pz)] = name
            for role, p, _ in pz.step_targets():
                self._bindings[p] = (role, pz)
        return self

    def role(self, p: Tensor) -> str:
        """"m", "w", "theta" or "other"."""
        return self._bindings.get(p, ("other", None))[0]

    def _role_mask(self, p: Tensor) -> tuple[str, Tensor | None]:
        binding = self._bindings.get(p)
        if binding is None:
            return "other", None
        role, pz = binding
        for r, q, mask in pz.step_targets():
            if q is p:
                return r, mask
        return role, None

    def _bound_parameterizations(self) -> list[Parameterization]:
        in_groups = {p for g in self.param_groups for p in g["params"]}
        seen: dict[int, Parameterization] = {}
        for p, (_, pz) in self._bindings.items():
            if p in in_groups:
                seen.setdefault(id(pz), pz)
        return list(seen.values())

    # -------------------------------------------------------------------------------------- the step

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """Create the state of ``p`` (subclasses add their buffers); "step" mirrors torch's CPU float32."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        return state

    def _buffers(self, state: dict[str, Any], group: dict[str, Any]) -> tuple[Tensor | None, Tensor | None]:
        raise NotImplementedError

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of ops.fused_step taken from the group (subclass)."""
        raise NotImplementedError

    def _apply(self, work: list[tuple[dict, Tensor, Tensor, str, Tensor | None]]) -> None:
        """Apply one update to each (group, param, grad, role, mask).

        The single place that calls the fused op: the tensors of one group that share dtype, device and
        step count go to ``ops.fused_step_multi`` together (one call where the backend has a whole-list
        entry point; per-tensor overhead dominates the many small tensors of a model).
        """
        batches: dict[tuple, list] = {}
        states = [self._init_state(p, group) for group, p, *_ in work]
        steps = [st["step"] for st in states]
        if steps:
            torch._foreach_add_(steps, 1)
        for (group, p, grad, role, mask), state in zip(work, states):
            step = int(state["step"].item())
            buf1, buf2 = self._buffers(state, group)
            alpha = group["alpha"] if role in ("m", "w") else 0.0
            if distributed.is_sharded(p):  # FSDP2: the step is elementwise, run it on this rank's shard
                mask = distributed.local_rows(mask, p)
                p, grad, buf1, buf2 = (None if t is None else distributed.local(t) for t in (p, grad, buf1, buf2))
            key = (id(group), p.dtype, p.device, step)
            batches.setdefault(key, [group, step, []])[2].append((p, grad, buf1, buf2, mask, alpha))
        for group, step, items in batches.values():
            p, g, b1, b2, mk, a = (list(col) for col in zip(*items))
            ops.fused_step_multi(p, g, b1, b2, mk, group["lr"], step, self.kind, alphas=a, **self._hyper(group))

    @staticmethod
    def _finite(grads: list[Tensor], masks: list[Tensor | None]) -> bool:
        """Whether every gradient is finite at its active coordinates (ops.all_finite: one call for the
        list; a NaN or inf at a pruned coordinate is not an error)."""
        return ops.all_finite(grads, masks)

    def _all_finite(self, work: list[tuple[dict, Tensor, Tensor, str, Tensor | None]]) -> bool:
        """_finite over the (group, param, grad, role, mask) items; sharded gradients are checked on each
        rank's shard and the verdict is shared, so that every rank skips the same steps."""
        sharded = any(distributed.is_sharded(w[1]) for w in work)
        if not sharded:
            return self._finite([w[2] for w in work], [w[4] for w in work])
        ok = self._finite([distributed.local(w[2]) for w in work], [distributed.local_rows(w[4], w[1]) for w in work])
        return distributed.all_ranks(ok)

    def _nonfinite(self, where: str) -> None:
        if self.nonfinite == "raise":
            raise NonFiniteGradError(
                f"non-finite gradient (NaN or inf) {where}; the weights were not updated "
                "(lower the learning rate, or use nonfinite='skip' to skip such steps)"
            )

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step over every parameter with a gradient (nothing to apply when attached)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._handles:
            for p in self._reduced_grads:
                p.grad = None
            if self._skipped_in_iteration:
                self.skipped_steps += 1
                self._skipped_in_iteration = False
            self.num_steps += 1
            return loss
        work = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                role, mask = self._role_mask(p)
                work.append((group, p, p.grad, role, mask))
        self._check_masks()
        if not self._all_finite(work):
            self._nonfinite(f"at step {self.num_steps + 1}")
            self.skipped_steps += 1
            return loss
        self._apply(work)
        self.num_steps += 1
        return loss

    # ------------------------------------------------------------------------------ step-in-backward

    def attach(self, model: nn.Module | None = None) -> SparseOptimizer:
        """Update each tensor inside backward as soon as its gradient is accumulated, then free it.

        ``model`` (optional) is bound first. Idempotent. :meth:`detach` returns to ordinary steps.
        """
        if model is not None:
            self.bind(model)
        if self._handles:
            return self
        if distributed.is_ddp(model):
            self._check_masks()
            self._handles.append(distributed.attach_ddp(self, model))
            self._reduced_grads = [p for g in self.param_groups for p in g["params"]]
            return self
        params = [p for g in self.param_groups for p in g["params"]]
        if distributed.world_size() > 1 and not any(distributed.is_sharded(p) for p in params):
            raise RuntimeError(
                f"attach(): this is a distributed job of {distributed.world_size()} processes; pass the "
                "DistributedDataParallel-wrapped model (optimizer.attach(ddp_model)) so that each tensor is "
                "stepped after its gradient's all-reduce, not on its local gradient")
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.requires_grad:
                    # the group is looked up by index at each call: load_state_dict replaces the dicts
                    hook = functools.partial(self._backward_hook, index)
                    self._handles.append(p.register_post_accumulate_grad_hook(hook))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._reduced_grads = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @torch.no_grad()
    def _backward_hook(self, group_index: int, p: Tensor) -> None:
        grad = p.grad
        if grad is None:
            return
        try:
            self._update_attached(group_index, p, grad)
        finally:
            p.grad = None  # the point of this mode: the gradient dies right after its update

    def _group_index(self, p: Tensor) -> int | None:
        for index, group in enumerate(self.param_groups):
            if any(q is p for q in group["params"]):
                return index
        return None

    @torch.no_grad()
    def _update_attached(self, group_index: int, p: Tensor, grad: Tensor) -> None:
        """One tensor's update inside backward (its own finiteness check)."""
        role, mask = self._role_mask(p)
        if not self._all_finite([(None, p, grad, role, mask)]):  # FSDP2: the verdict of all the shards
            self.skipped_updates += 1
            self._skipped_in_iteration = True
            self._nonfinite(f"for a {tuple(p.shape)} tensor (role {role!r}) during backward")
            return
        self._apply([(self.param_groups[group_index], p, grad, role, mask)])

    def _check_masks(self) -> None:
        """In a distributed job, once: the bound masks are the same on every rank (a collective)."""
        if self._masks_checked or distributed.world_size() == 1:
            return
        distributed.check_masks([(self._names.get(id(pz), ""), pz) for pz in self._bound_parameterizations()])
        self._masks_checked = True

    # ---------------------------------------------------------------------------------- method hooks

    @torch.no_grad()
    def signin_reset(
        self, beta: float | None = None, policy: str | None = None, kinds: tuple[str, ...] = ("signin", "pilot")
    ) -> int:
        """Re-factor every bound Sign-In / PILoT weight to m² − w² = β (θ unchanged) and map its state.

        ``policy`` (default: the optimizer's ``reset_policy``): "keep", "zero" or "transform"
        (see :mod:`sparse_engine.optim.reset`). Returns the number of weights reset.
        """
        policy = check_choice("policy", policy or self.reset_policy, RESET_POLICIES)
        n = 0
        for pz in self._bound_parameterizations():
            if not pz.factored or pz.kind not in kinds:
                continue
            m_old, w_old = pz.m.detach().clone(), pz.w.detach().clone()
            pz.reset(beta)
            self._map_state(pz, m_old, w_old, policy)
            n += 1
        self.num_resets += 1
        return n

    def _map_state(self, pz: Parameterization, m_old: Tensor, w_old: Tensor, policy: str) -> None:
        sm, sw = self.state.get(pz.m), self.state.get(pz.w)
        if policy == "keep" or not sm or not sw:
            return
        if policy == "zero":
            for st in (sm, sw):
                for name in self.buffer_names:
                    if st.get(name) is not None:
                        st[name].zero_()
                st["step"].zero_()
            return
        mask = distributed.local_rows(pz.step_targets()[0][2], pz.m)
        loc = distributed.local  # FSDP2: the transform is elementwise, on this rank's shard
        self._transform_state({k: loc(v) for k, v in sm.items()}, {k: loc(v) for k, v in sw.items()}, loc(m_old),
                              loc(w_old), loc(pz.m.detach()), loc(pz.w.detach()), mask)

    def _transform_state(self, sm, sw, m_old, w_old, m_new, w_new, mask) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def mask_changed(self) -> None:
        """Zero the state at every pruned coordinate (call after Parameterization.set_mask)."""
        for pz in self._bound_parameterizations():
            for _, p, mask in pz.step_targets():
                st = self.state.get(p)
                if mask is None or not st:
                    continue
                for name in self.buffer_names:
                    buf = st.get(name)
                    if buf is not None:  # FSDP2: the buffer is a shard like p, the mask whole
                        distributed.local(buf).masked_fill_(~distributed.local_rows(mask, p), 0)

    def materialize_state(self) -> None:
        """Create every parameter's state (zero buffers, step 0) now: a distributed checkpoint loads in
        place. A step count of 0 makes the first step start the buffers anew, as without this call."""
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p, group)

    def reset_state(self) -> None:
        """Forget all optimizer state (fresh buffers, step counts 0): used by prune-retrain rounds."""
        self.state.clear()

    def set_alpha(self, alpha: float) -> None:
        """PILoT's α on every group (applied only to the factors m, w)."""
        alpha = check_number("alpha", alpha)
        for g in self.param_groups:
            g["alpha"] = alpha

    # ------------------------------------------------------------------------------------ state dict

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["sparse_engine"] = {
            "kind": self.kind, "num_steps": self.num_steps, "skipped_steps": self.skipped_steps,
            "skipped_updates": self.skipped_updates, "num_resets": self.num_resets,
            "reset_policy": self.reset_policy, "nonfinite": self.nonfinite,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict.get("sparse_engine")
        if extra is not None and extra.get("kind") != self.kind:
            raise ValueError(f"state_dict is from a {extra.get('kind')!r} optimizer, this one is {self.kind!r}")
        lrs = [g["lr"] for g in self.param_groups]
        super().load_state_dict(state_dict)
        # Keep our own lr tensors (their identity is what compiled code and schedulers captured).
        for lr, g in zip(lrs, self.param_groups):
            lr.fill_(float(g["lr"]))
            g["lr"] = lr
        for g in self.param_groups:
            g.setdefault("alpha", 0.0)
        for p, st in self.state.items():
            if "step" in st and not isinstance(st["step"], Tensor):
                st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)
            # Buffers are updated in place through p's memory order (channels_last included), so each
            # takes p's strides: a state saved from a contiguous model may be loaded into a channels_last one.
            for k, v in st.items():
                if isinstance(v, Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p).copy_(v)
        if extra is not None:
            self.num_steps = int(extra["num_steps"])
            self.skipped_steps = int(extra["skipped_steps"])
            self.skipped_updates = int(extra["skipped_updates"])
            self.num_resets = int(extra["num_resets"])
            self.reset_policy = extra["reset_policy"]
            self.nonfinite = extra["nonfinite"]

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for name, default in (("_bindings", {}), ("_names", {}), ("_masks_checked", False),
                              ("_reduced_grads", []), ("_handles", []), ("num_steps", 0), ("skipped_steps", 0),
                              ("skipped_updates", 0), ("num_resets", 0), ("_skipped_in_iteration", False),
                              ("nonfinite", "skip"), ("reset_policy", "transform")):
            if name not in self.__dict__:
                setattr(self, name, default)
