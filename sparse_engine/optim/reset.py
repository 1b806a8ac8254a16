"""Optimizer state across a Sign-In reset: the ``transform`` policy.

A reset re-factors (m, w) -> (m', w') with m' ⊙ w' = m ⊙ w = θ and m'² − w'² = β. The
optimizer state was accumulated in the old coordinates; ``keep`` leaves it there, ``zero`` drops it, and
``transform`` re-expresses it in the new ones. Everything is elementwise; all products below are
elementwise, computed in float32 (float64 for float64 state) and cast back.

SGD momentum (derived)
----------------------
The momentum buffers b_m, b_w drive the factors: Δm = −η b_m, Δw = −η b_w, so to first order θ moves
with the *θ-velocity*

    v_θ = w·b_m + m·b_w          (old coordinates).

Gradients in the factored coordinates have the form g_m = G·w, g_w = G·m for a θ-gradient G, so the new
buffers are taken of the same form, b_m' = G·w', b_w' = G·m', and G is fixed by keeping the θ-velocity:
w'·b_m' + m'·b_w' = G (m'² + w'²) = v_θ, hence

    G = v_θ / (m'² + w'²),       b_m' = G·w',   b_w' = G·m'.

This is also the minimum-norm (b_m', b_w') with that velocity. m'² + w'² ≥ β > 0, so no division by zero.
The first step after a transform reset therefore moves θ exactly as the next step without a reset would
have, through the momentum term; only the gradient term sees the new scale m'² + w'².

Adam moments (derived; a choice, documented)
--------------------------------------------
Adam normalises each coordinate, so its θ-velocity depends on the factor scale and cannot be kept while
the scale is changed (restoring the scale is the point of the reset). Instead the moments are read as
*statistics of the θ-gradient* G and rewritten as the statistics Adam would have accumulated in the new
coordinates with the same G history (exact when m, w changed slowly over the averaging window):

* first moment: a_m ≈ Ĝ·w, a_w ≈ Ĝ·m. Least squares for Ĝ in the old coordinates,
  Ĝ = (w·a_m + m·a_w) / (m² + w²); then a_m' = Ĝ·w', a_w' = Ĝ·m'.
* second moment: s_m ≈ Ŝ·w², s_w ≈ Ŝ·m² with Ŝ ≈ E[G²]. Adding the two equations gives the
  estimator Ŝ = (s_m + s_w) / (m² + w²) (non-negative, well conditioned even where w = 0); then
  s_m' = Ŝ·w'², s_w' = Ŝ·m'².

The step count (bias correction) is kept. Where the old m² + w² is 0 (only possible with β = 0 and θ = 0)
nothing was accumulated and the new state is 0. Pruned coordinates (mask False) get exactly 0.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _masked(t: Tensor, mask: Tensor | None) -> Tensor:
    return t if mask is None else torch.where(mask, t, torch.zeros((), dtype=t.dtype, device=t.device))


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


@torch.no_grad()
def transform_momentum(
    b_m: Tensor, b_w: Tensor, m_old: Tensor, w_old: Tensor, m_new: Tensor, w_new: Tensor,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """New SGD momentum buffers (b_m', b_w') keeping the θ-velocity w·b_m + m·b_w (module docstring)."""
    dt = _work_dtype(b_m)
    bm, bw, mo, wo, mn, wn = (t.to(dt) for t in (b_m, b_w, m_old, w_old, m_new, w_new))
    v_theta = wo * bm + mo * bw
    g = _safe_div(v_theta, mn * mn + wn * wn)
    return _masked(g * wn, mask).to(b_m.dtype), _masked(g * mn, mask).to(b_w.dtype)


@torch.no_grad()
def transform_adam(
    a_m: Tensor, a_w: Tensor, s_m: Tensor, s_w: Tensor,
    m_old: Tensor, w_old: Tensor, m_new: Tensor, w_new: Tensor, mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """New Adam moments (a_m', a_w', s_m', s_w') for the new coordinates (module docstring)."""
    dt = _work_dtype(a_m)
    am, aw, sm, sw, mo, wo, mn, wn = (t.to(dt) for t in (a_m, a_w, s_m, s_w, m_old, w_old, m_new, w_new))
    scale_old = mo * mo + wo * wo
    g_hat = _safe_div(wo * am + mo * aw, scale_old)
    s_hat = _safe_div(sm + sw, scale_old)
    return (
        _masked(g_hat * wn, mask).to(a_m.dtype),
        _masked(g_hat * mn, mask).to(a_w.dtype),
        _masked(s_hat * wn * wn, mask).to(s_m.dtype),
        _masked(s_hat * mn * mn, mask).to(s_w.dtype),
    )
