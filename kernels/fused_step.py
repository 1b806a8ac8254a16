"""fused_step: one optimizer step in one memory pass (SGD-momentum / Nesterov or AdamW, λ, PILoT α, mask).

Per element, in fp32 whatever the storage dtype (reference.fused_step_ref is the spec):

    g  = ±grad (+ 2α·p)                                   maximize, PILoT regulariser
    sgd:   g += λ·p;  buf = g (step 1) | μ·buf + (1−τ)·g;  g = g + μ·buf (Nesterov) | buf;  p -= lr·g
    adamw: p *= 1 − lr·λ;  m1 = lerp(m1, g, 1−β1);  m2 = β2·m2 + (1−β2)·g²
           p -= lr/(1−β1ᵗ) · m1 / (sqrt(m2)/sqrt(1−β2ᵗ) + ε)
    mask:  pruned coordinates keep p, get state exactly 0 (NaN grads there are ignored)

The step reads p, grad, the state and the mask once and writes p and the state once: the optimizer is
memory bound, and torch.optim's for-each path makes several passes with temporaries. ``lr`` is read
from a 0-dim tensor on the device, so a schedule never recompiles anything or syncs the host. Every
kernel steps whole blocks without per-lane bounds checks, so that where addresses and strides allow,
they get 16-byte vector loads and stores whatever the tensor's size; only the last, partial block (tile)
checks each lane.

Extra entry points (used by sparse_engine.optim; each in place, returning None):

``fused_step_multi(params, grads, buf1s, buf2s, masks, lr, step, kind, *, momentum=0.0, dampening=0.0,
nesterov=False, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, alpha=0.0, maximize=False)``
    The same step on many tensors in one launch per (param dtype, state dtype) group: a pointer table
    (one row per tensor: param, grad, buf1, buf2, mask addresses) and a block table (tensor, offset) per
    program. ``params``/``grads``: lists of contiguous tensors; ``buf1s``/``buf2s``: lists (entries
    None where a kind needs none) or None; ``masks``: list with None entries, or None; ``weight_decay``
    and ``alpha``: one float or one per tensor. Use it for the many small tensors of a model (biases,
    norms, small layers) where per-tensor launches dominate. Whole blocks of tensors whose addresses are
    all multiples of 16 bytes (what the allocator gives) use 16-byte vector loads and stores; a tensor at
    another address (a view at an odd storage offset) goes to a launch of its own, without them.

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

from ._common import (SUPPORTED_DTYPES, Launch, all_contiguous, as_2d, cast_out, check_device, check_dtype,
                      check_mask, elementwise_config, elementwise_grid, ew_at, ew_offsets, factorize,
                      strides_2d, upcast_flag)

__all__ = ["SUPPORTED_DTYPES", "fused_step", "fused_step_multi", "fused_step_signin"]

STEP_KINDS = ("sgd", "adamw")
RESET_STATES = ("keep", "zero", "transform")
_KIND_ID = {"sgd": 0, "adamw": 1}


# ------------------------------------------------------------------------- the math, shared by all kernels
#
# The three kernels differ only in where their tensors are (strided views, a pointer table, a Sign-In
# pair) and in what follows the step (the Sign-In reset); loading, the update, the mask and the stores
# are these helpers. The kernels hand the hyper-parameters on as tuples, hyper = (lr, maximize, sgd,
# adam) with sgd = (momentum, 1 − dampening, first, nesterov) and adam = (β1, 1 − β1, β2, 1 − β2, ε,
# 1/(1 − β1ᵗ), 1/sqrt(1 − β2ᵗ)); λ and 2α stay separate because the multi-tensor kernel reads them per
# tensor. first / nesterov / maximize are runtime ints: selects cost nothing in a memory-bound kernel,
# and each constexpr would double the number of compiled variants. The kernels' signatures list their
# parameters by role, a line each (pointers, sizes, hyper-parameters, runtime flags, constexprs).


@triton.jit
def _update(p, g, b1, b2, wd, two_alpha, hyper, KIND: tl.constexpr, HAS_MOMENTUM: tl.constexpr):
    """One step on fp32 values; returns (new p, new buf1, new buf2). Mirrors fused_step_ref's op order."""
    lr, maximize, sgd, adam = hyper
    g = tl.where(maximize != 0, -g, g)
    g = tl.where(two_alpha != 0.0, g + two_alpha * p, g)
    if KIND == 0:
        momentum, one_minus_damp, first, nesterov = sgd
        g = tl.where(wd != 0.0, g + wd * p, g)
        if HAS_MOMENTUM:
            # step 1: buf = g (the old buffer, possibly uninitialised, is ignored)
            b1 = tl.where(first != 0, g, b1 * momentum + one_minus_damp * g)
            g = tl.where(nesterov != 0, g + momentum * b1, b1)
        new_p = p - lr * g
    else:
        beta1, one_minus_beta1, beta2, one_minus_beta2, eps, inv_bc1, inv_sqrt_bc2 = adam
        decayed = p * (1.0 - lr * wd)
        # torch.lerp(start, end, wt): start + wt·(end − start) for wt < 0.5, else end − (end − start)·(1 − wt)
        diff = g - b1
        b1 = tl.where(one_minus_beta1 < 0.5, b1 + one_minus_beta1 * diff, g - diff * beta1)
        b2 = b2 * beta2 + one_minus_beta2 * g * g
        denom = tl.sqrt_rn(b2) * inv_sqrt_bc2 + eps
        new_p = decayed - (lr * inv_bc1) * tl.div_rn(b1, denom)
    return new_p, b1, b2


