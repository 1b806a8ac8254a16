"""fused_step: one optimizer step in one memory pass (SGD-momentum / Nesterov or AdamW, λ, PILoT α, mask).

Per element, in fp32 whatever the storage dtype (reference.fused_step_ref is the spec):

    g  = ±grad (+ 2α·p)                                   maximize, PILoT regulariser
    sgd:   g += λ·p;  buf = g (step 1) | μ·buf + (1−τ)·g;  g = g + μ·buf (Nesterov) | buf;  p -= lr·g
    adamw: p *= 1 − lr·λ;  m1 = lerp(m1, g, 1−β1);  m2 = β2·m2 + (1−β2)·g²
           p -= lr/(1−β1ᵗ) · m1 / (sqrt(m2)/sqrt(1−β2ᵗ) + ε)
    mask:  pruned coordinates keep p, get state exactly 0 (NaN grads there are ignored)

The step reads p, grad, the state and the mask once and writes p and the state once: the optimizer is
memory bound, and torch.optim's for-each path makes several passes with temporaries. ``lr`` is read
from a 0-dim tensor on the device, so a schedule never recompiles anything or syncs the host.

Extra entry points (used by sparse_engine.optim; each in place, returning None):

``fused_step_multi(params, grads, buf1s, buf2s, masks, lr, step, kind, *, momentum=0.0, dampening=0.0,
nesterov=False, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, alpha=0.0, maximize=False)``
    The same step on many tensors in one launch per (param dtype, state dtype) group: a pointer table
    (one row per tensor: param, grad, buf1, buf2, mask addresses) and a block table (tensor, offset) per
    program. ``params``/``grads``: lists of contiguous tensors; ``buf1s``/``buf2s``: lists (entries
    None where a kind needs none) or None; ``masks``: list with None entries, or None; ``weight_decay``
    and ``alpha``: one float or one per tensor. Use it for the many small tensors of a model (biases,
    norms, small layers) where per-tensor launches dominate.

``fused_step_signin(m, w, g_m, g_w, m_buf1, m_buf2, w_buf1, w_buf2, mask, lr, step, kind, *,
momentum=0.0, dampening=0.0, nesterov=False, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
alpha=0.0, maximize=False, beta=None, state="keep")``
    The step on both factors of a Sign-In pair (m, w) in one pass, and when ``beta`` is a float, the
    Sign-In reset of the stepped pair to m² − w² = β in the same pass (θ unchanged up to rounding,
    pruned coordinates set to m = sqrt(β), w = 0). ``state`` says what the reset does to the optimizer
    state: "keep" (left as the step wrote it), "zero", or "transform" — re-express the state in the new
    coordinates through the θ-gradient it stands for: with G = (b_m·w + b_w·m) / (m² + w²) (least-squares
    θ-gradient behind the first moments b_m ≈ G·w, b_w ≈ G·m) the new first moments are G·w', G·m';
    second moments (AdamW) use S = (s_m + s_w) / (m² + w²) and become S·w'², S·m'². m, w, their grads
    and their state tensors share one shape and layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._common import (
    SUPPORTED_DTYPES,
    Launch,
    all_contiguous,
    as_2d,
    cast_out,
    check_device,
    check_dtype,
    check_mask,
    elementwise_config,
    elementwise_grid,
    ew_at,
    ew_offsets,
    factorize,
    upcast_flag,
)

__all__ = ["fused_step", "fused_step_multi", "fused_step_signin", "SUPPORTED_DTYPES"]

STEP_KINDS = ("sgd", "adamw")
RESET_STATES = ("keep", "zero", "transform")
_KIND_ID = {"sgd": 0, "adamw": 1}


# ----------------------------------------------------------------------------------------- the math


@triton.jit
def _update(
    p,
    g,
    b1,
    b2,
    lr,
    momentum,
    one_minus_damp,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    wd,
    two_alpha,
    inv_bc1,
    inv_sqrt_bc2,
    first,
    nesterov,
    maximize,
    KIND: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
):
    """One step on fp32 values; returns (new p, new buf1, new buf2). Mirrors fused_step_ref's op order.

    first / nesterov / maximize are runtime ints (selects cost nothing in a memory-bound kernel, and
    each constexpr would double the number of compiled variants).
    """
    g = tl.where(maximize != 0, -g, g)
    g = tl.where(two_alpha != 0.0, g + two_alpha * p, g)
    if KIND == 0:
        g = tl.where(wd != 0.0, g + wd * p, g)
        if HAS_MOMENTUM:
            # step 1: buf = g (the old buffer, possibly uninitialised, is ignored)
            b1 = tl.where(first != 0, g, b1 * momentum + one_minus_damp * g)
            g = tl.where(nesterov != 0, g + momentum * b1, b1)
        new_p = p - lr * g
    else:
        decayed = p * (1.0 - lr * wd)
        # torch.lerp(start, end, wt): start + wt·(end − start) for wt < 0.5, else end − (end − start)·(1 − wt)
        diff = g - b1
        b1 = tl.where(one_minus_beta1 < 0.5, b1 + one_minus_beta1 * diff, g - diff * beta1)
        b2 = b2 * beta2 + one_minus_beta2 * g * g
        denom = tl.sqrt_rn(b2) * inv_sqrt_bc2 + eps
        new_p = decayed - (lr * inv_bc1) * tl.div_rn(b1, denom)
    return new_p, b1, b2


class _Hyper:
    """Host-side scalars of one step, validated once (errors name the argument)."""

    def __init__(
        self, step, kind, momentum, dampening, nesterov, beta1, beta2, eps, weight_decay, alpha, maximize
    ):
        if kind not in STEP_KINDS:
            raise ValueError(f"kind must be one of {STEP_KINDS}, got {kind!r}")
        if not isinstance(step, int) or step < 1:
            raise ValueError(f"step must be an int >= 1 (1-based count of this step), got {step!r}")
        for name, v in (
            ("momentum", momentum),
            ("dampening", dampening),
            ("beta1", beta1),
            ("beta2", beta2),
            ("eps", eps),
        ):
            if not math.isfinite(float(v)):
                raise ValueError(f"{name} must be finite, got {v}")
        if nesterov and kind == "sgd" and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov requires momentum > 0 and dampening == 0")
        self.kind = kind
        self.step = step
        self.has_momentum = kind == "sgd" and momentum != 0.0
        self.first = step == 1
        self.nesterov = bool(nesterov)
        self.maximize = bool(maximize)
        self.weight_decay = weight_decay
        self.alpha = alpha
        # Python doubles rounded once to fp32 by the launch, as torch does with scalar operands
        self.scalars = dict(
            momentum=float(momentum),
            one_minus_damp=1.0 - float(dampening),
            beta1=float(beta1),
            one_minus_beta1=1.0 - float(beta1),
            beta2=float(beta2),
            one_minus_beta2=1.0 - float(beta2),
            eps=float(eps),
            inv_bc1=1.0 / (1.0 - float(beta1) ** step) if kind == "adamw" else 1.0,
            inv_sqrt_bc2=1.0 / math.sqrt(1.0 - float(beta2) ** step) if kind == "adamw" else 1.0,
        )
        self.flags = dict(KIND=_KIND_ID[kind], HAS_MOMENTUM=self.has_momentum)
        self.runtime = dict(first=int(self.first), nesterov=int(self.nesterov), maximize=int(self.maximize))

    def needs(self) -> tuple[bool, bool]:
        """(buf1 needed, buf2 needed)."""
        return (self.has_momentum or self.kind == "adamw"), self.kind == "adamw"


def _lr_on(lr: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not isinstance(lr, torch.Tensor) or lr.dim() != 0 or not lr.is_floating_point():
        raise ValueError(f"lr must be a 0-dim floating-point tensor, got {lr!r}")
    return lr if lr.device == device else lr.to(device)


# --------------------------------------------------------------------------------- single tensor


@triton.jit(do_not_specialize=["first", "nesterov", "maximize"])
def _fused_step_kernel(
    p_ptr,
    g_ptr,
    b1_ptr,
    b2_ptr,
    mask_ptr,
    lr_ptr,
    numel,
    rows,
    cols,
    s_p0,
    s_p1,
    s_g0,
    s_g1,
    s_b10,
    s_b11,
    s_b20,
    s_b21,
    s_q0,
    s_q1,
    momentum,
    one_minus_damp,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    wd,
    two_alpha,
    inv_bc1,
    inv_sqrt_bc2,
    first,
    nesterov,
    maximize,
    KIND: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    HAS_MASK: tl.constexpr,
    FLAT: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r, c, inb = ew_offsets(FLAT, BLOCK, BLOCK_R, BLOCK_C, numel, rows, cols)
    lr = tl.load(lr_ptr).to(tl.float32)
    p_at = p_ptr + ew_at(FLAT, r, c, s_p0, s_p1)
    p = tl.load(p_at, mask=inb, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + ew_at(FLAT, r, c, s_g0, s_g1), mask=inb, other=0.0).to(tl.float32)
    b1 = tl.zeros_like(p)
    b2 = tl.zeros_like(p)
    if (KIND == 1) or HAS_MOMENTUM:
        b1 = tl.load(b1_ptr + ew_at(FLAT, r, c, s_b10, s_b11), mask=inb, other=0.0).to(tl.float32)
    if KIND == 1:
        b2 = tl.load(b2_ptr + ew_at(FLAT, r, c, s_b20, s_b21), mask=inb, other=0.0).to(tl.float32)
    new_p, b1, b2 = _update(
        p,
        g,
        b1,
        b2,
        lr,
        momentum,
        one_minus_damp,
        beta1,
        one_minus_beta1,
        beta2,
        one_minus_beta2,
        eps,
        wd,
        two_alpha,
        inv_bc1,
        inv_sqrt_bc2,
        first,
        nesterov,
        maximize,
        KIND,
        HAS_MOMENTUM,
    )
    if HAS_MASK:
        keep = tl.load(mask_ptr + ew_at(FLAT, r, c, s_q0, s_q1), mask=inb, other=0) != 0
        new_p = tl.where(keep, new_p, p)
        b1 = tl.where(keep, b1, 0.0)
        b2 = tl.where(keep, b2, 0.0)
    tl.store(p_at, cast_out(new_p, p_ptr.dtype.element_ty, UPCAST), mask=inb)
    if (KIND == 1) or HAS_MOMENTUM:
        tl.store(
            b1_ptr + ew_at(FLAT, r, c, s_b10, s_b11), cast_out(b1, b1_ptr.dtype.element_ty, UPCAST), mask=inb
        )
    if KIND == 1:
        tl.store(
            b2_ptr + ew_at(FLAT, r, c, s_b20, s_b21), cast_out(b2, b2_ptr.dtype.element_ty, UPCAST), mask=inb
        )


def _check_state(name, t, param, needed: bool):
    if t is None:
        if needed:
            raise ValueError(f"{name} must be given for this kind / momentum, got None")
        return
    if t.shape != param.shape:
        raise ValueError(f"{name} must have shape {tuple(param.shape)}, got {tuple(t.shape)}")
    if t.device != param.device:
        raise ValueError(f"{name} must be on {param.device}, got {t.device}")
    check_dtype(name, t)


def _views(tensors):
    """2-D views for the kernel; a tensor without one gets a contiguous copy, written back afterwards."""
    views, copies = [], []
    for t in tensors:
        if t is None or t.dim() <= 2:
            views.append(None if t is None else as_2d(t))
            continue
        try:
            views.append(t.view(t.shape[0], -1))
        except RuntimeError:  # no 2-D view of this layout: work on a copy
            c = t.contiguous().view(t.shape[0], -1)
            copies.append((t, c))
            views.append(c)
    return views, copies


def prepare(
    param,
    grad,
    buf1,
    buf2,
    mask,
    lr,
    step,
    kind,
    momentum,
    dampening,
    nesterov,
    beta1,
    beta2,
    eps,
    weight_decay,
    alpha,
    maximize,
    config=None,
):
    hp = _Hyper(step, kind, momentum, dampening, nesterov, beta1, beta2, eps, weight_decay, alpha, maximize)
    check_device("param", param)
    check_dtype("param", param)
    if grad.shape != param.shape or grad.dtype != param.dtype or grad.device != param.device:
        raise ValueError(
            f"grad must match param (shape {tuple(param.shape)}, {param.dtype}, {param.device}), "
            f"got {tuple(grad.shape)}, {grad.dtype}, {grad.device}"
        )
    need1, need2 = hp.needs()
    _check_state("buf1", buf1, param, need1)
    _check_state("buf2", buf2, param, need2)
    check_mask(mask, param)
    buf1 = buf1 if need1 else None
    buf2 = buf2 if need2 else None
    lr_t = _lr_on(lr, param.device)
    flat = all_contiguous(param, grad, buf1, buf2, mask)
    (p2, g2, b12, b22, q2), copies = _views((param, grad, buf1, buf2, mask))
    rows, cols = p2.shape

    def st(t):
        return (0, 0) if t is None else (t.stride(0), t.stride(1))

    args = dict(
        p_ptr=p2,
        g_ptr=g2,
        b1_ptr=p2 if b12 is None else b12,
        b2_ptr=p2 if b22 is None else b22,
        mask_ptr=p2 if q2 is None else q2,
        lr_ptr=lr_t,
        numel=param.numel(),
        rows=rows,
        cols=cols,
        s_p0=st(p2)[0],
        s_p1=st(p2)[1],
        s_g0=st(g2)[0],
        s_g1=st(g2)[1],
        s_b10=st(b12)[0],
        s_b11=st(b12)[1],
        s_b20=st(b22)[0],
        s_b21=st(b22)[1],
        s_q0=st(q2)[0],
        s_q1=st(q2)[1],
        wd=float(weight_decay),
        two_alpha=2.0 * float(alpha),
        **hp.scalars,
        **hp.flags,
        **hp.runtime,
        HAS_MASK=mask is not None,
        FLAT=flat,
        UPCAST=upcast_flag(),
    )
    launch = Launch(
        _fused_step_kernel,
        elementwise_grid(flat, param.numel(), rows, cols),
        args,
        config or elementwise_config(),
    )
    return launch, copies


def fused_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    buf1: torch.Tensor | None,
    buf2: torch.Tensor | None,
    mask: torch.Tensor | None,
    lr: torch.Tensor,
    step: int,
    kind: str,
    momentum: float,
    dampening: float,
    nesterov: bool,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    alpha: float,
    maximize: bool,
) -> None:
    """One in-place step on ``param``, ``buf1``, ``buf2`` (see reference.fused_step_ref for the math)."""
    launch, copies = prepare(
        param,
        grad,
        buf1,
        buf2,
        mask,
        lr,
        step,
        kind,
        momentum,
        dampening,
        nesterov,
        beta1,
        beta2,
        eps,
        weight_decay,
        alpha,
        maximize,
    )
    if param.numel():
        launch.run()
    for t, v in copies:
        t.copy_(v.reshape(t.shape))


# ---------------------------------------------------------------------------------- multi tensor


@triton.jit(do_not_specialize=["first", "nesterov", "maximize"])
def _fused_step_multi_kernel(
    table_ptr,
    numel_ptr,
    prog_tensor_ptr,
    prog_start_ptr,
    wd_ptr,
    two_alpha_ptr,
    lr_ptr,
    momentum,
    one_minus_damp,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    inv_bc1,
    inv_sqrt_bc2,
    P_DTYPE: tl.constexpr,
    B1_DTYPE: tl.constexpr,
    B2_DTYPE: tl.constexpr,
    first,
    nesterov,
    maximize,
    KIND: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program i steps elements [start, start + BLOCK) of tensor prog_tensor[i].

    table row t: (param, grad, buf1, buf2, mask) addresses; a mask address of 0 means "no mask".
    """
    pid = tl.program_id(0)
    t = tl.load(prog_tensor_ptr + pid).to(tl.int64)
    start = tl.load(prog_start_ptr + pid)
    n = tl.load(numel_ptr + t)
    offs = start + tl.arange(0, BLOCK)
    inb = offs < n
    row = table_ptr + t * 5
    p_base = tl.load(row).to(tl.pointer_type(P_DTYPE))
    g_base = tl.load(row + 1).to(tl.pointer_type(P_DTYPE))
    q_addr = tl.load(row + 4)
    lr = tl.load(lr_ptr).to(tl.float32)
    wd = tl.load(wd_ptr + t)
    two_alpha = tl.load(two_alpha_ptr + t)
    p = tl.load(p_base + offs, mask=inb, other=0.0).to(tl.float32)
    g = tl.load(g_base + offs, mask=inb, other=0.0).to(tl.float32)
    b1 = tl.zeros_like(p)
    b2 = tl.zeros_like(p)
    if (KIND == 1) or HAS_MOMENTUM:
        b1_base = tl.load(row + 2).to(tl.pointer_type(B1_DTYPE))
        b1 = tl.load(b1_base + offs, mask=inb, other=0.0).to(tl.float32)
    if KIND == 1:
        b2_base = tl.load(row + 3).to(tl.pointer_type(B2_DTYPE))
        b2 = tl.load(b2_base + offs, mask=inb, other=0.0).to(tl.float32)
    new_p, b1, b2 = _update(
        p,
        g,
        b1,
        b2,
        lr,
        momentum,
        one_minus_damp,
        beta1,
        one_minus_beta1,
        beta2,
        one_minus_beta2,
        eps,
        wd,
        two_alpha,
        inv_bc1,
        inv_sqrt_bc2,
        first,
        nesterov,
        maximize,
        KIND,
        HAS_MOMENTUM,
    )
    # no mask: address 0, nothing loaded (masked-off lanes are never dereferenced), keep everything
    q_base = q_addr.to(tl.pointer_type(tl.int8))
    keep = tl.load(q_base + offs, mask=inb & (q_addr != 0), other=1) != 0
    new_p = tl.where(keep, new_p, p)
    tl.store(p_base + offs, cast_out(new_p, P_DTYPE, UPCAST), mask=inb)
    if (KIND == 1) or HAS_MOMENTUM:
        tl.store(b1_base + offs, cast_out(tl.where(keep, b1, 0.0), B1_DTYPE, UPCAST), mask=inb)
    if KIND == 1:
        tl.store(b2_base + offs, cast_out(tl.where(keep, b2, 0.0), B2_DTYPE, UPCAST), mask=inb)


