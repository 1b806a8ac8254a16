"""The C++ (CPU) backend: loads the compiled extension and exposes its ops under the implementation
names of ``backends.REFERENCE``, each with exactly the signature of its ``*_ref`` in reference.py.

The library ``sparse_engine._C`` is built by ``pip install`` when a C++ compiler is present
(csrc/build_ext.py). Without it, ``SPARSE_ENGINE_JIT=1`` builds the same sources at first use with
``torch.utils.cpp_extension.load``. When neither works, :data:`UNAVAILABLE` says why (backends.py reads
it and serves the reference) and one warning is issued.

This module is imported lazily by backends.py, when an op first runs on a CPU tensor: loading happens
then, not when ``sparse_engine`` is imported.

The kernels compute in float32 and float64 (:data:`SUPPORTED_DTYPES`); backends.py reads that and sends
other dtypes elsewhere. A direct call with another dtype raises ValueError.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
from torch import Tensor

from . import _ext

#: dtypes the C++ kernels compute in
SUPPORTED_DTYPES = (torch.float32, torch.float64)

#: None when the extension is loaded, else why it is not (read by backends.py)
UNAVAILABLE: str | None = None

_OPS = ("compact_linear_fwd", "compact_linear_bwd", "compact_linear_train", "sparse_conv2d_fwd", "sparse_conv2d_bwd",
        "sparse_conv2d_train", "reparam_fwd", "reparam_bwd", "signin_reset", "fused_step", "fused_step_multi",
        "all_finite")


def _registered() -> bool:
    return _ext.registered("sparse_engine_C", _OPS)


def jit_build(verbose: bool = False) -> None:
    """Build and load the C++ extension with torch.utils.cpp_extension.load (cached between runs)."""
    be = _ext.build_ext_module()
    _ext.jit_load("sparse_engine_C_jit", _ext.build_dir("sparse_engine_C"), verbose,
                  sources=[str(_ext.ROOT / s) for s in be.CPP_SOURCES], extra_cflags=be.CXX_FLAGS,
                  extra_ldflags=be.LD_FLAGS)


UNAVAILABLE = _ext.load("sparse_engine._C", _registered, jit_build,
                        "reinstall with a C++ compiler present (pip install --no-build-isolation -e .) "
                        "or set SPARSE_ENGINE_JIT=1 to build it at first use")
if UNAVAILABLE:
    warnings.warn(f"sparse_engine: C++ backend unavailable, the reference serves CPU ops: {UNAVAILABLE}",
                  RuntimeWarning, stacklevel=2)


# --------------------------------------------------------------------------------------- helpers


def build_id() -> str:
    """Which build of the kernels is loaded: size and modification time of its library file. Measurements
    cached with another build (nn.autolayout) are not reused: the kernels may have changed."""
    import os
    import sys

    module = sys.modules.get("sparse_engine._C")
    if module is not None and getattr(module, "__file__", None):
        paths = [module.__file__]
    else:  # the SPARSE_ENGINE_JIT=1 build: a library loaded into torch.ops
        paths = sorted(p for p in torch.ops.loaded_libraries if "sparse_engine_C" in os.path.basename(p))
    return ";".join(f"{os.path.getsize(p)}-{int(os.path.getmtime(p))}" for p in paths)


def isa() -> str:
    """The instruction set the row kernels run with: 'avx512', 'avx2' or 'base'."""
    return torch.ops.sparse_engine_C.isa()


def set_isa(name: str) -> bool:
    """Select the row kernels: 'auto', 'avx512', 'avx2' or 'base'. False if this CPU cannot run them."""
    return bool(torch.ops.sparse_engine_C.set_isa(name))


def set_panel_budget(nbytes: int) -> int:
    """Largest batch panel (bytes) before the batch is cut into narrower chunks; 0 restores the default
    (one core's L2, at most 512 KiB). Returns the budget now in force. For benchmarks and tests (the
    panel width changes the kernels' inner loops, not the results)."""
    return int(torch.ops.sparse_engine_C.set_panel_budget(int(nbytes)))


#: the panel budget before it followed the L2 size (and a 64-lane panel wherever the batch allows): the
#: A side of the benchmarks' panel A/B rows
FORMER_PANEL_BUDGET = 8 << 20


@contextlib.contextmanager
def use_panel_budget(nbytes: int) -> Iterator[None]:
    """Run the enclosed ops with another panel budget (benchmarks and tests), then the default again."""
    set_panel_budget(nbytes)
    try:
        yield
    finally:
        set_panel_budget(0)


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[None]:
    """Run the enclosed ops with one instruction-set variant (tests and benchmarks)."""
    before = isa()
    if not set_isa(name):
        raise RuntimeError(f"this CPU cannot run the {name!r} kernels")
    try:
        yield
    finally:
        set_isa(before)


# --------------------------------------------------------------------------------------------- ops


def _takes(arg: str):
    return _ext.takes("C++", arg, SUPPORTED_DTYPES, device_type="cpu")



@_takes("w")
def reparam_fwd(m: Tensor | None, w: Tensor, mask: Tensor | None) -> Tensor:
    return torch.ops.sparse_engine_C.reparam_fwd(m, w, mask)


@_takes("w")
def reparam_bwd(grad: Tensor, m: Tensor | None, w: Tensor, mask: Tensor | None) -> tuple[Tensor | None, Tensor]:
    g_m, g_w = torch.ops.sparse_engine_C.reparam_bwd(grad, m, w, mask)
    return (g_m if m is not None else None), g_w


@_takes("w")
def signin_reset(m: Tensor, w: Tensor, mask: Tensor | None, beta: float) -> tuple[Tensor, Tensor]:
    return tuple(torch.ops.sparse_engine_C.signin_reset(m, w, mask, float(beta)))  # type: ignore[return-value]


@_takes("w_values")
def compact_linear_fwd(
    x: Tensor, m_values: Tensor | None, w_values: Tensor, bias: Tensor | None,
    crow: Tensor, col: Tensor, row: Tensor, ccol: Tensor, row_t: Tensor, perm: Tensor,
    out_features: int, in_features: int,
) -> Tensor:
    """y (B, N) = x (B, K) θᵀ + b; CSR values (nnz,) or BSR values (nnzb, bn, bk)."""
    return torch.ops.sparse_engine_C.compact_linear_fwd(
        x, m_values, w_values, bias, crow, col, row, ccol, row_t, perm, int(out_features), int(in_features))


@_takes("w_values")
def compact_linear_bwd(
    grad_y: Tensor, x: Tensor, m_values: Tensor | None, w_values: Tensor,
    crow: Tensor, col: Tensor, row: Tensor, ccol: Tensor, row_t: Tensor, perm: Tensor,
    out_features: int, in_features: int, needs_x_grad: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """(g_x (B, K) | None, g_m_values | None, g_w_values): transposed SpMM and SDDMM on the pattern.

    needs_x_grad=False skips the dX scatter; g_x is then None.
    """
    g_x, g_m, g_w = torch.ops.sparse_engine_C.compact_linear_bwd(
        grad_y, x, m_values, w_values, crow, col, row, ccol, row_t, perm, int(out_features), int(in_features),
        bool(needs_x_grad))
    return (g_x if needs_x_grad else None), (g_m if m_values is not None else None), g_w


# Extra API beyond the reference names (ops/__init__.py calls them on the eager CPU path).


def _python_entry(name: str):
    """A function of the prebuilt library's Python module (None for a JIT build, which has no module)."""
    import sys

    return getattr(sys.modules.get("sparse_engine._C"), name, None)


_INFER = _python_entry("compact_linear_infer")
# The optimizer's calls: the same C++ functions as the ops, without the dispatcher's boxing of their
# lists (see csrc/ops.cpp); the ops where there is no Python module (a JIT build).
_STEP_MULTI = _python_entry("fused_step_multi")
_ALL_FINITE = _python_entry("all_finite")


def _infer_by_op(
    x: Tensor, w_values: Tensor, bias: Tensor | None, crow: Tensor, col: Tensor, out_features: int,
    in_features: int,
) -> Tensor | None:
    """compact_linear_infer through the registered op (a JIT build has no Python module): the same answer,
    None included. The op's forward reads only crow and col of the index (row is size-checked only: int32
    with col's size), so col, or an int32 tensor of its size where col is 16-bit, stands in for the fields
    it does not read."""
    from . import lean_inference_applies

    if not lean_inference_applies(x, w_values, bias, in_features):
        return None
    other = col if col.dtype == torch.int32 else torch.empty(col.shape, dtype=torch.int32)
    y = torch.ops.sparse_engine_C.compact_linear_fwd(x.reshape(-1, in_features), None, w_values, bias, crow, col,
                                                    other, other, other, other, int(out_features), int(in_features))
    return y.view(*x.shape[:-1], out_features)


#: compact_linear_fwd without m and without autograd, for eager inference:
#: ``compact_linear_infer(x, w_values, bias, crow, col, out_features, in_features)`` -> y (x's leading
#: dimensions, out_features), or None where x is a case for the registered op: a gradient is wanted, or x
#: is not a non-empty CPU tensor of w_values' dtype whose last dimension is in_features. The prebuilt
#: library's CPython function when there is one: the op's dispatcher round trip costs more than a small
#: SpMV, and so does one more Python frame.
compact_linear_infer = _INFER if _INFER is not None else _infer_by_op


def compact_linear_train(
    x: Tensor, m_values: Tensor | None, w_values: Tensor, bias: Tensor | None,
    crow: Tensor, col: Tensor, row: Tensor, ccol: Tensor, row_t: Tensor, perm: Tensor,
    out_features: int, in_features: int,
) -> Tensor:
    """compact_linear_fwd with its backward attached in C++: one dispatcher call per direction."""
    return torch.ops.sparse_engine_C.compact_linear_train(
        x, m_values, w_values, bias, crow, col, row, ccol, row_t, perm, int(out_features), int(in_features))


def sparse_conv2d_train(
    x: Tensor, m_values: Tensor | None, w_values: Tensor, bias: Tensor | None,
    crow: Tensor, col: Tensor, row: Tensor, ccol: Tensor, row_t: Tensor, perm: Tensor,
    out_channels: int, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, padding_h: int, padding_w: int,
) -> Tensor:
    """sparse_conv2d_fwd with its backward attached in C++: one dispatcher call per direction."""
    return torch.ops.sparse_engine_C.sparse_conv2d_train(
        x, m_values, w_values, bias, crow, col, row, ccol, row_t, perm, int(out_channels), int(kernel_h),
        int(kernel_w), int(stride_h), int(stride_w), int(padding_h), int(padding_w))


def fused_step_group(
    params: list[Tensor], grads: list[Tensor], buf1: list[Tensor | None], buf2: list[Tensor | None],
    masks: list[Tensor | None], lr: Tensor, step: int, kind: str, momentum: float, dampening: float,
    nesterov: bool, beta1: float, beta2: float, eps: float, weight_decay: float, alphas: list[float],
    maximize: bool,
) -> None:
    """fused_step on every tensor of a group in one call (α per tensor); same kernel, same bits. The tensor
    arguments are lists (ops.fused_step_multi makes them so)."""
    (_STEP_MULTI or torch.ops.sparse_engine_C.fused_step_multi)(
        params, grads, buf1, buf2, masks, lr, int(step), str(kind), float(momentum), float(dampening),
        bool(nesterov), float(beta1), float(beta2), float(eps), float(weight_decay), [float(a) for a in alphas],
        bool(maximize))


@_takes("w_values")
def sparse_conv2d_fwd(
    x: Tensor, m_values: Tensor | None, w_values: Tensor, bias: Tensor | None,
    crow: Tensor, col: Tensor, row: Tensor, ccol: Tensor, row_t: Tensor, perm: Tensor,
    out_channels: int, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, padding_h: int,
    padding_w: int,
) -> Tensor:
    """y (B, O, Ho, Wo): the direct sparse convolution (csrc/cpu/sparse_conv.cpp), no im2col."""
    return torch.ops.sparse_engine_C.sparse_conv2d_fwd(
        x, m_values, w_values, bias, crow, col, row, ccol, row_t, perm, int(out_channels), int(kernel_h),
        int(kernel_w), int(stride_h), int(stride_w), int(padding_h), int(padding_w))


@_takes("w_values")
def sparse_conv2d_bwd(
    grad_y: Tensor, x: Tensor, m_values: Tensor | None, w_values: Tensor,
    crow: Tensor, col: Tensor, row: Tensor, ccol: Tensor, row_t: Tensor, perm: Tensor,
    out_channels: int, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, padding_h: int,
    padding_w: int, needs_x_grad: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """(g_x | None, g_m_values | None, g_w_values): transposed convolution and SDDMM on the pattern."""
    g_x, g_m, g_w = torch.ops.sparse_engine_C.sparse_conv2d_bwd(
        grad_y, x, m_values, w_values, crow, col, row, ccol, row_t, perm, int(out_channels), int(kernel_h),
        int(kernel_w), int(stride_h), int(stride_w), int(padding_h), int(padding_w), bool(needs_x_grad))
    return (g_x if needs_x_grad else None), (g_m if m_values is not None else None), g_w

def all_finite(tensors: list[Tensor], masks: list[Tensor | None]) -> bool:
    """reference.all_finite_ref in one C++ call: one pass over each tensor, no temporaries."""
    return bool((_ALL_FINITE or torch.ops.sparse_engine_C.all_finite)(list(tensors), list(masks)))


@_takes("param")
def fused_step(
    param: Tensor, grad: Tensor, buf1: Tensor | None, buf2: Tensor | None, mask: Tensor | None, lr: Tensor,
    step: int, kind: str, momentum: float, dampening: float, nesterov: bool, beta1: float, beta2: float,
    eps: float, weight_decay: float, alpha: float, maximize: bool,
) -> None:
    """One in-place optimizer step (reference.fused_step_ref), one pass over the tensor."""
    torch.ops.sparse_engine_C.fused_step(
        param, grad, buf1, buf2, mask, lr, int(step), str(kind), float(momentum), float(dampening),
        bool(nesterov), float(beta1), float(beta2), float(eps), float(weight_decay), float(alpha), bool(maximize))



# masked_linear on CPU: the matmuls are MKL's (nothing beats them at dense shapes); what the C++ side adds
# is θ = M ⊙ m ⊙ w and the g_m / g_w epilogue in one vectorised pass each, where the reference spends
# a temporary and a slow bool-mask select per step.
@_takes("w")
def masked_linear_fwd(x: Tensor, m: Tensor | None, w: Tensor, mask: Tensor | None, bias: Tensor | None) -> Tensor:
    return torch.nn.functional.linear(x, torch.ops.sparse_engine_C.reparam_fwd(m, w, mask), bias)


@_takes("w")
def masked_linear_bwd(
    grad_y: Tensor, x: Tensor, m: Tensor | None, w: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor]:
    g_x = grad_y @ torch.ops.sparse_engine_C.reparam_fwd(m, w, mask)
    g_m, g_w = reparam_bwd(grad_y.t() @ x, m, w, mask)
    return g_x, g_m, g_w
