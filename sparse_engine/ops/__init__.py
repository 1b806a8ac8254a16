"""Every op, registered once with ``torch.library`` (schema, fake implementation, autograd).

This is the only place that picks a backend (through :func:`sparse_engine.ops.backends.select`). Public
functions validate their inputs (errors name the argument) and then call ``torch.ops.sparse_engine.*``,
which torch.compile traces through thanks to the fake implementations.

Op-level activations are 2-D (B, K); the public ``masked_linear`` / ``block_sparse_linear`` /
``compact_linear`` accept any leading dims and flatten them.

Documented behaviour of the public functions:

* Non-contiguous inputs are accepted and made contiguous (a copy; gradients flow back to the original).
* An empty batch (B = 0, or any leading dim 0) returns an empty ``(..., N)`` result, and its backward
  gives zero weight gradients. Work of size zero never reaches a kernel: the reference runs it.
* Bad input raises ``TypeError`` / ``ValueError`` naming the argument, what was expected and what came.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import backends
from .reference import STEP_KINDS

_NS = "sparse_engine"
_EMPTY_SHAPE = (0,)  # stands for "no tensor" in op outputs (custom ops cannot return None)
_AUTOCAST_KINDS = ("cpu", "cuda", "xpu", "mps")  # device types whose autocast state is read cheaply


def _none_if_empty(t: Tensor) -> Tensor | None:
    return None if t.numel() == 0 and t.dim() == 1 else t


def _empty_like(ref: Tensor) -> Tensor:
    return ref.new_empty(_EMPTY_SHAPE)


def _grads_out(x: Tensor, w: Tensor, g_x: Tensor | None, g_m: Tensor | None, g_w: Tensor) -> tuple[Tensor, ...]:
    """A linear op's backward results (g_x, g_m, g_w) as a custom op returns them: None as the placeholder."""
    return (g_x if g_x is not None else _empty_like(x)), (g_m if g_m is not None else _empty_like(w)), g_w


def _fake_grads(x: Tensor, m: Tensor | None, w: Tensor, needs_x_grad: bool = True) -> tuple[Tensor, ...]:
    """The fake (shape-only) results of a linear op's backward, placeholders where a gradient is None."""
    g_x = torch.empty_like(x) if needs_x_grad else _empty_like(x)
    g_m = torch.empty_like(w) if m is not None else _empty_like(w)
    return g_x, g_m, torch.empty_like(w)


def _run(impl: str, device: torch.device, dtype: torch.dtype, *args, empty: bool = False):
    """Run ``impl`` on the selected backend; ``empty`` work (a zero-size dim) always runs the reference."""
    if empty:
        fn = backends.REFERENCE[impl]
    else:
        _, fn = backends.select(impl, device, dtype, args)
    # Inputs were already cast by _autocast (public wrappers); a reference F.linear running under an
    # active autocast would otherwise return another dtype than the fake implementation promises.
    # Entering the context costs ~5 µs, so only where autocast is on (or cannot be asked cheaply).
    kind = device.type
    if kind not in _AUTOCAST_KINDS or torch.is_autocast_enabled(kind):
        with torch.autocast(kind, enabled=False):
            return fn(*args)
    return fn(*args)


def run_unchecked(impl: str, device: torch.device, dtype: torch.dtype, *args):
    """Implementation ``impl`` (a backends.REFERENCE name) on the backend this module chooses, called
    directly: no registered op, so no autograd, no input checks, no dispatcher. For callers that built
    and validated their arguments themselves and need no gradient (the inference layers' eager path,
    where the op's overhead costs more than the SpMV at batch 1)."""
    return _run(impl, device, dtype, *args, empty=False)


def lean_inference_applies(x: Tensor, values: Tensor, bias: Tensor | None, in_features: int) -> bool:
    """Whether compact_linear on ``x`` can skip the registered op: no gradient wanted and x a non-empty
    tensor of values' device and dtype whose last dimension is ``in_features``. Otherwise the op gives
    the autograd node or the error. (The C++ entry decides the same in C++; this is its Python side.)"""
    grad = torch.is_grad_enabled() and (
        x.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad))
    return (not grad and x.dim() >= 1 and x.shape[-1] == in_features and x.dtype == values.dtype
            and x.device == values.device and x.numel() > 0)


def infer_entry(device: torch.device, dtype: torch.dtype):
    """The backend's lean inference forward ``f(x, w_values, bias, crow, col, out_features, in_features)``
    of compact_linear (no m, no autograd; it answers None for an x that is the registered op's case, see
    ``_cpp.compact_linear_infer``), or None where the chosen backend has none (then :func:`run_unchecked`
    of ``compact_linear_fwd`` is the way)."""
    return backends.extra("compact_linear_fwd", device, dtype, "compact_linear_infer")