_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def multi_block() -> int:
    return 65536 if upcast_flag() else 2048


def _per_tensor(name: str, value, count: int) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * count
    values = [float(v) for v in value]
    if len(values) != count:
        raise ValueError(f"{name} must be one float or one per tensor ({count}), got {len(values)} values")
    return values


def prepare_multi(
    params,
    grads,
    buf1s,
    buf2s,
    masks,
    lr,
    step,
    kind,
    momentum=0.0,
    dampening=0.0,
    nesterov=False,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    alpha=0.0,
    maximize=False,
    block=None,
):
    """The launches (one per dtype group) of a multi-tensor step, plus the tensors they read."""
    hp = _Hyper(step, kind, momentum, dampening, nesterov, beta1, beta2, eps, 0.0, 0.0, maximize)
    count = len(params)
    if len(grads) != count:
        raise ValueError(f"grads must have one tensor per param ({count}), got {len(grads)}")
    need1, need2 = hp.needs()
    lists = {}
    for name, lst, needed in (("buf1s", buf1s, need1), ("buf2s", buf2s, need2), ("masks", masks, False)):
        if lst is None:
            lst = [None] * count
        if len(lst) != count:
            raise ValueError(f"{name} must have one entry per param ({count}), got {len(lst)}")
        lists[name] = list(lst) if (needed or name == "masks") else [None] * count
    wds = _per_tensor("weight_decay", weight_decay, count)
    alphas = _per_tensor("alpha", alpha, count)
    groups: dict[tuple, list[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        check_device(f"params[{i}]", p)
        check_dtype(f"params[{i}]", p)
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            raise ValueError(
                f"grads[{i}] must match params[{i}] (shape {tuple(p.shape)}, {p.dtype}, {p.device})"
            )
        b1, b2, q = lists["buf1s"][i], lists["buf2s"][i], lists["masks"][i]
        _check_state(f"buf1s[{i}]", b1, p, need1)
        _check_state(f"buf2s[{i}]", b2, p, need2)
        check_mask(q, p)
        if not all_contiguous(p, g, b1, b2, q):
            raise ValueError(
                f"params[{i}], its grad, state and mask must be contiguous for fused_step_multi "
                "(call fused_step for a strided tensor)"
            )
        if p.device != params[0].device:
            raise ValueError(f"params[{i}] is on {p.device} but params[0] is on {params[0].device}")
        key = (p.dtype, None if b1 is None else b1.dtype, None if b2 is None else b2.dtype)
        groups.setdefault(key, []).append(i)
    if count == 0:
        return [], []
    device = params[0].device
    lr_t = _lr_on(lr, device)
    block = block or multi_block()
    launches, keep_alive = [], []
    for (pdt, b1dt, b2dt), idx in groups.items():
        idx = [i for i in idx if params[i].numel() > 0]
        if not idx:
            continue

        def addr(t):
            return 0 if t is None else t.data_ptr()

        table = torch.tensor(
            [
                [
                    addr(params[i]),
                    addr(grads[i]),
                    addr(lists["buf1s"][i]),
                    addr(lists["buf2s"][i]),
                    addr(lists["masks"][i]),
                ]
                for i in idx
            ],
            dtype=torch.int64,
        )
        numels = torch.tensor([params[i].numel() for i in idx], dtype=torch.int64)
        blocks = (numels + block - 1) // block
        prog_tensor = torch.repeat_interleave(torch.arange(len(idx), dtype=torch.int32), blocks)
        first_prog = torch.cumsum(blocks, 0) - blocks
        prog_start = (
            torch.arange(int(blocks.sum()), dtype=torch.int64) - torch.repeat_interleave(first_prog, blocks)
        ) * block
        host = [
            table,
            numels,
            prog_tensor,
            prog_start,
            torch.tensor([wds[i] for i in idx], dtype=torch.float32),
            torch.tensor([2.0 * alphas[i] for i in idx], dtype=torch.float32),
        ]
        dev = [t.to(device, non_blocking=True) if device.type == "cuda" else t for t in host]
        table_d, numel_d, pt_d, ps_d, wd_d, a_d = dev
        args = dict(
            table_ptr=table_d,
            numel_ptr=numel_d,
            prog_tensor_ptr=pt_d,
            prog_start_ptr=ps_d,
            wd_ptr=wd_d,
            two_alpha_ptr=a_d,
            lr_ptr=lr_t,
            **{k: v for k, v in hp.scalars.items()},
            P_DTYPE=_TL_DTYPE[pdt],
            B1_DTYPE=_TL_DTYPE[b1dt or pdt],
            B2_DTYPE=_TL_DTYPE[b2dt or pdt],
            **hp.flags,
            **hp.runtime,
            UPCAST=upcast_flag(),
            BLOCK=block,
        )
        launches.append(
            Launch(
                _fused_step_multi_kernel,
                (int(blocks.sum()),),
                args,
                triton.Config({}, num_warps=8 if block >= 2048 else 4, num_stages=1),
            )
        )
        keep_alive.append(host)
    return launches, keep_alive


def fused_step_multi(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    buf1s: Sequence[torch.Tensor | None] | None,
    buf2s: Sequence[torch.Tensor | None] | None,
    masks: Sequence[torch.Tensor | None] | None,
    lr: torch.Tensor,
    step: int,
    kind: str,
    *,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float | Sequence[float] = 0.0,
    alpha: float | Sequence[float] = 0.0,
    maximize: bool = False,
) -> None:
    """fused_step over many tensors, one launch per dtype group (see the module doc)."""
    launches, _host = prepare_multi(
        params,
        grads,
        buf1s,
        buf2s,
        masks,
        lr,
        step,
        kind,
        momentum,
        dampening,
        nesterov,
        beta1,
        beta2,
        eps,
        weight_decay,
        alpha,
        maximize,
    )
    for launch in launches:
        launch.run()


# ------------------------------------------------------------------------- step + Sign-In reset


@triton.jit(do_not_specialize=["first", "nesterov", "maximize", "reset", "state"])
def _fused_step_signin_kernel(
    m_ptr,
    w_ptr,
    gm_ptr,
    gw_ptr,
    mb1_ptr,
    mb2_ptr,
    wb1_ptr,
    wb2_ptr,
    mask_ptr,
    lr_ptr,
    numel,
    half_beta,
    momentum,
    one_minus_damp,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    wd,
    two_alpha,
    inv_bc1,
    inv_sqrt_bc2,
    first,
    nesterov,
    maximize,
    reset,
    state,
    KIND: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Step m and w (same hyper-parameters), then, if ``reset``, re-factor the pair to β; ``state``:
    0 keep, 1 zero, 2 transform (see the module doc)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < numel
    lr = tl.load(lr_ptr).to(tl.float32)
    dtype = w_ptr.dtype.element_ty
    m = tl.load(m_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    gm = tl.load(gm_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    gw = tl.load(gw_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    mb1 = tl.zeros_like(m)
    mb2 = tl.zeros_like(m)
    wb1 = tl.zeros_like(m)
    wb2 = tl.zeros_like(m)
    if (KIND == 1) or HAS_MOMENTUM:
        mb1 = tl.load(mb1_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        wb1 = tl.load(wb1_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    if KIND == 1:
        mb2 = tl.load(mb2_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        wb2 = tl.load(wb2_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    new_m, mb1, mb2 = _update(
        m,
        gm,
        mb1,
        mb2,
        lr,
        momentum,
        one_minus_damp,
        beta1,
        one_minus_beta1,
        beta2,
        one_minus_beta2,
        eps,
        wd,
        two_alpha,
        inv_bc1,
        inv_sqrt_bc2,
        first,
        nesterov,
        maximize,
        KIND,
        HAS_MOMENTUM,
    )
    new_w, wb1, wb2 = _update(
        w,
        gw,
        wb1,
        wb2,
        lr,
        momentum,
        one_minus_damp,
        beta1,
        one_minus_beta1,
        beta2,
        one_minus_beta2,
        eps,
        wd,
        two_alpha,
        inv_bc1,
        inv_sqrt_bc2,
        first,
        nesterov,
        maximize,
        KIND,
        HAS_MOMENTUM,
    )
    if HAS_MASK:
        keep = tl.load(mask_ptr + offs, mask=inb, other=0) != 0
        new_m = tl.where(keep, new_m, m)
        new_w = tl.where(keep, new_w, w)
        mb1 = tl.where(keep, mb1, 0.0)
        mb2 = tl.where(keep, mb2, 0.0)
        wb1 = tl.where(keep, wb1, 0.0)
        wb2 = tl.where(keep, wb2, 0.0)
    # the stepped values as stored (the reset of the reference starts from the stored tensors)
    sm = cast_out(new_m, dtype, UPCAST)
    sw = cast_out(new_w, dtype, UPCAST)
    # reset and state are runtime ints: the extra math is free in a memory-bound kernel
    do_reset = reset != 0
    fm = sm.to(tl.float32)
    fw = sw.to(tl.float32)
    theta = cast_out(fm * fw, dtype, UPCAST).to(tl.float32)
    if HAS_MASK:
        theta = tl.where(keep, theta, 0.0)
    rm, rw = factorize(theta, half_beta)
    rm_s = cast_out(rm, dtype, UPCAST)
    rw_s = cast_out(rw, dtype, UPCAST)
    zero = do_reset & (state == 1)
    mb1 = tl.where(zero, 0.0, mb1)
    wb1 = tl.where(zero, 0.0, wb1)
    mb2 = tl.where(zero, 0.0, mb2)
    wb2 = tl.where(zero, 0.0, wb2)
    # transform: the state in the new coordinates through the θ-gradient it represents (module doc)
    transform = do_reset & (state == 2)
    frm = rm_s.to(tl.float32)
    frw = rw_s.to(tl.float32)
    b1m = cast_out(mb1, mb1_ptr.dtype.element_ty, UPCAST).to(tl.float32)
    b1w = cast_out(wb1, wb1_ptr.dtype.element_ty, UPCAST).to(tl.float32)
    norm = fm * fm + fw * fw
    safe = tl.where(norm > 0, norm, 1.0)
    g_theta = tl.where(norm > 0, tl.div_rn(b1m * fw + b1w * fm, safe), 0.0)
    mb1 = tl.where(transform, g_theta * frw, mb1)
    wb1 = tl.where(transform, g_theta * frm, wb1)
    if KIND == 1:
        b2m = cast_out(mb2, mb2_ptr.dtype.element_ty, UPCAST).to(tl.float32)
        b2w = cast_out(wb2, wb2_ptr.dtype.element_ty, UPCAST).to(tl.float32)
        s_theta = tl.where(norm > 0, tl.div_rn(b2m + b2w, safe), 0.0)
        mb2 = tl.where(transform, s_theta * (frw * frw), mb2)
        wb2 = tl.where(transform, s_theta * (frm * frm), wb2)
    sm = tl.where(do_reset, rm_s, sm)
    sw = tl.where(do_reset, rw_s, sw)
    tl.store(m_ptr + offs, sm, mask=inb)
    tl.store(w_ptr + offs, sw, mask=inb)
    if (KIND == 1) or HAS_MOMENTUM:
        tl.store(mb1_ptr + offs, cast_out(mb1, mb1_ptr.dtype.element_ty, UPCAST), mask=inb)
        tl.store(wb1_ptr + offs, cast_out(wb1, wb1_ptr.dtype.element_ty, UPCAST), mask=inb)
    if KIND == 1:
        tl.store(mb2_ptr + offs, cast_out(mb2, mb2_ptr.dtype.element_ty, UPCAST), mask=inb)
        tl.store(wb2_ptr + offs, cast_out(wb2, wb2_ptr.dtype.element_ty, UPCAST), mask=inb)


def prepare_signin(
    m,
    w,
    g_m,
    g_w,
    m_buf1,
    m_buf2,
    w_buf1,
    w_buf2,
    mask,
    lr,
    step,
    kind,
    momentum=0.0,
    dampening=0.0,
    nesterov=False,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    alpha=0.0,
    maximize=False,
    beta=None,
    state="keep",
    config=None,
):
    hp = _Hyper(step, kind, momentum, dampening, nesterov, beta1, beta2, eps, weight_decay, alpha, maximize)
    if state not in RESET_STATES:
        raise ValueError(f"state must be one of {RESET_STATES}, got {state!r}")
    if beta is not None and not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0 (or None for no reset), got {beta}")
    check_device("w", w)
    check_dtype("w", w)
    for name, t in (("m", m), ("g_m", g_m), ("g_w", g_w)):
        if t is None or t.shape != w.shape or t.dtype != w.dtype or t.device != w.device:
            raise ValueError(f"{name} must match w (shape {tuple(w.shape)}, {w.dtype}, {w.device})")
    need1, need2 = hp.needs()
    for name, t, needed in (
        ("m_buf1", m_buf1, need1),
        ("w_buf1", w_buf1, need1),
        ("m_buf2", m_buf2, need2),
        ("w_buf2", w_buf2, need2),
    ):
        _check_state(name, t, w, needed)
    check_mask(mask, w)
    used = [m, w, g_m, g_w, mask] + ([m_buf1, w_buf1] if need1 else []) + ([m_buf2, w_buf2] if need2 else [])
    if not all_contiguous(*used):
        raise ValueError("m, w, their grads, state and mask must be contiguous for fused_step_signin")
    lr_t = _lr_on(lr, w.device)
    pick = lambda t, ok: t if (ok and t is not None) else w
    args = dict(
        m_ptr=m,
        w_ptr=w,
        gm_ptr=g_m,
        gw_ptr=g_w,
        mb1_ptr=pick(m_buf1, need1),
        mb2_ptr=pick(m_buf2, need2),
        wb1_ptr=pick(w_buf1, need1),
        wb2_ptr=pick(w_buf2, need2),
        mask_ptr=w if mask is None else mask,
        lr_ptr=lr_t,
        numel=w.numel(),
        half_beta=0.5 * float(beta or 0.0),
        wd=float(weight_decay),
        two_alpha=2.0 * float(alpha),
        **hp.scalars,
        **hp.flags,
        **hp.runtime,
        reset=int(beta is not None),
        state=RESET_STATES.index(state),
        HAS_MASK=mask is not None,
        UPCAST=upcast_flag(),
    )
    cfg = config or elementwise_config()
    cfg = triton.Config({"BLOCK": cfg.kwargs["BLOCK"]}, num_warps=cfg.num_warps, num_stages=1)
    grid = lambda meta: (triton.cdiv(w.numel(), meta["BLOCK"]),)
    return Launch(_fused_step_signin_kernel, grid, args, cfg)


def fused_step_signin(
    m: torch.Tensor,
    w: torch.Tensor,
    g_m: torch.Tensor,
    g_w: torch.Tensor,
    m_buf1: torch.Tensor | None,
    m_buf2: torch.Tensor | None,
    w_buf1: torch.Tensor | None,
    w_buf2: torch.Tensor | None,
    mask: torch.Tensor | None,
    lr: torch.Tensor,
    step: int,
    kind: str,
    *,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    alpha: float = 0.0,
    maximize: bool = False,
    beta: float | None = None,
    state: str = "keep",
) -> None:
    """Step a Sign-In pair (m, w) and optionally reset it to β, in one pass, in place (module doc)."""
    launch = prepare_signin(
        m,
        w,
        g_m,
        g_w,
        m_buf1,
        m_buf2,
        w_buf1,
        w_buf2,
        mask,
        lr,
        step,
        kind,
        momentum,
        dampening,
        nesterov,
        beta1,
        beta2,
        eps,
        weight_decay,
        alpha,
        maximize,
        beta,
        state,
    )
    if w.numel():
        launch.run()


# ------------------------------------------------------------------------------------------------ AOT


def aot_launches():
    """(name, Launch, sweep) covering every specialisation a GPU run can launch, on meta tensors.

    Constexprs: the kind (sgd without / with momentum, adamw), the mask, the layout and the dtypes
    (parameter, state); step 1 / Nesterov / maximize / reset / state are runtime values. Each
    (parameter, state) dtype pair gets every kind with and without a mask, the strided layout once, and
    the multi-tensor and Sign-In kernels once per kind. ``sweep`` is False: one config each.
    """
    out = []
    cfg = elementwise_config(gpu=True)
    meta = dict(device="meta")
    kinds = [("sgd", 0.0), ("sgd", 0.9), ("adamw", 0.0)]
    for dtype in SUPPORTED_DTYPES:
        for state_dtype in sorted({dtype, torch.float32}, key=str):
            lr = torch.empty((), dtype=torch.float32, **meta)
            for i, (kind, mom) in enumerate(kinds):
                tag = f"{str(dtype)[6:]}-state{str(state_dtype)[6:]}-{kind}-mom{mom}"
                p = torch.empty((64, 96), dtype=dtype, **meta)
                b1 = torch.empty_like(p, dtype=state_dtype)
                b2 = torch.empty_like(p, dtype=state_dtype)
                for has_mask in (False, True):
                    q = torch.empty_like(p, dtype=torch.bool) if has_mask else None
                    launch, _ = prepare(
                        p,
                        torch.empty_like(p),
                        b1,
                        b2,
                        q,
                        lr,
                        2,
                        kind,
                        mom,
                        0.0,
                        False,
                        0.9,
                        0.999,
                        1e-8,
                        0.01,
                        0.001,
                        False,
                        config=cfg,
                    )
                    out.append((f"fused_step-{tag}-mask{int(has_mask)}", launch, False))
                q = torch.empty_like(p, dtype=torch.bool) if i % 2 else None
                launch = prepare_signin(
                    torch.empty_like(p),
                    p,
                    torch.empty_like(p),
                    torch.empty_like(p),
                    b1,
                    b2,
                    torch.empty_like(b1),
                    torch.empty_like(b2),
                    q,
                    lr,
                    2,
                    kind,
                    mom,
                    0.0,
                    False,
                    beta=1.0,
                    state="transform",
                    config=cfg,
                )
                out.append((f"fused_step_signin-{tag}-mask{int(q is not None)}", launch, False))
                out.append(
                    (
                        f"fused_step_multi-{tag}",
                        _multi_meta(p, b1, b2, lr, False, kind, mom, False, False),
                        False,
                    )
                )
            # the strided (2-D tiled) layout, once per dtype pair
            pt = torch.empty((96, 64), dtype=dtype, **meta).t()
            bt = torch.empty_like(pt, dtype=state_dtype)
            launch, _ = prepare(
                pt,
                torch.empty_like(pt),
                bt,
                torch.empty_like(bt),
                torch.empty_like(pt, dtype=torch.bool),
                lr,
                2,
                "adamw",
                0.0,
                0.0,
                False,
                0.9,
                0.999,
                1e-8,
                0.01,
                0.0,
                False,
                config=cfg,
            )
            out.append(
                (f"fused_step-{str(dtype)[6:]}-state{str(state_dtype)[6:]}-adamw-strided", launch, False)
            )
    return out


def _multi_meta(p, b1, b2, lr, first, kind, mom, nest, maximize):
    """A multi-tensor Launch for the AOT check (the tables are device tensors of fixed dtypes)."""
    hp = _Hyper(1 if first else 2, kind, mom, 0.0, nest, 0.9, 0.999, 1e-8, 0.0, 0.0, maximize)
    i64 = torch.empty(8, dtype=torch.int64, device="meta")
    args = dict(
        table_ptr=i64,
        numel_ptr=i64,
        prog_tensor_ptr=torch.empty(8, dtype=torch.int32, device="meta"),
        prog_start_ptr=i64,
        wd_ptr=torch.empty(8, dtype=torch.float32, device="meta"),
        two_alpha_ptr=torch.empty(8, dtype=torch.float32, device="meta"),
        lr_ptr=lr,
        **hp.scalars,
        P_DTYPE=_TL_DTYPE[p.dtype],
        B1_DTYPE=_TL_DTYPE[b1.dtype],
        B2_DTYPE=_TL_DTYPE[b2.dtype],
        **hp.flags,
        **hp.runtime,
        UPCAST=False,
        BLOCK=2048,
    )
    return Launch(_fused_step_multi_kernel, (1,), args, triton.Config({}, num_warps=8, num_stages=1))
