"""reparam: θ = M ⊙ m ⊙ w and its backward, one memory pass each.

Forward   θ = where(M, m·w, 0)                         reads m, w, M once, writes θ once
Backward  g_m = where(M, G·w, 0), g_w = where(M, G·m, 0)  reads G, m, w, M once, writes g_m, g_w once
          (Masked parameterization, m absent: g_w = where(M, G, 0))

Unfused PyTorch makes three passes for the forward (m·w, then the mask, with a temporary) and four for
the backward. ``where`` rather than a product applies the mask, so a NaN/inf at a pruned coordinate never
leaks into θ or a gradient. Products are formed in fp32 and rounded once to the storage dtype, which
for a single product equals torch's own rounding.

Layouts: when every operand is contiguous the kernel walks one flat range (vectorised loads); otherwise
(transposed or sliced weights) it walks 2-D tiles with per-operand strides. Tensors of more than two
dims are viewed as (shape[0], rest) — a copy only when no such view exists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (SUPPORTED_DTYPES, all_contiguous, as_2d, cast_out, check_device, check_dtype,
                      check_mask, check_same, elementwise_config, elementwise_grid, ew_at, ew_offsets, Launch,
                      strides, upcast_flag)

__all__ = ["reparam_fwd", "reparam_bwd", "SUPPORTED_DTYPES"]


@triton.jit
def _reparam_fwd_kernel(
    m_ptr,
    w_ptr,
    mask_ptr,
    out_ptr,
    numel,
    rows,
    cols,
    s_m0,
    s_m1,
    s_w0,
    s_w1,
    s_q0,
    s_q1,
    s_o0,
    s_o1,
    HAS_M: tl.constexpr,
    HAS_MASK: tl.constexpr,
    FLAT: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r, c, inb = ew_offsets(FLAT, BLOCK, BLOCK_R, BLOCK_C, numel, rows, cols)
    # fp32 math: one rounding at the store, and bf16 is right in the interpreter too
    theta = tl.load(w_ptr + ew_at(FLAT, r, c, s_w0, s_w1), mask=inb, other=0.0).to(tl.float32)
    if HAS_M:
        theta = theta * tl.load(m_ptr + ew_at(FLAT, r, c, s_m0, s_m1), mask=inb, other=0.0).to(tl.float32)
    if HAS_MASK:
        keep = tl.load(mask_ptr + ew_at(FLAT, r, c, s_q0, s_q1), mask=inb, other=0) != 0
        theta = tl.where(keep, theta, 0.0)
    tl.store(
        out_ptr + ew_at(FLAT, r, c, s_o0, s_o1), cast_out(theta, out_ptr.dtype.element_ty, UPCAST), mask=inb
    )


@triton.jit
def _reparam_bwd_kernel(
    g_ptr,
    m_ptr,
    w_ptr,
    mask_ptr,
    gm_ptr,
    gw_ptr,
    numel,
    rows,
    cols,
    s_g0,
    s_g1,
    s_m0,
    s_m1,
    s_w0,
    s_w1,
    s_q0,
    s_q1,
    s_gm0,
    s_gm1,
    s_gw0,
    s_gw1,
    HAS_M: tl.constexpr,
    HAS_MASK: tl.constexpr,
    FLAT: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r, c, inb = ew_offsets(FLAT, BLOCK, BLOCK_R, BLOCK_C, numel, rows, cols)
    g = tl.load(g_ptr + ew_at(FLAT, r, c, s_g0, s_g1), mask=inb, other=0.0).to(tl.float32)
    if HAS_MASK:
        keep = tl.load(mask_ptr + ew_at(FLAT, r, c, s_q0, s_q1), mask=inb, other=0) != 0
    if HAS_M:
        m = tl.load(m_ptr + ew_at(FLAT, r, c, s_m0, s_m1), mask=inb, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + ew_at(FLAT, r, c, s_w0, s_w1), mask=inb, other=0.0).to(tl.float32)
        gm = g * w
        gw = g * m
        if HAS_MASK:
            gm = tl.where(keep, gm, 0.0)
            gw = tl.where(keep, gw, 0.0)
        tl.store(
            gm_ptr + ew_at(FLAT, r, c, s_gm0, s_gm1), cast_out(gm, gm_ptr.dtype.element_ty, UPCAST), mask=inb
        )
    else:
        gw = g
        if HAS_MASK:
            gw = tl.where(keep, gw, 0.0)
    tl.store(
        gw_ptr + ew_at(FLAT, r, c, s_gw0, s_gw1), cast_out(gw, gw_ptr.dtype.element_ty, UPCAST), mask=inb
    )


# ------------------------------------------------------------------------------------------ launchers


def _check(m, w, mask, grad=None) -> None:
    check_device("w", w)
    check_dtype("w", w)
    check_same("m", m, w)
    check_mask(mask, w)
    check_same("grad", grad, w)


def prepare_fwd(
    m: torch.Tensor | None,
    w: torch.Tensor,
    mask: torch.Tensor | None,
    out: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> tuple[Launch, torch.Tensor]:
    """The launch computing θ into ``out`` (allocated like ``w`` when None). Shapes: all equal."""
    _check(m, w, mask)
    if out is None:
        out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    check_same("out", out, w)
    flat = all_contiguous(m, w, mask, out)
    m2, w2, q2, o2 = (None if t is None else as_2d(t) for t in (m, w, mask, out))
    rows, cols = w2.shape
    args = dict(
        m_ptr=w2 if m2 is None else m2, w_ptr=w2, mask_ptr=w2 if q2 is None else q2, out_ptr=o2,
        numel=w.numel(), rows=rows, cols=cols, **strides("01", m=m2, w=w2, q=q2, o=o2), HAS_M=m is not None,
        HAS_MASK=mask is not None, FLAT=flat, UPCAST=upcast_flag(),
    )
    cfg = config or elementwise_config()
    return Launch(_reparam_fwd_kernel, elementwise_grid(flat, w.numel(), rows, cols), args, cfg), out


def reparam_fwd(m: torch.Tensor | None, w: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """θ = M ⊙ m ⊙ w (θ = M ⊙ w when m is None); any shape, same dtype as w. See reference.reparam_ref."""
    launch, out = prepare_fwd(m, w, mask)
    launch.run()
    return out


def prepare_bwd(
    grad: torch.Tensor,
    m: torch.Tensor | None,
    w: torch.Tensor,
    mask: torch.Tensor | None,
    config: triton.Config | None = None,
):
    _check(m, w, mask, grad)
    g_m = None if m is None else torch.empty(w.shape, dtype=w.dtype, device=w.device)
    g_w = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    flat = all_contiguous(grad, m, w, mask)
    g2, m2, w2, q2, gm2, gw2 = (None if t is None else as_2d(t) for t in (grad, m, w, mask, g_m, g_w))
    rows, cols = w2.shape
    args = dict(
        g_ptr=g2, m_ptr=w2 if m2 is None else m2, w_ptr=w2, mask_ptr=w2 if q2 is None else q2,
        gm_ptr=gw2 if gm2 is None else gm2, gw_ptr=gw2, numel=w.numel(), rows=rows, cols=cols,
        **strides("01", g=g2, m=m2, w=w2, q=q2, gm=gm2, gw=gw2), HAS_M=m is not None,
        HAS_MASK=mask is not None, FLAT=flat, UPCAST=upcast_flag(),
    )
    cfg = config or elementwise_config()
    return Launch(_reparam_bwd_kernel, elementwise_grid(flat, w.numel(), rows, cols), args, cfg), (g_m, g_w)


def reparam_bwd(
    grad: torch.Tensor, m: torch.Tensor | None, w: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(g_m, g_w) = (G ⊙ M ⊙ w, G ⊙ M ⊙ m); g_m is None and g_w = G ⊙ M when m is None."""
    launch, out = prepare_bwd(grad, m, w, mask)
    launch.run()
    return out


def aot_launches():
    """Every specialisation a GPU run can launch: (name, Launch, sweep=False), on meta tensors."""
    out = []
    for dtype in SUPPORTED_DTYPES:
        for has_m in (False, True):
            for has_mask in (False, True):
                for flat in (True, False):
                    w = torch.empty(64, 96, dtype=dtype, device="meta")
                    if not flat:
                        w = torch.empty(96, 64, dtype=dtype, device="meta").t()
                    m = torch.empty_like(w) if has_m else None
                    q = torch.empty_like(w, dtype=torch.bool) if has_mask else None
                    tag = f"{dtype}-m{int(has_m)}-mask{int(has_mask)}-flat{int(flat)}"
                    out.append(
                        (
                            f"reparam_fwd-{tag}",
                            prepare_fwd(m, w, q, config=elementwise_config(gpu=True))[0],
                            False,
                        )
                    )
                    g = torch.empty_like(w)
                    out.append(
                        (
                            f"reparam_bwd-{tag}",
                            prepare_bwd(g, m, w, q, config=elementwise_config(gpu=True))[0],
                            False,
                        )
                    )
    return out
