"""signin_reset: re-factor θ = M ⊙ m ⊙ w to the scale β in one pass (the Sign-In reset).

    θ  = where(M, m·w, 0)            rounded to the storage dtype, exactly as reparam would store it
    m' = sqrt(β/2 + hypot(β/2, θ))   w' = θ / m'                  (fp32 math, one rounding on store)

Reads m, w, M once and writes m', w' once (unfused: reparam, then the factorisation's ~6 temporaries).
Pruned coordinates come out as m' = sqrt(β), w' = 0, the state a regrown coordinate starts from.
The same math, fused into the optimizer step, is ``fused_step.fused_step_signin``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (SUPPORTED_DTYPES, all_contiguous, as_2d, cast_out, check_device, check_dtype,
                      check_mask, check_same, elementwise_config, elementwise_grid, ew_at, ew_offsets,
                      factorize, Launch, strides, upcast_flag)

__all__ = ["signin_reset", "SUPPORTED_DTYPES"]


@triton.jit
def _signin_reset_kernel(
    m_ptr,
    w_ptr,
    mask_ptr,
    m_out_ptr,
    w_out_ptr,
    numel,
    rows,
    cols,
    half_beta,
    s_m0,
    s_m1,
    s_w0,
    s_w1,
    s_q0,
    s_q1,
    s_o0,
    s_o1,
    HAS_MASK: tl.constexpr,
    FLAT: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r, c, inb = ew_offsets(FLAT, BLOCK, BLOCK_R, BLOCK_C, numel, rows, cols)
    dtype = w_ptr.dtype.element_ty
    m = tl.load(m_ptr + ew_at(FLAT, r, c, s_m0, s_m1), mask=inb, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + ew_at(FLAT, r, c, s_w0, s_w1), mask=inb, other=0.0).to(tl.float32)
    theta = cast_out(m * w, dtype, UPCAST).to(tl.float32)  # θ as stored, like reparam_ref
    if HAS_MASK:
        keep = tl.load(mask_ptr + ew_at(FLAT, r, c, s_q0, s_q1), mask=inb, other=0) != 0
        theta = tl.where(keep, theta, 0.0)
    new_m, new_w = factorize(theta, half_beta)
    out = ew_at(FLAT, r, c, s_o0, s_o1)  # both outputs are fresh tensors of one layout
    tl.store(m_out_ptr + out, cast_out(new_m, dtype, UPCAST), mask=inb)
    tl.store(w_out_ptr + out, cast_out(new_w, dtype, UPCAST), mask=inb)


def check_beta(beta: float) -> float:
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    return float(beta)


def prepare(m, w, mask, beta, config=None):
    check_device("w", w)
    check_dtype("w", w)
    if m is None:
        raise ValueError("m must be a tensor for a Sign-In reset (the (m, w) parameterization), got None")
    check_same("m", m, w)
    check_mask(mask, w)
    beta = check_beta(beta)
    new_m = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    new_w = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    flat = all_contiguous(m, w, mask)
    m2, w2, q2, o2 = (None if t is None else as_2d(t) for t in (m, w, mask, new_m))
    rows, cols = w2.shape
    args = dict(
        m_ptr=m2, w_ptr=w2, mask_ptr=w2 if q2 is None else q2, m_out_ptr=o2, w_out_ptr=as_2d(new_w),
        numel=w.numel(), rows=rows, cols=cols, half_beta=0.5 * beta, **strides("01", m=m2, w=w2, q=q2, o=o2),
        HAS_MASK=mask is not None, FLAT=flat, UPCAST=upcast_flag(),
    )
    launch = Launch(
        _signin_reset_kernel,
        elementwise_grid(flat, w.numel(), rows, cols),
        args,
        config or elementwise_config(),
    )
    return launch, (new_m, new_w)


def signin_reset(
    m: torch.Tensor, w: torch.Tensor, mask: torch.Tensor | None, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """New (m, w) with the same θ = M ⊙ m ⊙ w and m² − w² = β (any shape; see reference.signin_reset_ref)."""
    launch, out = prepare(m, w, mask, beta)
    if w.numel():
        launch.run()
    return out


def aot_launches():
    out = []
    for dtype in SUPPORTED_DTYPES:
        for has_mask in (False, True):
            for flat in (True, False):
                w = torch.empty(64, 96, dtype=dtype, device="meta")
                if not flat:
                    w = torch.empty(96, 64, dtype=dtype, device="meta").t()
                q = torch.empty_like(w, dtype=torch.bool) if has_mask else None
                launch = prepare(torch.empty_like(w), w, q, 1.0, config=elementwise_config(gpu=True))[0]
                out.append(
                    (f"signin_reset-{str(dtype)[6:]}-mask{int(has_mask)}-flat{int(flat)}", launch, False)
                )
    return out
