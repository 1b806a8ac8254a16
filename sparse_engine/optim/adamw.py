"""AdamW (decoupled weight decay) over parameterized weights.

Same math as ``torch.optim.AdamW`` (amsgrad=False) on every tensor; PILoT's α enters as the gradient of
α(‖m‖² + ‖w‖²), i.e. coupled (it is part of the objective), unlike the decoupled weight decay. See
:mod:`sparse_engine.optim.base` for roles, masks, resets and step-in-backward.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from . import reset as _reset
from .base import SparseOptimizer, check_number


class AdamW(SparseOptimizer):
    """Adam with decoupled weight decay, as torch.optim.AdamW, for sparse parameterized weights.

    Args:
        params: a model or parameters / param groups (see :class:`SparseOptimizer`).
        lr, betas, eps, weight_decay, maximize: as torch.optim.AdamW (default weight_decay 1e-2).
        alpha, factor_lr, nonfinite, reset_policy: see :class:`SGD` / :class:`SparseOptimizer`.

    State per tensor: ``step`` (float32 CPU tensor), ``exp_avg``, ``exp_avg_sq``: the names of torch.
    """

    kind = "adamw"
    buffer_names = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: nn.Module | Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        alpha: float = 0.0,
        factor_lr: float | None = None,
        nonfinite: str = "skip",
        reset_policy: str = "transform",
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, factor_lr=factor_lr, nonfinite=nonfinite, reset_policy=reset_policy)
        if alpha:
            self.set_alpha(alpha)

    def _validate_group(self, group: dict[str, Any]) -> None:
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        check_number("betas[0]", betas[0], high=1.0, high_open=True)
        check_number("betas[1]", betas[1], high=1.0, high_open=True)
        check_number("eps", group["eps"])
        check_number("weight_decay", group["weight_decay"])

    def _init_state(self, p, group):
        state = super()._init_state(p, group)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p.detach())  # p's strides (channels_last)
            state["exp_avg_sq"] = torch.zeros_like(p.detach())
        return state

    def _buffers(self, state, group):
        return state["exp_avg"], state["exp_avg_sq"]

    def _hyper(self, group):
        b1, b2 = group["betas"]
        return dict(beta1=float(b1), beta2=float(b2), eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]), maximize=bool(group["maximize"]))

    def _transform_state(self, sm, sw, m_old, w_old, m_new, w_new, mask) -> None:
        if "exp_avg" not in sm or "exp_avg" not in sw:
            return
        new = _reset.transform_adam(sm["exp_avg"], sw["exp_avg"], sm["exp_avg_sq"], sw["exp_avg_sq"],
                                    m_old, w_old, m_new, w_new, mask)
        for buf, value in zip((sm["exp_avg"], sw["exp_avg"], sm["exp_avg_sq"], sw["exp_avg_sq"]), new):
            buf.copy_(value)
