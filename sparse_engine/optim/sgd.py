"""SGD (momentum, dampening, Nesterov, coupled weight decay) over parameterized weights.

Same math as ``torch.optim.SGD`` on every tensor (the fused op's reference is written to match it step by
step); see :mod:`sparse_engine.optim.base` for roles, masks, α, resets and step-in-backward.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from . import reset as _reset
from .base import SparseOptimizer, check_number


class SGD(SparseOptimizer):
    """Stochastic gradient descent with momentum, as torch.optim.SGD, for sparse parameterized weights.

    Args:
        params: a model or parameters / param groups (see :class:`SparseOptimizer`).
        lr: learning rate (stored per group as a 0-dim float64 tensor).
        momentum, dampening, nesterov, weight_decay, maximize: as torch.optim.SGD.
        alpha: PILoT's α on the factors m, w (the regulariser α(‖m‖² + ‖w‖²)); usually set by a schedule.
        factor_lr, nonfinite, reset_policy: see :class:`SparseOptimizer`.

    State per tensor: ``momentum_buffer`` (when momentum != 0) and ``step`` (float32 CPU tensor).
    """

    kind = "sgd"
    buffer_names = ("momentum_buffer",)

    def __init__(
        self,
        params: nn.Module | Iterable,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        alpha: float = 0.0,
        factor_lr: float | None = None,
        nonfinite: str = "skip",
        reset_policy: str = "transform",
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults, factor_lr=factor_lr, nonfinite=nonfinite, reset_policy=reset_policy)
        if alpha:
            self.set_alpha(alpha)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_number("momentum", group["momentum"])
        check_number("dampening", group["dampening"])
        check_number("weight_decay", group["weight_decay"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening = 0, got "
                             f"momentum={group['momentum']}, dampening={group['dampening']}")

    def _init_state(self, p, group):
        state = super()._init_state(p, group)
        if group["momentum"] != 0 and state.get("momentum_buffer") is None:
            # fused_step overwrites it with the gradient on step 1, as torch.optim.SGD does
            state["momentum_buffer"] = torch.zeros_like(p.detach())  # p's strides (channels_last)
        return state

    def _buffers(self, state, group):
        return (state.get("momentum_buffer") if group["momentum"] != 0 else None), None

    def _hyper(self, group):
        return dict(momentum=float(group["momentum"]), dampening=float(group["dampening"]),
                    nesterov=bool(group["nesterov"]), weight_decay=float(group["weight_decay"]),
                    maximize=bool(group["maximize"]))

    def _transform_state(self, sm, sw, m_old, w_old, m_new, w_new, mask) -> None:
        b_m, b_w = sm.get("momentum_buffer"), sw.get("momentum_buffer")
        if b_m is None or b_w is None:
            return
        new_m, new_w = _reset.transform_momentum(b_m, b_w, m_old, w_old, m_new, w_new, mask)
        b_m.copy_(new_m)
        b_w.copy_(new_w)