def _autocast(x: Tensor, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Under autocast, cast the floating inputs of a linear op to the autocast dtype, as F.linear does."""
    kind = x.device.type
    if kind not in _AUTOCAST_KINDS or not torch.is_autocast_enabled(kind):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(kind)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in (x, *tensors))


# ------------------------------------------------------------------------------------- input checks


def _check_tensor(name: str, t, *, dim: int | None = None, dtype=None, device=None, shape=None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def _check_factors(m: Tensor | None, w: Tensor, mask: Tensor | None, *, w_dim: int | None = 2,
                   w_name: str = "w", m_name: str = "m") -> None:
    _check_tensor(w_name, w, dim=w_dim)
    if not w.is_floating_point():
        raise ValueError(f"{w_name} must be a floating-point tensor, got {w.dtype}")
    if m is not None:
        _check_tensor(m_name, m, shape=w.shape, dtype=w.dtype, device=w.device)
    if mask is not None:
        _check_tensor("mask", mask, shape=w.shape, dtype=torch.bool, device=w.device)


def _c(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _in_memory_order(param: Tensor, *others: Tensor | None) -> tuple[Tensor | None, ...]:
    """(param, *others) permuted alike so that param is contiguous, where param is one dense block in
    another dim order (a conv weight after ``model.to(memory_format=torch.channels_last)``); unchanged
    otherwise. For an elementwise in-place op the permuted views update the same memory with the same
    values. Tensors that do not share param's strides come out non-contiguous (read-only ones are copied
    by the op; an in-place buffer then fails its contiguity check, by name)."""
    if param.is_contiguous() or any(t is not None and t.shape != param.shape for t in others):
        return (param, *others)  # (a shape mismatch is reported by the op's checks)
    order = sorted(range(param.dim()), key=lambda d: -param.stride(d))  # stable: size-1 dims keep order
    if not param.permute(order).is_contiguous():  # a slice or a broadcast view: no order makes it dense
        return (param, *others)
    return tuple(None if t is None else t.permute(order) for t in (param, *others))


def _check_index(index, w_device: torch.device, *, bsr_only: bool) -> None:
    from ..layout import BSRIndex, CSRIndex  # layout is light, but keep ops importable on its own

    allowed = (BSRIndex,) if bsr_only else (CSRIndex, BSRIndex)
    if not isinstance(index, allowed):
        names = " or ".join(c.__name__ for c in allowed)
        raise TypeError(f"index must be a layout.{names}, got {type(index).__name__}")
    if index.crow.device != w_device:
        raise ValueError(f"index must be on the weight's device {w_device}, got {index.crow.device}")


def _check_input(x: Tensor, w: Tensor, in_features: int, bias: Tensor | None, out_features: int) -> None:
    _check_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have last dim {in_features} (in_features), got shape {tuple(x.shape)}")
    if x.dtype != w.dtype:
        raise ValueError(f"x must have the weight dtype {w.dtype}, got {x.dtype}")
    if x.device != w.device:
        raise ValueError(f"x must be on the weight's device {w.device}, got {x.device}")
    if bias is not None:
        _check_tensor("bias", bias, shape=(out_features,), dtype=w.dtype, device=w.device)


def _on_rows(op, x: Tensor, n: int, *args) -> Tensor:
    """``op(x2, *args)`` on the rows of ``x`` (leading dims flattened: x2 is (B, K), contiguous), the result
    (B, n) shaped back to (..., n)."""
    if x.dim() == 2 and x.is_contiguous():  # already (B, K): no reshape, no view of the result
        return op(x, *args)
    lead = tuple(x.shape[:-1])
    out = op(x.reshape(-1, x.shape[-1]).contiguous(), *args)
    # _unsafe_view (as aten's matmul does): ``out`` is fresh and private, so the result need not be a view
    # of it; a view would make FSDP2 warn that an in-place op on the module's output skips its hooks
    return torch.ops.aten._unsafe_view(out, (*lead, n))


# ------------------------------------------------------------------------------------------ reparam


@torch.library.custom_op(f"{_NS}::reparam", mutates_args=())
def _reparam(m: Optional[Tensor], w: Tensor, mask: Optional[Tensor]) -> Tensor:
    return _run("reparam_fwd", w.device, w.dtype, m, w, mask, empty=w.numel() == 0)


@_reparam.register_fake
def _(m, w, mask):
    return torch.empty_like(w)


@torch.library.custom_op(f"{_NS}::reparam_backward", mutates_args=())
def _reparam_backward(
    grad: Tensor, m: Optional[Tensor], w: Tensor, mask: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    g_m, g_w = _run("reparam_bwd", w.device, w.dtype, grad, m, w, mask, empty=w.numel() == 0)
    return (g_m if g_m is not None else _empty_like(w)), g_w


@_reparam_backward.register_fake
def _(grad, m, w, mask):
    return _fake_grads(w, m, w)[1:]


def _reparam_setup(ctx, inputs, output):
    m, w, mask = inputs
    ctx.save_for_backward(m, w, mask)


def _reparam_grad(ctx, grad):
    m, w, mask = ctx.saved_tensors
    g_m, g_w = _reparam_backward(grad.contiguous(), m, w, mask)
    return (_none_if_empty(g_m) if m is not None else None), g_w, None


_reparam.register_autograd(_reparam_grad, setup_context=_reparam_setup)


def reparam(m: Tensor | None, w: Tensor, mask: Tensor | None = None) -> Tensor:
    """θ = M ⊙ m ⊙ w (any shape; differentiable in m and w). m None: θ = M ⊙ w; mask None: no mask."""
    _check_factors(m, w, mask, w_dim=None)
    return _reparam(_c(m), w.contiguous(), _c(mask))


# ------------------------------------------------------------------------------------ masked_linear


@torch.library.custom_op(f"{_NS}::masked_linear", mutates_args=())
def _masked_linear(
    x: Tensor, m: Optional[Tensor], w: Tensor, mask: Optional[Tensor], bias: Optional[Tensor]
) -> Tensor:
    return _run("masked_linear_fwd", x.device, w.dtype, x, m, w, mask, bias,
                empty=x.numel() == 0 or w.numel() == 0)


@_masked_linear.register_fake
def _(x, m, w, mask, bias):
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.custom_op(f"{_NS}::masked_linear_backward", mutates_args=())
def _masked_linear_backward(
    grad_y: Tensor, x: Tensor, m: Optional[Tensor], w: Tensor, mask: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    g_x, g_m, g_w = _run("masked_linear_bwd", x.device, w.dtype, grad_y, x, m, w, mask,
                         empty=x.numel() == 0 or w.numel() == 0)
    return _grads_out(x, w, g_x, g_m, g_w)


@_masked_linear_backward.register_fake
def _(grad_y, x, m, w, mask):
    return _fake_grads(x, m, w)


def _linear_setup(ctx, inputs, output):
    x, m, w, mask, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, m, w, mask)


def _linear_grad(ctx, grad_y):
    x, m, w, mask = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    g_x, g_m, g_w = _masked_linear_backward(grad_y, x, m, w, mask)
    g_b = grad_y.sum(0) if ctx.has_bias else None
    return g_x, (g_m if m is not None else None), g_w, None, g_b


_masked_linear.register_autograd(_linear_grad, setup_context=_linear_setup)


def masked_linear(
    x: Tensor, m: Tensor | None, w: Tensor, mask: Tensor | None = None, bias: Tensor | None = None
) -> Tensor:
    """y = x θᵀ + b with θ = M ⊙ m ⊙ w built inside the matmul. x: (..., K), w: (N, K) -> (..., N).

    m None: the Masked parameterization (θ = M ⊙ w); mask None: no mask.
    """
    _check_tensor("x", x)
    x, m, w, bias = _autocast(x, m, w, bias)
    _check_factors(m, w, mask)
    _check_input(x, w, w.shape[1], bias, w.shape[0])
    return _on_rows(_masked_linear, x, w.shape[0], _c(m), w.contiguous(), _c(mask), _c(bias))


# ------------------------------------------------------------------------------ block_sparse_linear


@torch.library.custom_op(f"{_NS}::block_sparse_linear", mutates_args=())
def _block_sparse_linear(
    x: Tensor, m: Optional[Tensor], w: Tensor, bias: Optional[Tensor],
    crow: Tensor, col: Tensor, row: Tensor, ccol: Tensor, row_t: Tensor, perm: Tensor,
    block_n: int, block_k: int,
) -> Tensor:
    return _run("block_sparse_linear_fwd", x.device, w.dtype, x, m, w, bias, crow, col, row, ccol, row_t,
                perm, block_n, block_k, empty=x.numel() == 0 or w.numel() == 0)


@_block_sparse_linear.register_fake
def _(x, m, w, bias, crow, col, row, ccol, row_t, perm, block_n, block_k):
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.custom_op(f"{_NS}::block_sparse_linear_backward", mutates_args=())
def _block_sparse_linear_backward(
    grad_y: Tensor, x: Tensor, m: Optional[Tensor], w: Tensor,
    crow: Tensor, col: Tensor, row: Tensor, ccol: Tensor, row_t: Tensor, perm: Tensor,
    block_n: int, block_k: int,
) -> tuple[Tensor, Tensor, Tensor]:
    g_x, g_m, g_w = _run("block_sparse_linear_bwd", x.device, w.dtype, grad_y, x, m, w, crow, col, row, ccol,
                         row_t, perm, block_n, block_k, empty=x.numel() == 0 or w.numel() == 0)
    return _grads_out(x, w, g_x, g_m, g_w)


@_block_sparse_linear_backward.register_fake
def _(grad_y, x, m, w, crow, col, row, ccol, row_t, perm, block_n, block_k):
    return _fake_grads(x, m, w)


def _bsl_setup(ctx, inputs, output):
    x, m, w, bias, *index, block_n, block_k = inputs
    ctx.has_bias, ctx.block = bias is not None, (block_n, block_k)
    ctx.save_for_backward(x, m, w, *index)


def _bsl_grad(ctx, grad_y):
    x, m, w, *index = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    g_x, g_m, g_w = _block_sparse_linear_backward(grad_y, x, m, w, *index, *ctx.block)
    g_b = grad_y.sum(0) if ctx.has_bias else None
    return (g_x, (g_m if m is not None else None), g_w, g_b) + (None,) * 8


_block_sparse_linear.register_autograd(_bsl_grad, setup_context=_bsl_setup)


def _index_tensors(index) -> tuple[Tensor, ...]:
    return (index.crow, index.col, index.row, index.ccol, index.row_t, index.perm)


def block_sparse_linear(x: Tensor, m: Tensor | None, w: Tensor, index, bias: Tensor | None = None) -> Tensor:
    """y = x θᵀ + b with θ = B ⊙ m ⊙ w, B the blocks of ``index`` (a layout.BSRIndex); m, w dense (N, K).

    x: (..., K) -> (..., N). Whole blocks are active: coordinates inside an active block train.
    """
    _check_tensor("x", x)
    x, m, w, bias = _autocast(x, m, w, bias)
    _check_factors(m, w, None)
    _check_input(x, w, w.shape[1], bias, w.shape[0])
    _check_index(index, w.device, bsr_only=True)
    if tuple(index.shape) != tuple(w.shape):
        raise ValueError(f"index must describe a {tuple(w.shape)} weight, got shape {tuple(index.shape)}")
    bn, bk = index.block_shape
    return _on_rows(_block_sparse_linear, x, w.shape[0], _c(m), w.contiguous(), _c(bias), *_index_tensors(index),
                    bn, bk)


# ----------------------------------------------------------------------------------- compact_linear


@torch.library.custom_op(f"{_NS}::compact_linear", mutates_args=())
def _compact_linear(
    x: Tensor, m_values: Optional[Tensor], w_values: Tensor, bias: Optional[Tensor],
    crow: Tensor, col: Tensor, row: Tensor, ccol: Tensor, row_t: Tensor, perm: Tensor,
    out_features: int, in_features: int,
) -> Tensor:
    return _run("compact_linear_fwd", x.device, w_values.dtype, x, m_values, w_values, bias, crow, col, row,
                ccol, row_t, perm, out_features, in_features,
                empty=x.numel() == 0 or out_features * in_features == 0)


@_compact_linear.register_fake
def _(x, m_values, w_values, bias, crow, col, row, ccol, row_t, perm, out_features, in_features):
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op(f"{_NS}::compact_linear_backward", mutates_args=())
def _compact_linear_backward(
    grad_y: Tensor, x: Tensor, m_values: Optional[Tensor], w_values: Tensor,
    crow: Tensor, col: Tensor, row: Tensor, ccol: Tensor, row_t: Tensor, perm: Tensor,
    out_features: int, in_features: int, needs_x_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    # needs_x_grad=False: g_x comes back as the (0,) "no tensor" placeholder and dX is never computed.
    g_x, g_m, g_w = _run("compact_linear_bwd", x.device, w_values.dtype, grad_y, x, m_values, w_values, crow,
                         col, row, ccol, row_t, perm, out_features, in_features, needs_x_grad,
                         empty=x.numel() == 0 or out_features * in_features == 0)
    return _grads_out(x, w_values, g_x, g_m, g_w)


@_compact_linear_backward.register_fake
def _(grad_y, x, m_values, w_values, crow, col, row, ccol, row_t, perm, out_features, in_features,
      needs_x_grad):
    return _fake_grads(x, m_values, w_values, needs_x_grad)


def _cl_setup(ctx, inputs, output):
    x, m_values, w_values, bias, *index, out_features, in_features = inputs
    ctx.has_bias, ctx.dims = bias is not None, (out_features, in_features)
    ctx.save_for_backward(x, m_values, w_values, *index)


def _cl_grad(ctx, grad_y):
    x, m_values, w_values, *index = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    needs_x_grad = bool(ctx.needs_input_grad[0])
    g_x, g_m, g_w = _compact_linear_backward(grad_y, x, m_values, w_values, *index, *ctx.dims, needs_x_grad)
    g_b = grad_y.sum(0) if ctx.has_bias else None
    return ((g_x if needs_x_grad else None), (g_m if m_values is not None else None), g_w, g_b) + (None,) * 8


_compact_linear.register_autograd(_cl_grad, setup_context=_cl_setup)


def compact_linear(
    x: Tensor, m_values: Tensor | None, w_values: Tensor, index, bias: Tensor | None = None
) -> Tensor:
    """y = x θᵀ + b, θ stored compactly: values of m and w at the active coordinates of ``index``.

    ``index`` is a layout.CSRIndex (values (nnz,)) or BSRIndex (values (nnzb, bn, bk), edge blocks zero
    padded: the padding never reaches y and gets zero gradient). x: (..., K) -> (..., N).
    """
    _check_tensor("x", x)
    x, m_values, w_values, bias = _autocast(x, m_values, w_values, bias)
    _check_tensor("w_values", w_values)
    _check_index(index, w_values.device, bsr_only=False)
    n, k = index.shape
    expect = (index.nnzb, *index.block_shape) if hasattr(index, "block_shape") else (index.nnz,)
    _check_factors(m_values, w_values, None, w_dim=None, w_name="w_values", m_name="m_values")
    _check_tensor("w_values", w_values, shape=expect)
    _check_input(x, w_values, k, bias, n)
    op = _compact_linear
    if x.numel() and n * k and not torch.compiler.is_compiling():
        # Eager: a backend that attaches the backward natively (C++: one autograd node) saves the custom
        # op's Python round trip per call in each direction; the kernels and results are the same.
        op = backends.extra("compact_linear_fwd", x.device, w_values.dtype, "compact_linear_train") or op
    return _on_rows(op, x, n, _c(m_values), w_values.contiguous(), _c(bias), *_index_tensors(index), n, k)


def compact_linear_eager(
    x: Tensor, m_values: Tensor | None, w_values: Tensor, fields: Sequence[Tensor], bias: Tensor | None,
    out_features: int, in_features: int,
) -> Tensor | None:
    """:func:`compact_linear` for a module that holds its index as the six tensors ``fields`` (crow, col,
    row, ccol, row_t, perm) and checked them and the values when it built them: only what can change
    from call to call is checked here (x). Returns None where this lean path does not apply (compile,
    autocast, a backend without the whole-call entry, an x that is not (B, K) contiguous of the values'
    dtype and device, empty work): the caller then takes :func:`compact_linear`, which checks everything
    and says what is wrong. Same op, same results; what it saves is ~20 µs of Python per call, a tenth of
    a small layer's training step."""
    if (torch.compiler.is_compiling() or not isinstance(x, Tensor) or x.dim() != 2 or not x.is_contiguous()
            or x.shape[1] != in_features or not x.shape[0] or not out_features or x.dtype != w_values.dtype
            or x.device != w_values.device):
        return None
    kind = x.device.type
    if kind not in _AUTOCAST_KINDS or torch.is_autocast_enabled(kind):
        return None
    op = backends.extra("compact_linear_fwd", x.device, w_values.dtype, "compact_linear_train")
    if op is None:
        return None
    return op(x, m_values, w_values, bias, *fields, out_features, in_features)


