"""Pure-PyTorch references of every op: the executable specification.

Every kernel (Triton, C++, CUDA) is tested against the function here with the same name and the suffix
`_ref`; every backend implementation takes exactly the same arguments and returns the same results.
Vectorised torch only, no Python loops over elements.

Conventions shared by all ops
-----------------------------
* Weights are 2-D ``(N, K)`` = (out_features, in_features); Conv weights are flattened to that view.
* The effective weight is ``θ = M ⊙ m ⊙ w``. ``m is None`` means the plain *Masked* parameterization
  (θ = M ⊙ w, trained directly); ``mask is None`` means "no mask" (all ones).
* Masks are ``torch.bool``. ``torch.where`` (not multiplication) applies them, so a NaN or inf at a pruned
  coordinate never leaks into θ or into a gradient.
* Activations ``x`` are 2-D ``(B, K)`` at the op level; modules flatten leading dims.
* Compact layouts (CSR, BSR) store only the active coordinates; their index tensors are the fields of
  :class:`sparse_engine.layout.CSRIndex` / ``BSRIndex`` (int32). CSR values are 1-D ``(nnz,)``;
  BSR values are ``(nnzb, bn, bk)``; a CSR layout is treated as BSR with 1×1 blocks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# --------------------------------------------------------------------------------------------- helpers


def _apply_mask(t: Tensor, mask: Tensor | None) -> Tensor:
    return t if mask is None else torch.where(mask, t, torch.zeros((), dtype=t.dtype, device=t.device))


# --------------------------------------------------------------------------------------------- reparam


def reparam_ref(m: Tensor | None, w: Tensor, mask: Tensor | None) -> Tensor:
    """θ = M ⊙ m ⊙ w (θ = M ⊙ w when ``m`` is None). Same shape and dtype as ``w``; always a new tensor
    (a registered op may not return an alias of its input, even when there is nothing to do)."""
    theta = w.clone() if m is None else m * w
    return _apply_mask(theta, mask)


def reparam_backward_ref(
    grad: Tensor, m: Tensor | None, w: Tensor, mask: Tensor | None
) -> tuple[Tensor | None, Tensor]:
    """Given G = ∂L/∂θ: g_m = G ⊙ M ⊙ w, g_w = G ⊙ M ⊙ m (g_w = G ⊙ M when ``m`` is None)."""
    if m is None:
        g = _apply_mask(grad, mask)
        return None, (g.clone() if g is grad else g)
    # Mask after multiplying: 0 · NaN would be NaN, and a pruned w or m may hold anything.
    return _apply_mask(grad * w, mask), _apply_mask(grad * m, mask)


# ----------------------------------------------------------------------------- factorisation / Sign-In


def factorize_ref(theta: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """The unique (m, w) with m ⊙ w = θ, m² − w² = β, m > 0.

    Written as m = sqrt(β/2 + hypot(β/2, θ)): ``hypot`` never squares θ (no overflow up to the dtype's
    max, no underflow of tiny θ), and the sum adds two non-negative numbers, so there is no cancellation
    for tiny β. Computed in fp32 (fp64 for fp64 input) even for fp16/bf16 storage, then rounded once.
    With β = 0 and θ = 0, m = w = 0 (the balanced "spred" start: such a coordinate can never move).
    """
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    work = theta.to(torch.float64 if theta.dtype == torch.float64 else torch.float32)
    half = 0.5 * float(beta)
    m = torch.sqrt(half + torch.hypot(torch.full_like(work, half), work))
    w = torch.where(m > 0, work / torch.where(m > 0, m, torch.ones_like(m)), torch.zeros_like(work))
    return m.to(theta.dtype), w.to(theta.dtype)


def signin_reset_ref(m: Tensor, w: Tensor, mask: Tensor | None, beta: float) -> tuple[Tensor, Tensor]:
    """Re-factor the current θ = M ⊙ m ⊙ w to scale β, leaving θ unchanged (up to rounding).

    Pruned coordinates come out as m = sqrt(β), w = 0: the state a regrown coordinate starts from.
    """
    return factorize_ref(reparam_ref(m, w, mask), beta)


# --------------------------------------------------------------------------------------- masked_linear


def masked_linear_ref(
    x: Tensor, m: Tensor | None, w: Tensor, mask: Tensor | None, bias: Tensor | None
) -> Tensor:
    """y = x θᵀ + b with θ = M ⊙ m ⊙ w. x: (B, K), w: (N, K) -> y: (B, N)."""
    return F.linear(x, reparam_ref(m, w, mask), bias)


def masked_linear_backward_ref(
    grad_y: Tensor, x: Tensor, m: Tensor | None, w: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor]:
    """(g_x, g_m, g_w): g_x = dY θ, dθ = dYᵀ x, then the reparam backward on dθ.

    The bias gradient (dY summed over the batch) is not part of the op: autograd computes it.
    """
    theta = reparam_ref(m, w, mask)
    g_x = grad_y @ theta
    g_theta = grad_y.t() @ x
    g_m, g_w = reparam_backward_ref(g_theta, m, w, mask)
    return g_x, g_m, g_w


# -------------------------------------------------------------------------- block-sparse / compact


def block_mask_from_index_ref(
    row: Tensor, col: Tensor, shape: tuple[int, int], block_shape: tuple[int, int]
) -> Tensor:
    """Element mask (N, K) of the blocks listed by (row, col) block coordinates; edge blocks cropped."""
    n, k = shape
    bn, bk = block_shape
    nbr, nbc = -(-n // bn), -(-k // bk)
    blocks = torch.zeros(nbr, nbc, dtype=torch.bool, device=row.device)
    blocks[row.long(), col.long()] = True
    return blocks.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]


def block_sparse_linear_ref(
    x: Tensor, m: Tensor | None, w: Tensor, bias: Tensor | None, crow: Tensor, col: Tensor, row: Tensor,
    ccol: Tensor, row_t: Tensor, perm: Tensor, block_n: int, block_k: int,
) -> Tensor:
    """y = x θᵀ + b with θ = B ⊙ m ⊙ w, B the block mask of a BSRIndex (its six index tensors).

    m, w are stored dense (N, K); a kernel only touches the listed blocks, so its work ∝ nonzero blocks:
    crow/col drive the forward, ccol/row_t (the transposed index) drive dX, row/col drive dθ. The
    reference needs only the block coordinates (row, col).
    """
    mask = block_mask_from_index_ref(row, col, tuple(w.shape), (block_n, block_k))
    return masked_linear_ref(x, m, w, mask, bias)


def block_sparse_linear_backward_ref(
    grad_y: Tensor, x: Tensor, m: Tensor | None, w: Tensor, crow: Tensor, col: Tensor, row: Tensor,
    ccol: Tensor, row_t: Tensor, perm: Tensor, block_n: int, block_k: int,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """(g_x, g_m, g_w); g_m and g_w are dense (N, K) and exactly zero outside the active blocks."""
    mask = block_mask_from_index_ref(row, col, tuple(w.shape), (block_n, block_k))
    return masked_linear_backward_ref(grad_y, x, m, w, mask)


def compact_to_dense_ref(values: Tensor, row: Tensor, col: Tensor, shape: tuple[int, int]) -> Tensor:
    """Scatter CSR values (nnz,) or BSR values (nnzb, bn, bk) to a dense (N, K) tensor."""
    n, k = shape
    if values.dim() == 1:
        dense = values.new_zeros(n, k)
        dense[row.long(), col.long()] = values
        return dense
    nnzb, bn, bk = values.shape
    nbr, nbc = -(-n // bn), -(-k // bk)
    blocks = values.new_zeros(nbr, nbc, bn, bk)
    blocks[row.long(), col.long()] = values
    return blocks.permute(0, 2, 1, 3).reshape(nbr * bn, nbc * bk)[:n, :k]


def dense_to_compact_ref(dense: Tensor, row: Tensor, col: Tensor, block_shape: tuple[int, int]) -> Tensor:
    """Gather the active coordinates of a dense (N, K) tensor: CSR (nnz,) for 1×1 blocks, else BSR."""
    if tuple(block_shape) == (1, 1):
        return dense[row.long(), col.long()]
    n, k = dense.shape
    bn, bk = block_shape
    nbr, nbc = -(-n // bn), -(-k // bk)
    padded = F.pad(dense, (0, nbc * bk - k, 0, nbr * bn - n))
    blocks = padded.reshape(nbr, bn, nbc, bk).permute(0, 2, 1, 3)
    return blocks[row.long(), col.long()]


def _block_shape(values: Tensor) -> tuple[int, int]:
    return (1, 1) if values.dim() == 1 else (values.shape[1], values.shape[2])


def compact_linear_ref(
    x: Tensor, m_values: Tensor | None, w_values: Tensor, bias: Tensor | None, crow: Tensor, col: Tensor,
    row: Tensor, ccol: Tensor, row_t: Tensor, perm: Tensor, out_features: int, in_features: int,
) -> Tensor:
    """y = x θᵀ + b where θ holds m ⊙ w only at the active coordinates (CSR or BSR, see module doc).

    The index tensors are the fields of a CSRIndex / BSRIndex: crow/col drive the SpMM, ccol/row_t/perm
    (the transpose, built once per mask) drive dX, row/col drive the SDDMM for dθ. The reference needs
    only the coordinate list (row, col).
    """
    theta_values = w_values if m_values is None else m_values * w_values
    theta = compact_to_dense_ref(theta_values, row, col, (out_features, in_features))
    return F.linear(x, theta, bias)


def compact_linear_backward_ref(
    grad_y: Tensor, x: Tensor, m_values: Tensor | None, w_values: Tensor, crow: Tensor, col: Tensor,
    row: Tensor, ccol: Tensor, row_t: Tensor, perm: Tensor, out_features: int, in_features: int,
    needs_x_grad: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """(g_x, g_m_values, g_w_values): dX by the transposed product, dθ only on the pattern (SDDMM).

    ``needs_x_grad=False`` (x is the network input, or frozen upstream) skips the dX product, about a
    third of the backward's work, and returns None for g_x; the weight gradients do not change.
    """
    shape = (out_features, in_features)
    theta_values = w_values if m_values is None else m_values * w_values
    g_x = grad_y @ compact_to_dense_ref(theta_values, row, col, shape) if needs_x_grad else None
    g_theta = dense_to_compact_ref(grad_y.t() @ x, row, col, _block_shape(w_values))
    if m_values is None:
        return g_x, None, g_theta
    return g_x, g_theta * w_values, g_theta * m_values


# ------------------------------------------------------------------------------------- sparse_conv2d


def _conv_theta(m_values: Tensor | None, w_values: Tensor, row: Tensor, col: Tensor, out_channels: int,
                in_channels: int, kernel_h: int, kernel_w: int) -> Tensor:
    """θ (O, C, kh, kw) scattered from CSR values over the (O, C·kh·kw) view."""
    theta_values = w_values if m_values is None else m_values * w_values
    theta = compact_to_dense_ref(theta_values, row, col, (out_channels, in_channels * kernel_h * kernel_w))
    return theta.reshape(out_channels, in_channels, kernel_h, kernel_w)


def sparse_conv2d_ref(
    x: Tensor, m_values: Tensor | None, w_values: Tensor, bias: Tensor | None, crow: Tensor, col: Tensor,
    row: Tensor, ccol: Tensor, row_t: Tensor, perm: Tensor, out_channels: int, kernel_h: int, kernel_w: int,
    stride_h: int, stride_w: int, padding_h: int, padding_w: int,
) -> Tensor:
    """y (B, O, Ho, Wo) = conv2d(x (B, C, H, W), θ) + b, zero padding, dilation 1, groups 1.

    θ = m ⊙ w is stored only at the active coordinates of a CSR index over the (O, C·kh·kw) view of the
    weight (the order of ``F.unfold`` patches: channel, kernel row, kernel column); the index tensors are
    those of compact_linear. CSR values only (1-D).
    """
    theta = _conv_theta(m_values, w_values, row, col, out_channels, x.shape[1], kernel_h, kernel_w)
    return F.conv2d(x, theta, bias, (stride_h, stride_w), (padding_h, padding_w))


def sparse_conv2d_backward_ref(
    grad_y: Tensor, x: Tensor, m_values: Tensor | None, w_values: Tensor, crow: Tensor, col: Tensor,
    row: Tensor, ccol: Tensor, row_t: Tensor, perm: Tensor, out_channels: int, kernel_h: int, kernel_w: int,
    stride_h: int, stride_w: int, padding_h: int, padding_w: int, needs_x_grad: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """(g_x, g_m_values, g_w_values): the transposed convolution, and dθ only on the pattern (SDDMM)
    with g_m = dθ ⊙ w, g_w = dθ ⊙ m. ``needs_x_grad=False`` returns None for g_x. (The bias gradient,
    grad_y summed over batch and space, is left to the caller as for compact_linear.)"""
    c = x.shape[1]
    stride, padding = (stride_h, stride_w), (padding_h, padding_w)
    theta = _conv_theta(m_values, w_values, row, col, out_channels, c, kernel_h, kernel_w)
    g_x = torch.nn.grad.conv2d_input(x.shape, theta, grad_y, stride, padding) if needs_x_grad else None
    g_dense = torch.nn.grad.conv2d_weight(x, theta.shape, grad_y, stride, padding)
    g_theta = dense_to_compact_ref(g_dense.reshape(out_channels, -1), row, col, (1, 1))
    if m_values is None:
        return g_x, None, g_theta
    return g_x, g_theta * w_values, g_theta * m_values


# ------------------------------------------------------------------------------------------ fused_step

#: optimizer kinds fused_step understands
STEP_KINDS = ("sgd", "adamw")


def fused_step_ref(
    param: Tensor, grad: Tensor, buf1: Tensor | None, buf2: Tensor | None, mask: Tensor | None, lr: Tensor,
    step: int, kind: str, momentum: float, dampening: float, nesterov: bool, beta1: float, beta2: float,
    eps: float, weight_decay: float, alpha: float, maximize: bool,
) -> None:
    """One optimizer step on one tensor, in place on ``param``, ``buf1``, ``buf2``.

    * ``kind="sgd"``: exactly torch.optim.SGD (coupled weight decay, momentum buffer ``buf1`` that is
      initialised to the gradient on ``step == 1``, dampening, Nesterov). ``buf1`` is None when
      momentum == 0.
    * ``kind="adamw"``: exactly torch.optim.AdamW (decoupled decay p ← p(1 − lr·λ); ``buf1`` = exp_avg,
      ``buf2`` = exp_avg_sq; bias correction with the 1-based ``step``).
    * ``alpha``: PILoT's regulariser α(‖m‖² + ‖w‖²) on this factor, i.e. 2α·p added to the gradient
      (coupled for both kinds: it is part of the objective, not a decay of the optimizer).
    * ``maximize``: the gradient is negated first (before weight decay and α), as in torch.optim.
    * ``mask``: pruned coordinates are not updated (the parameter keeps its value: w = 0 and m = sqrt(β)
      there, θ stays exactly 0) and their optimizer state is set to exactly 0. A NaN gradient at a pruned
      coordinate is ignored.
    * ``lr`` is a 0-dim tensor (any float dtype, any device) so that a schedule does not force
      recompilation; it is read in the compute dtype.
    * Compute dtype: fp64 for fp64 parameters, fp32 otherwise (fp16/bf16 storage is read, updated in fp32
      and rounded once on store, like torch's own fused kernels). The buffers may have their own dtype
      (e.g. fp32 state for bf16 parameters); each tensor is rounded to its own dtype on store.
    """
    if kind not in STEP_KINDS:
        raise ValueError(f"kind must be one of {STEP_KINDS}, got {kind!r}")
    if step < 1:
        raise ValueError(f"step must be >= 1 (1-based count of this step), got {step}")
    work = torch.float64 if param.dtype == torch.float64 else torch.float32
    p = param.to(work)
    g = grad.to(work)
    if maximize:
        g = -g
    if alpha != 0.0:
        g = g + (2.0 * alpha) * p
    lr_w = lr.to(device=p.device, dtype=work)
    if kind == "sgd":
        if weight_decay != 0.0:
            g = g + weight_decay * p
        if momentum != 0.0:
            if buf1 is None:
                raise ValueError("buf1 (momentum buffer) must be given when momentum != 0")
            if step == 1:
                new_buf = g
            else:
                new_buf = buf1.to(work) * momentum + (1.0 - dampening) * g
            g = g + momentum * new_buf if nesterov else new_buf
            buf1.copy_(_apply_mask(new_buf, mask))
        new_p = p - lr_w * g
    else:
        if buf1 is None or buf2 is None:
            raise ValueError("buf1 (exp_avg) and buf2 (exp_avg_sq) must be given for kind='adamw'")
        decayed = p * (1.0 - lr_w * weight_decay)
        exp_avg = torch.lerp(buf1.to(work), g, 1.0 - beta1)
        exp_avg_sq = buf2.to(work) * beta2 + (1.0 - beta2) * g * g
        bias_correction1 = 1.0 - beta1**step
        bias_correction2 = 1.0 - beta2**step
        denom = exp_avg_sq.sqrt() / math.sqrt(bias_correction2) + eps
        new_p = decayed - (lr_w / bias_correction1) * (exp_avg / denom)
        buf1.copy_(_apply_mask(exp_avg, mask))
        buf2.copy_(_apply_mask(exp_avg_sq, mask))
    param.copy_(new_p if mask is None else torch.where(mask, new_p, p))


# ----------------------------------------------------------------------------------------------- prune


def prune_threshold_ref(scores: Tensor, k: int) -> Tensor:
    """The k-th largest value of ``scores`` (any shape; pass |θ| for magnitude pruning), as a 0-dim tensor.

    Keeping ``scores >= threshold`` keeps at least k entries (more only on ties). Uses a selection
    (kthvalue), not a full sort. k = 0 returns +inf (keep nothing).
    """
    n = scores.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}] (number of scores), got {k}")
    if k == 0:
        return torch.tensor(float("inf"), dtype=scores.dtype, device=scores.device)
    return torch.kthvalue(scores.reshape(-1), n - k + 1).values


# ----------------------------------------------------------------------------------------- finiteness


def all_finite_ref(tensors: list[Tensor], masks: list[Tensor | None]) -> bool:
    """Whether every tensor is finite (no NaN, no ±inf) at its active coordinates (``masks[i]`` True; None:
    every coordinate). A NaN or inf at a pruned coordinate does not count.

    First the sums (one device sync): a finite sum means finite elements (a NaN or inf makes the sum NaN
    or inf), and a sum costs ~50x less than isfinite().all() on CPU. Only when some sum is not finite (a
    non-finite element, maybe pruned, or in practice never an overflowing sum) the exact masked check."""
    if not tensors:
        return True
    dev = tensors[0].device
    sums = torch.stack([t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).to(dev)
                        for t in tensors])
    if bool(torch.isfinite(sums).all()):
        return True
    return all(bool(torch.isfinite(t).all() if m is None else torch.isfinite(t).logical_or_(~m).all())
               for t, m in zip(tensors, masks))