@triton.jit
def _load(at, lanes):
    """fp32 whatever the storage dtype: all the math runs in fp32.

    ``lanes``: which lanes are in bounds, or None for a block known to be whole (no per-lane predicate,
    so the compiler may use vector loads where it knows the alignment). Every kernel branches on
    whether its block is whole: the bounds of a masked access are per lane unless the size is a
    multiple of 16 (Triton's specialisation of integer arguments), and scalar accesses follow.
    """
    if lanes is None:
        x = tl.load(at)
    else:
        x = tl.load(at, mask=lanes, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _store(at, x, lanes, UPCAST: tl.constexpr):
    """fp32 ``x`` rounded once (to nearest even) to the dtype ``at`` points to; ``lanes`` as in _load."""
    _put(at, cast_out(x, at.dtype.element_ty, UPCAST), lanes)


@triton.jit
def _put(at, x, lanes):
    """Store ``x``, already in the dtype ``at`` points to; ``lanes`` as in _load."""
    if lanes is None:
        tl.store(at, x)
    else:
        tl.store(at, x, mask=lanes)


@triton.jit
def _get_mask(at, lanes):
    """The mask's keep flags (bool); ``lanes`` as in _load."""
    if lanes is None:
        q = tl.load(at)
    else:
        q = tl.load(at, mask=lanes, other=0)
    return q != 0


@triton.jit
def _load_and_step(
    p_at, g_at, b1_at, b2_at, lanes, wd, two_alpha, hyper, KIND: tl.constexpr, HAS_MOMENTUM: tl.constexpr
):
    """Step one tensor's elements at the pointers ``*_at``: returns fp32 (p, new p, new buf1, new buf2).

    A buffer the kind does not use is neither read nor written (its pointer is a placeholder) and is 0.
    """
    p = _load(p_at, lanes)
    b1 = tl.zeros_like(p)
    b2 = tl.zeros_like(p)
    if (KIND == 1) or HAS_MOMENTUM:
        b1 = _load(b1_at, lanes)
    if KIND == 1:
        b2 = _load(b2_at, lanes)
    new_p, b1, b2 = _update(p, _load(g_at, lanes), b1, b2, wd, two_alpha, hyper, KIND, HAS_MOMENTUM)
    return p, new_p, b1, b2


@triton.jit
def _apply_mask(keep, new_p, p, b1, b2):
    """The mask contract: pruned coordinates keep p and get exactly zero state, whatever the update
    computed there (a NaN gradient included)."""
    return tl.where(keep, new_p, p), tl.where(keep, b1, 0.0), tl.where(keep, b2, 0.0)


@triton.jit
def _store_state(
    b1_at, b2_at, b1, b2, lanes, UPCAST: tl.constexpr, KIND: tl.constexpr, HAS_MOMENTUM: tl.constexpr
):
    if (KIND == 1) or HAS_MOMENTUM:
        _store(b1_at, b1, lanes, UPCAST)
    if KIND == 1:
        _store(b2_at, b2, lanes, UPCAST)


class _Hyper:
    """Host-side scalars of one step, validated once (errors name the argument)."""

    def __init__(
        self, step, kind, momentum, dampening, nesterov, beta1, beta2, eps, weight_decay, alpha, maximize
    ):
        if kind not in STEP_KINDS:
            raise ValueError(f"kind must be one of {STEP_KINDS}, got {kind!r}")
        if not isinstance(step, int) or step < 1:
            raise ValueError(f"step must be an int >= 1 (1-based count of this step), got {step!r}")
        finite = {"momentum": momentum, "dampening": dampening, "beta1": beta1, "beta2": beta2, "eps": eps}
        for name, v in finite.items():
            if not math.isfinite(float(v)):
                raise ValueError(f"{name} must be finite, got {v}")
        if nesterov and kind == "sgd" and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov requires momentum > 0 and dampening == 0")
        self.kind = kind
        self.has_momentum = kind == "sgd" and momentum != 0.0
        #: one float, or (fused_step_multi) one per tensor
        self.weight_decay = weight_decay
        self.alpha = alpha
        adamw = kind == "adamw"
        # Python doubles rounded once to fp32 by the launch, as torch does with scalar operands
        self.kernel_args = {
            "momentum": float(momentum),
            "one_minus_damp": 1.0 - float(dampening),
            "beta1": float(beta1),
            "one_minus_beta1": 1.0 - float(beta1),
            "beta2": float(beta2),
            "one_minus_beta2": 1.0 - float(beta2),
            "eps": float(eps),
            "inv_bc1": 1.0 / (1.0 - float(beta1) ** step) if adamw else 1.0,
            "inv_sqrt_bc2": 1.0 / math.sqrt(1.0 - float(beta2) ** step) if adamw else 1.0,
            "first": int(step == 1),
            "nesterov": int(bool(nesterov)),
            "maximize": int(bool(maximize)),
            "KIND": _KIND_ID[kind],
            "HAS_MOMENTUM": self.has_momentum,
            "UPCAST": upcast_flag(),
        }

    def needs(self) -> tuple[bool, bool]:
        """(buf1 needed, buf2 needed)."""
        return (self.has_momentum or self.kind == "adamw"), self.kind == "adamw"

    def check(self, ref_name, ref, like, states, mask):
        """Check the tensors of one step against ``ref`` (the parameter); errors name the argument.

        ``like``: (name, tensor) pairs that must match ``ref`` in shape, dtype and device (the grads, the
        other factor of a pair); ``states``: (name, tensor, slot), slot 0 for a buf1, 1 for a buf2, which
        must be given where the kind uses that slot. Returns the states the kind uses, None for the others.
        """
        check_device(ref_name, ref)
        check_dtype(ref_name, ref)
        want = f"shape {tuple(ref.shape)}, {ref.dtype}, {ref.device}"
        for name, t in like:
            if t is None or t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
                got = None if t is None else f"{tuple(t.shape)}, {t.dtype}, {t.device}"
                raise ValueError(f"{name} must match {ref_name} ({want}), got {got}")
        needs = self.needs()
        used = []
        for name, t, slot in states:
            if t is None:
                if needs[slot]:
                    raise ValueError(f"{name} must be given for this kind / momentum, got None")
            elif t.shape != ref.shape:
                raise ValueError(f"{name} must have shape {tuple(ref.shape)}, got {tuple(t.shape)}")
            elif t.device != ref.device:
                raise ValueError(f"{name} must be on {ref.device}, got {t.device}")
            else:
                check_dtype(name, t)
            used.append(t if needs[slot] else None)
        check_mask(mask, ref)
        return used


def _lr_on(lr: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not isinstance(lr, torch.Tensor) or lr.dim() != 0 or not lr.is_floating_point():
        raise ValueError(f"lr must be a 0-dim floating-point tensor, got {lr!r}")
    return lr if lr.device == device else lr.to(device)


def _or(t, placeholder):
    """``t``, or a pointer the kernel never dereferences (for an operand that is absent)."""
    return placeholder if t is None else t


# --------------------------------------------------------------------------------- single tensor


@triton.jit
def _whole_tile(
    FLAT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, numel, rows, cols
):
    """Whether this program's tile (ew_offsets) lies inside the tensor: no lane needs a bounds check."""
    if FLAT:
        whole = (tl.program_id(0).to(tl.int64) + 1) * BLOCK <= numel
    else:
        whole = ((tl.program_id(0).to(tl.int64) + 1) * BLOCK_R <= rows) & (
            (tl.program_id(1).to(tl.int64) + 1) * BLOCK_C <= cols
        )
    return whole


@triton.jit
def _single_block(
    at, lanes, wd, two_alpha, hyper,
    KIND: tl.constexpr, HAS_MOMENTUM: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One tile of the single-tensor step: ``at`` its (param, grad, buf1, buf2, mask) pointers,
    ``lanes`` as in _load."""
    p_at, g_at, b1_at, b2_at, q_at = at
    p, new_p, b1, b2 = _load_and_step(
        p_at, g_at, b1_at, b2_at, lanes, wd, two_alpha, hyper, KIND, HAS_MOMENTUM
    )
    if HAS_MASK:
        new_p, b1, b2 = _apply_mask(_get_mask(q_at, lanes), new_p, p, b1, b2)
    _store(p_at, new_p, lanes, UPCAST)
    _store_state(b1_at, b2_at, b1, b2, lanes, UPCAST, KIND, HAS_MOMENTUM)


@triton.jit(do_not_specialize=["first", "nesterov", "maximize"])
def _fused_step_kernel(
    p_ptr, g_ptr, b1_ptr, b2_ptr, mask_ptr, lr_ptr,
    numel, rows, cols, s_p0, s_p1, s_g0, s_g1, s_b10, s_b11, s_b20, s_b21, s_q0, s_q1,
    wd, two_alpha,
    momentum, one_minus_damp, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, inv_bc1, inv_sqrt_bc2,
    first, nesterov, maximize,
    KIND: tl.constexpr, HAS_MOMENTUM: tl.constexpr, HAS_MASK: tl.constexpr, FLAT: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    sgd = (momentum, one_minus_damp, first, nesterov)
    adam = (beta1, one_minus_beta1, beta2, one_minus_beta2, eps, inv_bc1, inv_sqrt_bc2)
    hyper = (tl.load(lr_ptr).to(tl.float32), maximize, sgd, adam)
    r, c, inb = ew_offsets(FLAT, BLOCK, BLOCK_R, BLOCK_C, numel, rows, cols)
    at = (
        p_ptr + ew_at(FLAT, r, c, s_p0, s_p1),
        g_ptr + ew_at(FLAT, r, c, s_g0, s_g1),
        b1_ptr + ew_at(FLAT, r, c, s_b10, s_b11),
        b2_ptr + ew_at(FLAT, r, c, s_b20, s_b21),
        mask_ptr + ew_at(FLAT, r, c, s_q0, s_q1),
    )
    # whole tiles without per-lane bounds (vector accesses whatever numel is); the last, partial tile of
    # each dimension keeps them
    if _whole_tile(FLAT, BLOCK, BLOCK_R, BLOCK_C, numel, rows, cols):
        _single_block(at, None, wd, two_alpha, hyper, KIND, HAS_MOMENTUM, HAS_MASK, UPCAST)
    else:
        _single_block(at, inb, wd, two_alpha, hyper, KIND, HAS_MOMENTUM, HAS_MASK, UPCAST)


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


def prepare(param, grad, buf1, buf2, mask, lr, hp: _Hyper, config=None):
    """The Launch of a single-tensor step, plus the (tensor, copy) pairs to write back after it runs."""
    buf1, buf2 = hp.check("param", param, [("grad", grad)], [("buf1", buf1, 0), ("buf2", buf2, 1)], mask)
    lr_t = _lr_on(lr, param.device)
    flat = all_contiguous(param, grad, buf1, buf2, mask)
    (p2, g2, b12, b22, q2), copies = _views((param, grad, buf1, buf2, mask))
    rows, cols = p2.shape
    strides = {}
    for name, t in (("p", p2), ("g", g2), ("b1", b12), ("b2", b22), ("q", q2)):
        strides[f"s_{name}0"], strides[f"s_{name}1"] = strides_2d(t)
    args = dict(
        p_ptr=p2, g_ptr=g2, b1_ptr=_or(b12, p2), b2_ptr=_or(b22, p2), mask_ptr=_or(q2, p2), lr_ptr=lr_t,
        numel=param.numel(), rows=rows, cols=cols, **strides, wd=float(hp.weight_decay),
        two_alpha=2.0 * float(hp.alpha), **hp.kernel_args, HAS_MASK=mask is not None, FLAT=flat,
    )
    grid = elementwise_grid(flat, param.numel(), rows, cols)
    return Launch(_fused_step_kernel, grid, args, config or elementwise_config()), copies


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
    hp = _Hyper(step, kind, momentum, dampening, nesterov, beta1, beta2, eps, weight_decay, alpha, maximize)
    launch, copies = prepare(param, grad, buf1, buf2, mask, lr, hp)
    if param.numel():
        launch.run()
    for t, v in copies:
        t.copy_(v.reshape(t.shape))


# ---------------------------------------------------------------------------------- multi tensor


@triton.jit
def _as_ptr(addr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """An address read from the pointer table as a pointer to DTYPE.

    ALIGNED: the launcher checked that every address of this launch is a multiple of 16 bytes, which the
    compiler cannot know about a value read from memory; with it (and whole blocks), loads and stores
    become 16-byte vectors, as they do in the single-tensor kernel whose pointers are arguments.
    """
    ptr = addr.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _multi_block(
    at, has_mask, lanes, wd, two_alpha, hyper,
    UPCAST: tl.constexpr, KIND: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
):  # fmt: skip
    """One block of one tensor of the multi-tensor step: ``at`` its (param, grad, buf1, buf2, mask)
    pointers, ``lanes`` as in _load."""
    p_at, g_at, b1_at, b2_at, q_at = at
    p, new_p, b1, b2 = _load_and_step(
        p_at, g_at, b1_at, b2_at, lanes, wd, two_alpha, hyper, KIND, HAS_MOMENTUM
    )
    # no mask (address 0): the load is off in every lane and every coordinate is kept
    on = has_mask if lanes is None else lanes & has_mask
    keep = tl.load(q_at, mask=on, other=1) != 0
    new_p, b1, b2 = _apply_mask(keep, new_p, p, b1, b2)
    _store(p_at, new_p, lanes, UPCAST)
    _store_state(b1_at, b2_at, b1, b2, lanes, UPCAST, KIND, HAS_MOMENTUM)


@triton.jit(do_not_specialize=["first", "nesterov", "maximize"])
def _fused_step_multi_kernel(
    table_ptr, numel_ptr, prog_tensor_ptr, prog_start_ptr, wd_ptr, two_alpha_ptr, lr_ptr,
    momentum, one_minus_damp, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, inv_bc1, inv_sqrt_bc2,
    first, nesterov, maximize,
    P_DTYPE: tl.constexpr, B1_DTYPE: tl.constexpr, B2_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
    KIND: tl.constexpr, HAS_MOMENTUM: tl.constexpr, UPCAST: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Program i steps elements [start, start + BLOCK) of tensor prog_tensor[i].

    table row t: (param, grad, buf1, buf2, mask) addresses; a mask address of 0 means "no mask", a
    buffer address of 0 one the kind does not use (never dereferenced, see _load_and_step).
    """
    sgd = (momentum, one_minus_damp, first, nesterov)
    adam = (beta1, one_minus_beta1, beta2, one_minus_beta2, eps, inv_bc1, inv_sqrt_bc2)
    hyper = (tl.load(lr_ptr).to(tl.float32), maximize, sgd, adam)
    pid = tl.program_id(0)
    t = tl.load(prog_tensor_ptr + pid).to(tl.int64)
    # prepare_multi makes every start a multiple of BLOCK: the hint keeps vectors aligned
    start = tl.multiple_of(tl.load(prog_start_ptr + pid), BLOCK)
    offs = start + tl.arange(0, BLOCK)
    n = tl.load(numel_ptr + t)
    row = table_ptr + t * 5
    p_at = _as_ptr(tl.load(row), P_DTYPE, ALIGNED) + offs
    g_at = _as_ptr(tl.load(row + 1), P_DTYPE, ALIGNED) + offs
    b1_at = _as_ptr(tl.load(row + 2), B1_DTYPE, ALIGNED) + offs
    b2_at = _as_ptr(tl.load(row + 3), B2_DTYPE, ALIGNED) + offs
    q_addr = tl.load(row + 4)
    at = (p_at, g_at, b1_at, b2_at, _as_ptr(q_addr, tl.int8, ALIGNED) + offs)
    wd = tl.load(wd_ptr + t)
    two_alpha = tl.load(two_alpha_ptr + t)
    # n is read from memory, so the compiler cannot tell whole blocks from the last, partial one of a
    # tensor: branch, so that whole blocks run without per-lane bounds (vectorisable)
    if start + BLOCK <= n:
        _multi_block(at, q_addr != 0, None, wd, two_alpha, hyper, UPCAST, KIND, HAS_MOMENTUM)
    else:
        _multi_block(at, q_addr != 0, offs < n, wd, two_alpha, hyper, UPCAST, KIND, HAS_MOMENTUM)


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


def _addr(t) -> int:
    return 0 if t is None else t.data_ptr()


def prepare_multi(params, grads, buf1s, buf2s, masks, lr, hp: _Hyper, block=None):
    """The launches (one per group of dtypes and alignment) of a multi-tensor step, plus the host tables
    they read."""
    count = len(params)
    if len(grads) != count:
        raise ValueError(f"grads must have one tensor per param ({count}), got {len(grads)}")
    need1, need2 = hp.needs()
    lists = {}
    for name, lst, needed in (("buf1s", buf1s, need1), ("buf2s", buf2s, need2), ("masks", masks, True)):
        lst = [None] * count if lst is None else lst
        if len(lst) != count:
            raise ValueError(f"{name} must have one entry per param ({count}), got {len(lst)}")
        # state a kind does not use is not looked at (fused_step_multi's doc allows None lists for it)
        lists[name] = list(lst) if needed else [None] * count
    wds = _per_tensor("weight_decay", hp.weight_decay, count)
    alphas = _per_tensor("alpha", hp.alpha, count)
    groups: dict[tuple, list[int]] = {}
    operands = list(zip(params, grads, lists["buf1s"], lists["buf2s"], lists["masks"]))
    for i, (p, g, b1, b2, q) in enumerate(operands):
        hp.check(f"params[{i}]", p, [(f"grads[{i}]", g)], [(f"buf1s[{i}]", b1, 0), (f"buf2s[{i}]", b2, 1)], q)
        if not all_contiguous(p, g, b1, b2, q):
            raise ValueError(
                f"params[{i}], its grad, state and mask must be contiguous for fused_step_multi "
                "(call fused_step for a strided tensor)"
            )
        if p.device != params[0].device:
            raise ValueError(f"params[{i}] is on {p.device} but params[0] is on {params[0].device}")
        if p.numel():
            # a tensor at an address that is no multiple of 16 (a view at an odd storage offset) goes to
            # a launch of its own without the alignment hint, so the others keep their vector loads
            aligned = all(_addr(t) % 16 == 0 for t in (p, g, b1, b2, q))
            groups.setdefault((p.dtype, _or(b1, p).dtype, _or(b2, p).dtype, aligned), []).append(i)
    if count == 0:
        return [], []
    device = params[0].device
    lr_t = _lr_on(lr, device)
    block = block or multi_block()
    launches, keep_alive = [], []
    for (pdt, b1dt, b2dt, aligned), idx in groups.items():
        table = torch.tensor([[_addr(t) for t in operands[i]] for i in idx], dtype=torch.int64)
        numels = torch.tensor([params[i].numel() for i in idx], dtype=torch.int64)
        blocks = (numels + block - 1) // block
        prog_tensor = torch.repeat_interleave(torch.arange(len(idx), dtype=torch.int32), blocks)
        first_prog = torch.cumsum(blocks, 0) - blocks
        prog_start = (
            torch.arange(int(blocks.sum()), dtype=torch.int64) - torch.repeat_interleave(first_prog, blocks)
        ) * block
        wd = torch.tensor([wds[i] for i in idx], dtype=torch.float32)
        two_alpha = torch.tensor([2.0 * alphas[i] for i in idx], dtype=torch.float32)
        host = [table, numels, prog_tensor, prog_start, wd, two_alpha]
        dev = [t.to(device, non_blocking=True) if device.type == "cuda" else t for t in host]
        names = ("table_ptr", "numel_ptr", "prog_tensor_ptr", "prog_start_ptr", "wd_ptr", "two_alpha_ptr")
        args = dict(
            zip(names, dev), lr_ptr=lr_t, **hp.kernel_args, P_DTYPE=_TL_DTYPE[pdt], B1_DTYPE=_TL_DTYPE[b1dt],
            B2_DTYPE=_TL_DTYPE[b2dt], ALIGNED=aligned, BLOCK=block,
        )
        cfg = triton.Config({}, num_warps=8 if block >= 2048 else 4, num_stages=1)
        launches.append(Launch(_fused_step_multi_kernel, (int(blocks.sum()),), args, cfg))
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
    hp = _Hyper(step, kind, momentum, dampening, nesterov, beta1, beta2, eps, weight_decay, alpha, maximize)
    launches, _host = prepare_multi(params, grads, buf1s, buf2s, masks, lr, hp)
    for launch in launches:
        launch.run()


# ------------------------------------------------------------------------- step + Sign-In reset


@triton.jit
def _signin_block(
    at, lanes, scalars,
    KIND: tl.constexpr, HAS_MOMENTUM: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One block of the Sign-In pair step (+ reset): ``at`` the base pointers (m, w, g_m, g_w, m_buf1,
    m_buf2, w_buf1, w_buf2, mask) and the block's offsets, ``lanes`` as in _load, ``scalars`` (β/2, λ, 2α,
    hyper, reset, state).

    The kernel hands on base pointers, not the nine pointer blocks: built here, next to their loads
    and stores, the compiler keeps fewer of them live (with them built in the kernel, two sm_90 launches
    of the plan spilled 4 bytes at 128 registers).
    """
    m_ptr, w_ptr, gm_ptr, gw_ptr, mb1_ptr, mb2_ptr, wb1_ptr, wb2_ptr, q_ptr, offs = at
    m_at, w_at, gm_at, gw_at = m_ptr + offs, w_ptr + offs, gm_ptr + offs, gw_ptr + offs
    mb1_at, mb2_at, wb1_at, wb2_at = mb1_ptr + offs, mb2_ptr + offs, wb1_ptr + offs, wb2_ptr + offs
    q_at = q_ptr + offs
    half_beta, wd, two_alpha, hyper, reset, state = scalars
    dtype = w_at.dtype.element_ty
    m, new_m, mb1, mb2 = _load_and_step(
        m_at, gm_at, mb1_at, mb2_at, lanes, wd, two_alpha, hyper, KIND, HAS_MOMENTUM
    )
    w, new_w, wb1, wb2 = _load_and_step(
        w_at, gw_at, wb1_at, wb2_at, lanes, wd, two_alpha, hyper, KIND, HAS_MOMENTUM
    )
    if HAS_MASK:
        keep = _get_mask(q_at, lanes)
        new_m, mb1, mb2 = _apply_mask(keep, new_m, m, mb1, mb2)
        new_w, wb1, wb2 = _apply_mask(keep, new_w, w, wb1, wb2)
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
    # transform: the state in the new coordinates through the θ-gradient it represents (module doc),
    # computed from the state as stored
    transform = do_reset & (state == 2)
    frm = rm_s.to(tl.float32)
    frw = rw_s.to(tl.float32)
    b1m = cast_out(mb1, mb1_at.dtype.element_ty, UPCAST).to(tl.float32)
    b1w = cast_out(wb1, wb1_at.dtype.element_ty, UPCAST).to(tl.float32)
    norm = fm * fm + fw * fw
    safe = tl.where(norm > 0, norm, 1.0)
    g_theta = tl.where(norm > 0, tl.div_rn(b1m * fw + b1w * fm, safe), 0.0)
    mb1 = tl.where(transform, g_theta * frw, mb1)
    wb1 = tl.where(transform, g_theta * frm, wb1)
    if KIND == 1:
        b2m = cast_out(mb2, mb2_at.dtype.element_ty, UPCAST).to(tl.float32)
        b2w = cast_out(wb2, wb2_at.dtype.element_ty, UPCAST).to(tl.float32)
        s_theta = tl.where(norm > 0, tl.div_rn(b2m + b2w, safe), 0.0)
        mb2 = tl.where(transform, s_theta * (frw * frw), mb2)
        wb2 = tl.where(transform, s_theta * (frm * frm), wb2)
    _put(m_at, tl.where(do_reset, rm_s, sm), lanes)
    _put(w_at, tl.where(do_reset, rw_s, sw), lanes)
    _store_state(mb1_at, mb2_at, mb1, mb2, lanes, UPCAST, KIND, HAS_MOMENTUM)
    _store_state(wb1_at, wb2_at, wb1, wb2, lanes, UPCAST, KIND, HAS_MOMENTUM)


@triton.jit(do_not_specialize=["first", "nesterov", "maximize", "reset", "state"])
def _fused_step_signin_kernel(
    m_ptr, w_ptr, gm_ptr, gw_ptr, mb1_ptr, mb2_ptr, wb1_ptr, wb2_ptr, mask_ptr, lr_ptr,
    numel, half_beta, wd, two_alpha,
    momentum, one_minus_damp, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, inv_bc1, inv_sqrt_bc2,
    first, nesterov, maximize, reset, state,
    KIND: tl.constexpr, HAS_MOMENTUM: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Step m and w (same hyper-parameters), then, if ``reset``, re-factor the pair to β; ``state``:
    0 keep, 1 zero, 2 transform (see the module doc)."""
    sgd = (momentum, one_minus_damp, first, nesterov)
    adam = (beta1, one_minus_beta1, beta2, one_minus_beta2, eps, inv_bc1, inv_sqrt_bc2)
    hyper = (tl.load(lr_ptr).to(tl.float32), maximize, sgd, adam)
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    at = (m_ptr, w_ptr, gm_ptr, gw_ptr, mb1_ptr, mb2_ptr, wb1_ptr, wb2_ptr, mask_ptr, offs)
    # whole blocks without per-lane bounds (vector accesses whatever numel is), as in _fused_step_kernel
    scalars = (half_beta, wd, two_alpha, hyper, reset, state)
    if start + BLOCK <= numel:
        _signin_block(at, None, scalars, KIND, HAS_MOMENTUM, HAS_MASK, UPCAST)
    else:
        _signin_block(at, offs < numel, scalars, KIND, HAS_MOMENTUM, HAS_MASK, UPCAST)


def prepare_signin(
    m, w, g_m, g_w, m_buf1, m_buf2, w_buf1, w_buf2, mask, lr, hp: _Hyper, beta=None, state="keep", config=None
):
    """The Launch of a Sign-In pair step (+ reset)."""
    if state not in RESET_STATES:
        raise ValueError(f"state must be one of {RESET_STATES}, got {state!r}")
    if beta is not None and not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0 (or None for no reset), got {beta}")
    like = [("m", m), ("g_m", g_m), ("g_w", g_w)]
    states = [("m_buf1", m_buf1, 0), ("w_buf1", w_buf1, 0), ("m_buf2", m_buf2, 1), ("w_buf2", w_buf2, 1)]
    mb1, wb1, mb2, wb2 = hp.check("w", w, like, states, mask)
    if not all_contiguous(m, w, g_m, g_w, mask, mb1, wb1, mb2, wb2):
        raise ValueError("m, w, their grads, state and mask must be contiguous for fused_step_signin")
    args = dict(
        m_ptr=m, w_ptr=w, gm_ptr=g_m, gw_ptr=g_w, mb1_ptr=_or(mb1, w), mb2_ptr=_or(mb2, w),
        wb1_ptr=_or(wb1, w), wb2_ptr=_or(wb2, w), mask_ptr=_or(mask, w), lr_ptr=_lr_on(lr, w.device),
        numel=w.numel(), half_beta=0.5 * float(beta or 0.0), wd=float(hp.weight_decay),
        two_alpha=2.0 * float(hp.alpha), **hp.kernel_args, reset=int(beta is not None),
        state=RESET_STATES.index(state), HAS_MASK=mask is not None,
    )
    # the flat layout only: the config's 2-D tile sizes are no parameters of this kernel
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
    hp = _Hyper(step, kind, momentum, dampening, nesterov, beta1, beta2, eps, weight_decay, alpha, maximize)
    launch = prepare_signin(m, w, g_m, g_w, m_buf1, m_buf2, w_buf1, w_buf2, mask, lr, hp, beta, state)
    if w.numel():
        launch.run()


# ------------------------------------------------------------------------------------------------ AOT


#: a shape whose numel (903) is no multiple of 16, for the AOT plan
ODD_SHAPE = (7, 129)


def aot_launches():
    """(name, Launch, sweep) covering every specialisation a GPU run can launch, on meta tensors.

    Constexprs: the kind (sgd without / with momentum, adamw), the mask, the layout and the dtypes
    (parameter, state); step 1 / Nesterov / maximize / reset / state are runtime values. Each
    (parameter, state) dtype pair gets every kind with and without a mask, the strided layout once, the
    multi-tensor and Sign-In kernels once per kind, and the multi-tensor kernel without its alignment
    hint (ALIGNED, tensors at addresses that are no multiple of 16) once. Sizes that are no multiple of
    16 are specialised apart from the others (Triton's divisibility hint on integer arguments), so the
    single-tensor kernel (sgd with momentum, adamw), its strided layout (an odd number of columns) and
    the Sign-In kernel (adamw) also appear at such sizes (names ending in ``-odd``). ``sweep`` is False:
    one config each. The launches are prepared by the launchers themselves, so the plan is what a GPU run
    launches.
    """
    out = []
    cfg = elementwise_config(gpu=True)
    lr = torch.empty((), dtype=torch.float32, device="meta")
    kinds = [("sgd", 0.0), ("sgd", 0.9), ("adamw", 0.0)]
    for dtype in SUPPORTED_DTYPES:
        for state_dtype in sorted({dtype, torch.float32}, key=str):
            dtypes = f"{str(dtype)[6:]}-state{str(state_dtype)[6:]}"
            p = torch.empty((64, 96), dtype=dtype, device="meta")
            b1, b2 = torch.empty_like(p, dtype=state_dtype), torch.empty_like(p, dtype=state_dtype)
            q = torch.empty_like(p, dtype=torch.bool)
            for i, (kind, mom) in enumerate(kinds):
                tag = f"{dtypes}-{kind}-mom{mom}"
                hp = _Hyper(2, kind, mom, 0.0, False, 0.9, 0.999, 1e-8, 0.01, 0.001, False)
                for mask in (None, q):
                    launch, _ = prepare(p, torch.empty_like(p), b1, b2, mask, lr, hp, cfg)
                    out.append((f"fused_step-{tag}-mask{int(mask is not None)}", launch, False))
                mask = q if i % 2 else None
                m, g, mb1, mb2 = (torch.empty_like(t) for t in (p, p, b1, b2))
                launch = prepare_signin(m, p, g, g, mb1, mb2, b1, b2, mask, lr, hp, 1.0, "transform", cfg)
                out.append((f"fused_step_signin-{tag}-mask{int(mask is not None)}", launch, False))
                launches, _ = prepare_multi([p], [g], [b1], [b2], None, lr, hp)
                out.append((f"fused_step_multi-{tag}", launches[0], False))
                if mom or kind == "adamw":
                    # numel no multiple of 16: no divisibility hint on numel (the masked path is
                    # scalar, only whole blocks have vector accesses)
                    po = torch.empty(ODD_SHAPE, dtype=dtype, device="meta")
                    b1o, b2o = (torch.empty_like(po, dtype=state_dtype) for _ in range(2))
                    qo = torch.empty_like(po, dtype=torch.bool) if kind == "adamw" else None
                    launch, _ = prepare(po, torch.empty_like(po), b1o, b2o, qo, lr, hp, cfg)
                    out.append((f"fused_step-{tag}-mask{int(qo is not None)}-odd", launch, False))
                    if kind == "adamw":
                        mo, go, mb1o, mb2o = (torch.empty_like(t) for t in (po, po, b1o, b2o))
                        launch = prepare_signin(
                            mo, po, go, go, mb1o, mb2o, b1o, b2o, qo, lr, hp, 1.0, "transform", cfg
                        )
                        out.append((f"fused_step_signin-{tag}-mask1-odd", launch, False))
            # the strided (2-D tiled) layout, once per dtype pair
            pt = torch.empty((96, 64), dtype=dtype, device="meta").t()
            bt = torch.empty_like(pt, dtype=state_dtype)
            hp = _Hyper(2, "adamw", 0.0, 0.0, False, 0.9, 0.999, 1e-8, 0.01, 0.0, False)
            qt = torch.empty_like(pt, dtype=torch.bool)
            launch, _ = prepare(pt, torch.empty_like(pt), bt, torch.empty_like(bt), qt, lr, hp, cfg)
            out.append((f"fused_step-{dtypes}-adamw-strided", launch, False))
            # rows of a wider tensor, an odd number of columns: tiles whole in both dimensions use vector
            # accesses, the others are masked per lane
            ps = torch.empty((32, 160), dtype=dtype, device="meta")[:, : ODD_SHAPE[1]]
            bs = torch.empty((32, 160), dtype=state_dtype, device="meta")[:, : ODD_SHAPE[1]]
            qs = torch.empty((32, 160), dtype=torch.bool, device="meta")[:, : ODD_SHAPE[1]]
            launch, _ = prepare(ps, ps, bs, bs, qs, lr, hp, cfg)
            out.append((f"fused_step-{dtypes}-adamw-strided-odd", launch, False))
            # a tensor at an address that is no multiple of 16: the multi-tensor kernel without ALIGNED
            pu, bu = (
                torch.empty(p.numel() + 1, dtype=t.dtype, device="meta")[1:].view(p.shape) for t in (p, b1)
            )
            launches, _ = prepare_multi([pu], [pu], [bu], [bu], None, lr, hp)
            out.append((f"fused_step_multi-{dtypes}-adamw-unaligned", launches[0], False))
    return out