# ------------------------------------------------------------------------------------ sparse_conv2d


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@torch.library.custom_op(f"{_NS}::sparse_conv2d", mutates_args=())
def _sparse_conv2d(
    x: Tensor, m_values: Optional[Tensor], w_values: Tensor, bias: Optional[Tensor],
    crow: Tensor, col: Tensor, row: Tensor, ccol: Tensor, row_t: Tensor, perm: Tensor,
    out_channels: int, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, padding_h: int,
    padding_w: int,
) -> Tensor:
    return _run("sparse_conv2d_fwd", x.device, w_values.dtype, x, m_values, w_values, bias, crow, col, row,
                ccol, row_t, perm, out_channels, kernel_h, kernel_w, stride_h, stride_w, padding_h, padding_w,
                empty=x.numel() == 0 or out_channels == 0)


@_sparse_conv2d.register_fake
def _(x, m_values, w_values, bias, crow, col, row, ccol, row_t, perm, out_channels, kernel_h, kernel_w,
      stride_h, stride_w, padding_h, padding_w):
    return x.new_empty(x.shape[0], out_channels, _conv_out(x.shape[2], kernel_h, stride_h, padding_h),
                       _conv_out(x.shape[3], kernel_w, stride_w, padding_w))


@torch.library.custom_op(f"{_NS}::sparse_conv2d_backward", mutates_args=())
def _sparse_conv2d_backward(
    grad_y: Tensor, x: Tensor, m_values: Optional[Tensor], w_values: Tensor,
    crow: Tensor, col: Tensor, row: Tensor, ccol: Tensor, row_t: Tensor, perm: Tensor,
    out_channels: int, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, padding_h: int,
    padding_w: int, needs_x_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    g_x, g_m, g_w = _run("sparse_conv2d_bwd", x.device, w_values.dtype, grad_y, x, m_values, w_values, crow,
                         col, row, ccol, row_t, perm, out_channels, kernel_h, kernel_w, stride_h, stride_w,
                         padding_h, padding_w, needs_x_grad, empty=x.numel() == 0 or out_channels == 0)
    return _grads_out(x, w_values, g_x, g_m, g_w)


@_sparse_conv2d_backward.register_fake
def _(grad_y, x, m_values, w_values, crow, col, row, ccol, row_t, perm, out_channels, kernel_h, kernel_w,
      stride_h, stride_w, padding_h, padding_w, needs_x_grad):
    return _fake_grads(x, m_values, w_values, needs_x_grad)


def _sc_setup(ctx, inputs, output):
    x, m_values, w_values, bias, *rest = inputs
    index, dims = rest[:6], rest[6:]
    ctx.has_bias, ctx.dims = bias is not None, tuple(dims)
    ctx.save_for_backward(x, m_values, w_values, *index)


def _sc_grad(ctx, grad_y):
    x, m_values, w_values, *index = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    needs_x_grad = bool(ctx.needs_input_grad[0])
    g_x, g_m, g_w = _sparse_conv2d_backward(grad_y, x, m_values, w_values, *index, *ctx.dims, needs_x_grad)
    g_b = grad_y.sum((0, 2, 3)) if ctx.has_bias else None
    return ((g_x if needs_x_grad else None), (g_m if m_values is not None else None), g_w, g_b) + (None,) * 13


_sparse_conv2d.register_autograd(_sc_grad, setup_context=_sc_setup)


def _pair(name: str, value, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        pair = tuple(pair)
    except TypeError:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in pair):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of such ints, got {value!r}")
    return pair


def sparse_conv2d(
    x: Tensor, m_values: Tensor | None, w_values: Tensor, index, kernel_size, bias: Tensor | None = None,
    stride=1, padding=0, *, memory_format: torch.memory_format | None = None,
) -> Tensor:
    """y = conv2d(x, θ) + b, θ = m ⊙ w stored only at the active coordinates of ``index`` (a
    layout.CSRIndex over the (out_channels, in_channels · kh · kw) view of the weight, values (nnz,)).

    x: (B, C, H, W) or unbatched (C, H, W) -> (B, O, Ho, Wo). Zero padding, dilation 1, groups 1 (other
    configurations: see nn/conv.py, which keeps im2col + compact_linear for them). On CPU the C++ backend
    computes it directly (no im2col): work ∝ nnz · B · Ho · Wo; there an x in ``torch.channels_last``
    memory format is read without a copy and y (and x's gradient) come out channels_last, as from
    nn.Conv2d, so the batch norms after it run their faster NHWC kernels. ``memory_format``
    (torch.channels_last or None) decides where x is contiguous in both formats (one channel, or 1×1
    images), which x alone cannot tell (nn.Conv2d follows its weight's format there).
    """
    from ..layout import CSRIndex

    _check_tensor("x", x)
    x, m_values, w_values, bias = _autocast(x, m_values, w_values, bias)
    _check_tensor("w_values", w_values)
    _check_index(index, w_values.device, bsr_only=False)
    if not isinstance(index, CSRIndex):
        raise TypeError(f"index must be a layout.CSRIndex (sparse_conv2d has no block layout), got "
                        f"{type(index).__name__}")
    kh, kw = _pair("kernel_size", kernel_size, 1)
    sh, sw = _pair("stride", stride, 1)
    ph, pw = _pair("padding", padding, 0)
    o, k = index.shape
    _check_factors(m_values, w_values, None, w_dim=None, w_name="w_values", m_name="m_values")
    _check_tensor("w_values", w_values, shape=(index.nnz,))
    unbatched = x.dim() == 3
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be 4-D (B, C, H, W) or 3-D (C, H, W), got shape {tuple(x.shape)}")
    x4 = x.unsqueeze(0) if unbatched else x
    c = x4.shape[1]
    if c * kh * kw != k:
        raise ValueError(f"x must have {k // (kh * kw) if k % (kh * kw) == 0 else k / (kh * kw)} channels "
                         f"(index columns {k} / kernel {kh}x{kw}), got shape {tuple(x.shape)}")
    if x4.dtype != w_values.dtype:
        raise ValueError(f"x must have the weight dtype {w_values.dtype}, got {x4.dtype}")
    if x4.device != w_values.device:
        raise ValueError(f"x must be on the weight's device {w_values.device}, got {x4.device}")
    if bias is not None:
        _check_tensor("bias", bias, shape=(o,), dtype=w_values.dtype, device=w_values.device)
    if x4.shape[2] + 2 * ph < kh or x4.shape[3] + 2 * pw < kw:
        raise ValueError(f"x is too small for kernel_size={(kh, kw)} with padding={(ph, pw)}: got shape "
                         f"{tuple(x.shape)}")
    op = _sparse_conv2d
    if x4.numel() and o and not torch.compiler.is_compiling():
        # Eager: as compact_linear, the C++ backend's one-node autograd path (same kernels, same results)
        op = backends.extra("sparse_conv2d_fwd", x4.device, w_values.dtype, "sparse_conv2d_train") or op
    if memory_format not in (None, torch.channels_last, torch.contiguous_format):
        raise ValueError(f"memory_format must be torch.channels_last, torch.contiguous_format or None, got "
                         f"{memory_format!r}")
    if op is _sparse_conv2d or not x4.is_contiguous(memory_format=torch.channels_last):
        x4 = x4.contiguous()  # (the C++ node reads channels_last x as it is, and returns channels_last y)
    elif memory_format is torch.channels_last and x4.is_contiguous():
        # contiguous in both formats: the same memory read as (B, H, W, C), a view with NHWC strides
        b_, c_, h_, w_ = x4.shape
        x4 = x4.view(b_, h_, w_, c_).permute(0, 3, 1, 2)
    y = op(x4, _c(m_values), w_values.contiguous(), _c(bias), *_index_tensors(index), o, kh, kw, sh, sw, ph, pw)
    return y.squeeze(0) if unbatched else y

# --------------------------------------------------------------------------------------- fused_step


@torch.library.custom_op(f"{_NS}::fused_step", mutates_args=("param", "buf1", "buf2"))
def _fused_step(
    param: Tensor, grad: Tensor, buf1: Optional[Tensor], buf2: Optional[Tensor], mask: Optional[Tensor],
    lr: Tensor, step: int, kind: str, momentum: float, dampening: float, nesterov: bool,
    beta1: float, beta2: float, eps: float, weight_decay: float, alpha: float, maximize: bool,
) -> None:
    _run("fused_step", param.device, param.dtype, param, grad, buf1, buf2, mask, lr, step, kind, momentum,
         dampening, nesterov, beta1, beta2, eps, weight_decay, alpha, maximize, empty=param.numel() == 0)


@_fused_step.register_fake
def _(param, grad, buf1, buf2, mask, lr, step, kind, momentum, dampening, nesterov, beta1, beta2, eps,
      weight_decay, alpha, maximize):
    return None


def fused_step(
    param: Tensor, grad: Tensor, buf1: Tensor | None, buf2: Tensor | None, mask: Tensor | None, lr: Tensor,
    step: int, kind: str, *, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
    beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
    alpha: float = 0.0, maximize: bool = False,
) -> None:
    """One in-place optimizer step on one tensor (see reference.fused_step_ref for the exact math).

    ``param``, ``buf1``, ``buf2`` are updated in place, so they must be dense in memory with the same
    strides (contiguous, or e.g. all channels_last: a copy would lose the update); ``grad`` and ``mask``
    may have any strides.
    """
    _check_tensor("param", param)
    if not param.is_floating_point():
        raise ValueError(f"param must be a floating-point tensor, got {param.dtype}")
    _check_tensor("grad", grad, shape=param.shape, dtype=param.dtype, device=param.device)
    if kind not in STEP_KINDS:
        raise ValueError(f"kind must be one of {STEP_KINDS}, got {kind!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1 (1-based count of this step), got {step!r}")
    needed = {"sgd": ("buf1",) if momentum != 0.0 else (), "adamw": ("buf1", "buf2")}[kind]
    for name, buf in (("buf1", buf1), ("buf2", buf2)):
        if buf is None:
            if name in needed:
                what = {("sgd", "buf1"): "the momentum buffer", ("adamw", "buf1"): "exp_avg",
                        ("adamw", "buf2"): "exp_avg_sq"}[(kind, name)]
                raise ValueError(f"{name} ({what}) must be given for kind={kind!r} with these settings")
            continue
        _check_tensor(name, buf, shape=param.shape, device=param.device)
        if not buf.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {buf.dtype}")
    if mask is not None:
        _check_tensor("mask", mask, shape=param.shape, dtype=torch.bool, device=param.device)
    param, grad, buf1, buf2, mask = _in_memory_order(param, grad, buf1, buf2, mask)
    for name, t in (("param", param), ("buf1", buf1), ("buf2", buf2)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be dense in memory with param's strides (it is updated in place), "
                             f"got strides {t.stride()}")
    _check_tensor("lr", lr, dim=0)
    if not lr.is_floating_point():
        raise ValueError(f"lr must be a floating-point 0-dim tensor, got {lr.dtype}")
    _check_hyper(kind, momentum=momentum, dampening=dampening, nesterov=nesterov, beta1=beta1, beta2=beta2,
                 eps=eps, weight_decay=weight_decay, alpha=alpha)
    args = (param, grad.contiguous(), buf1, buf2, _c(mask), lr, step, kind, float(momentum), float(dampening),
            bool(nesterov), float(beta1), float(beta2), float(eps), float(weight_decay), float(alpha),
            bool(maximize))
    if torch.compiler.is_compiling():
        _fused_step(*args)
    else:
        # Eager: call the implementation directly. The registered op adds nothing here (no autograd,
        # in-place result) but costs ~0.3 ms of argument handling per call, about a third of a small
        # MLP's training step (measured by the optimizer tests' profile); compile still sees the op.
        _run("fused_step", param.device, param.dtype, *args, empty=param.numel() == 0)
        _mark_updated([param, buf1, buf2])


def _mark_updated(tensors: list[Tensor | None]) -> None:
    """Tell autograd that the kernels wrote these tensors in place (through their data pointers, which
    autograd does not see): a backward that saved one of them before the step then raises, as it does
    after torch.optim's in-place updates, instead of using the updated values."""
    torch.autograd.graph.increment_version([t for t in tensors if t is not None])


def fused_step_multi(
    params: Sequence[Tensor], grads: Sequence[Tensor], buf1s: Sequence[Tensor | None],
    buf2s: Sequence[Tensor | None], masks: Sequence[Tensor | None], lr: Tensor, step: int, kind: str, *,
    alphas: Sequence[float], momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
    beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
    maximize: bool = False,
) -> None:
    """:func:`fused_step` on every tensor of a list (one device and dtype, one step count and set of
    hyperparameters; ``alphas[i]`` is tensor i's α), in one call where the backend has a whole-list
    entry point, else tensor by tensor. Same results as the per-tensor calls."""
    lists = {"grads": grads, "buf1s": buf1s, "buf2s": buf2s, "masks": masks, "alphas": alphas}
    for name, seq in lists.items():
        if len(seq) != len(params):
            raise ValueError(f"{name} must have one entry per param ({len(params)}), got {len(seq)}")
    if not params:
        return
    hyper = dict(momentum=momentum, dampening=dampening, nesterov=nesterov, beta1=beta1, beta2=beta2, eps=eps,
                 weight_decay=weight_decay, maximize=maximize)
    group = None
    if not torch.compiler.is_compiling() and isinstance(lr, Tensor) and lr.dim() == 0:
        p0 = params[0]
        same = all(p.dtype == p0.dtype and p.device == p0.device and p.numel() for p in params)
        group = backends.extra("fused_step", p0.device, p0.dtype, "fused_step_group") if same else None
    if group is None:
        for p, g, b1, b2, mk, a in zip(params, grads, buf1s, buf2s, masks, alphas):
            fused_step(p, g, b1, b2, mk, lr, step, kind, alpha=a, **hyper)
        return
    if kind not in STEP_KINDS:
        raise ValueError(f"kind must be one of {STEP_KINDS}, got {kind!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1 (1-based count of this step), got {step!r}")
    if not lr.is_floating_point():
        raise ValueError(f"lr must be a floating-point 0-dim tensor, got {lr.dtype}")
    for a in set(alphas):
        _check_hyper(kind, momentum=momentum, dampening=dampening, nesterov=nesterov, beta1=beta1, beta2=beta2,
                     eps=eps, weight_decay=weight_decay, alpha=a)
    # The C++ entry point checks every tensor (device, dtype, shape, contiguity) as fused_step does.
    if not all(p.is_contiguous() for p in params):  # e.g. channels_last conv weights (rare: a check first)
        items = (_in_memory_order(*t) for t in zip(params, grads, buf1s, buf2s, masks))
        params, grads, buf1s, buf2s, masks = zip(*items)
    group(list(params), list(grads), list(buf1s), list(buf2s), list(masks), lr, step, kind, float(momentum),
          float(dampening), bool(nesterov), float(beta1), float(beta2), float(eps), float(weight_decay),
          [float(a) for a in alphas], bool(maximize))
    _mark_updated([*params, *buf1s, *buf2s])


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_hyper(kind: str, **h) -> None:
    """The same ranges torch.optim checks, with the argument named."""
    for name in ("momentum", "dampening", "weight_decay", "alpha", "eps"):
        v = h[name]
        if not (_is_number(v) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if kind == "sgd" and h["nesterov"] and (h["momentum"] <= 0 or h["dampening"] != 0):
        raise ValueError(f"nesterov=True needs momentum > 0 and dampening = 0, got momentum={h['momentum']}, "
                         f"dampening={h['dampening']}")
    if kind == "adamw":
        for name in ("beta1", "beta2"):
            v = h[name]
            if not (_is_number(v) and 0.0 <= v < 1.0):
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")


# ------------------------------------------------------------------------------ signin_reset, prune


@torch.library.custom_op(f"{_NS}::signin_reset", mutates_args=())
def _signin_reset(m: Tensor, w: Tensor, mask: Optional[Tensor], beta: float) -> tuple[Tensor, Tensor]:
    return _run("signin_reset", w.device, w.dtype, m, w, mask, beta, empty=w.numel() == 0)


@_signin_reset.register_fake
def _(m, w, mask, beta):
    return torch.empty_like(m), torch.empty_like(w)


def signin_reset(m: Tensor, w: Tensor, mask: Tensor | None, beta: float) -> tuple[Tensor, Tensor]:
    """Re-factor θ = M ⊙ m ⊙ w to m² − w² = β (θ unchanged to rounding). Returns new (m, w).

    Not differentiable (a reset is a change of coordinates between steps): the inputs are detached.
    β = 0 is allowed (the balanced factorisation), though a coordinate at θ = 0 then never moves again.
    """
    _check_factors(m, w, mask, w_dim=None)
    if m is None:
        raise TypeError("m must be a torch.Tensor (a reset needs both factors), got NoneType")
    if not _is_number(beta) or not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    return _signin_reset(m.detach().contiguous(), w.detach().contiguous(), _c(mask), float(beta))


# ------------------------------------------------------------------------------------------ all_finite


def all_finite(tensors: Sequence[Tensor], masks: Sequence[Tensor | None] | None = None) -> bool:
    """Whether every tensor is finite (no NaN, no ±inf) at its active coordinates (``masks[i]``: bool of
    tensor i's shape, True = active; None = every coordinate). The optimizers' check of the gradients
    before a step: one call for a whole list (on CPU one C++ pass per tensor, where a sum per tensor and a
    stack cost ~4x more for a small model's step)."""
    tensors = list(tensors)
    masks = [None] * len(tensors) if masks is None else list(masks)
    if len(masks) != len(tensors):
        raise ValueError(f"masks must have one entry per tensor ({len(tensors)}), got {len(masks)}")
    for i, (t, m) in enumerate(zip(tensors, masks)):
        _check_tensor(f"tensors[{i}]", t)
        if not t.is_floating_point():
            raise ValueError(f"tensors[{i}] must be floating point, got {t.dtype}")
        if m is not None:
            _check_tensor(f"masks[{i}]", m, shape=t.shape, dtype=torch.bool, device=t.device)
    if not tensors:
        return True
    t0 = tensors[0]
    if any(t.dtype != t0.dtype or t.device != t0.device for t in tensors):
        return backends.REFERENCE["all_finite"](tensors, masks)  # one backend takes one dtype and device
    return bool(_run("all_finite", t0.device, t0.dtype, tensors, masks))


@torch.library.custom_op(f"{_NS}::prune_threshold", mutates_args=())
def _prune_threshold(scores: Tensor, k: int) -> Tensor:
    return _run("prune_threshold", scores.device, scores.dtype, scores, k, empty=scores.numel() == 0)


@_prune_threshold.register_fake
def _(scores, k):
    return scores.new_empty(())


def prune_threshold(scores: Tensor | Sequence[Tensor], k: int) -> Tensor:
    """k-th largest of ``scores`` (one tensor, or several concatenated: a global threshold), 0-dim.

    Keep ``scores >= threshold``: at least k entries (more only on ties); k = 0 gives +inf.
    """
    if not isinstance(scores, Tensor):
        if isinstance(scores, (str, bytes)) or not isinstance(scores, Sequence) or not len(scores):
            raise TypeError("scores must be a tensor or a non-empty sequence of tensors, got "
                            f"{type(scores).__name__}")
        first = scores[0].device if isinstance(scores[0], Tensor) else None
        for i, t in enumerate(scores):
            _check_tensor(f"scores[{i}]", t, device=first)
        scores = torch.cat([s.reshape(-1) for s in scores])
    _check_tensor("scores", scores)
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor, got {scores.dtype}")
    n = scores.numel()
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k must be an int in [0, {n}] (the number of scores), got {k!r}")
    return _prune_threshold(scores.contiguous(), k)
