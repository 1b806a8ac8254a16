"""The CUDA backend: loads the compiled CUDA extension and exposes its ops under the implementation
names of ``backends.REFERENCE``, each with exactly the signature of its ``*_ref`` in reference.py.

``sparse_engine._cuda_C`` is built by ``pip install`` with ``SPARSE_ENGINE_CUDA=1``, or automatically when
torch has CUDA and nvcc is found (csrc/build_ext.py: the .cu kernels are compiled by nvcc and linked
with the static CUDA runtime into a plain C++ extension). Without it, ``SPARSE_ENGINE_JIT=1`` builds the
same at first use. When neither works, :data:`UNAVAILABLE` says why and one warning is issued.

Extra API beyond the reference names: :func:`fused_step_multi` (a whole parameter group in one launch)
and :func:`index_errors` (the kernels skip and count out-of-range index entries instead of reading out of
bounds; with :data:`DEBUG` set, every compact_linear call checks the count and raises).

Kernels compute in float32 and float64 (:data:`SUPPORTED_DTYPES`); compact_linear takes CSR values only
(:func:`unsupported` says so to backends.py, which sends BSR elsewhere). A direct call with other inputs
raises ValueError.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from typing import Sequence

import torch
from torch import Tensor

from . import _ext

SUPPORTED_DTYPES = (torch.float32, torch.float64)
UNAVAILABLE: str | None = None
#: check the kernels' index-error word after every compact_linear call (synchronises; for debugging)
DEBUG = False

_OPS = ("compact_linear_fwd", "compact_linear_bwd", "reparam_fwd", "reparam_bwd", "signin_reset", "fused_step",
        "index_error")


def _registered() -> bool:
    return _ext.registered("sparse_engine_cuda", _OPS)


def jit_build(verbose: bool = False) -> None:
    """nvcc the .cu files, then build and load the binding with torch.utils.cpp_extension.load."""
    be = _ext.build_ext_module()
    nvcc = be.find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    build_dir = _ext.build_dir("sparse_engine_cuda")
    objs = be.compile_cuda_objects(nvcc, str(build_dir / "objects"))
    lib_dirs, libs = be.cuda_link_args(nvcc)
    _ext.jit_load("sparse_engine_cuda_jit", build_dir, verbose, sources=[str(_ext.ROOT / be.CUDA_BINDING)],
                  extra_cflags=["-O2", "-g0"], extra_include_paths=be.cuda_include_dirs(nvcc),
                  extra_ldflags=[*objs, *(f"-L{d}" for d in lib_dirs), *(f"-l{lib}" for lib in libs)])


UNAVAILABLE = _ext.load("sparse_engine._cuda_C", _registered, jit_build,
                        "build it with SPARSE_ENGINE_CUDA=1 pip install --no-build-isolation -e . (needs nvcc) "
                        "or set SPARSE_ENGINE_JIT=1")
if UNAVAILABLE:
    warnings.warn(f"sparse_engine: CUDA backend unavailable: {UNAVAILABLE}", RuntimeWarning, stacklevel=2)


def unsupported(impl: str, args: tuple) -> str:
    """Hook read by backends.select: the CUDA compact_linear kernels take CSR values only."""
    position = {"compact_linear_fwd": 2, "compact_linear_bwd": 3}.get(impl)
    if position is None or len(args) <= position:
        return ""
    w_values = args[position]
    if isinstance(w_values, Tensor) and w_values.dim() != 1:
        return f"the CUDA compact_linear takes CSR values (nnz,), got BSR values of shape {tuple(w_values.shape)}"
    return ""


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def index_errors(device: torch.device | int | None = None) -> int:
    """Read and clear the kernels' index-error word for ``device`` (synchronises). 0 means none."""
    if device is None:
        device = torch.cuda.current_device()
    index = device.index if isinstance(device, torch.device) else int(device)
    return int(torch.ops.sparse_engine_cuda.index_error(index if index is not None else torch.cuda.current_device()))


def _raise_on_index_error(t: Tensor, what: str) -> None:
    if DEBUG and index_errors(t.device):
        raise ValueError(f"compact_linear {what}: an index entry (crow/ccol pointer, col, row, row_t or perm) is out "
                         "of range; those entries were skipped. Rebuild the index or call index.validate()")


def _guard(arg: str, *, csr_only: bool = False):
    """The argument check (see _ext.takes), then the kernel on the argument's device."""
    def deco(fn):
        @_ext.takes("CUDA", arg, SUPPORTED_DTYPES, device_type="cuda", csr_only=csr_only)
        @functools.wraps(fn)
        def on_device(*args, **kwargs):
            t = kwargs[arg] if arg in kwargs else args[position]
            with torch.cuda.device(t.device):
                return fn(*args, **kwargs)

        position = list(inspect.signature(fn).parameters).index(arg)
        return on_device

    return deco


@_guard("w")
def reparam_fwd(m: Tensor | None, w: Tensor, mask: Tensor | None) -> Tensor:
    return torch.ops.sparse_engine_cuda.reparam_fwd(m, w, mask, _stream(w))


@_guard("w")
def reparam_bwd(grad: Tensor, m: Tensor | None, w: Tensor, mask: Tensor | None) -> tuple[Tensor | None, Tensor]:
    g_m, g_w = torch.ops.sparse_engine_cuda.reparam_bwd(grad, m, w, mask, _stream(w))
    return (g_m if m is not None else None), g_w


@_guard("w")
def signin_reset(m: Tensor, w: Tensor, mask: Tensor | None, beta: float) -> tuple[Tensor, Tensor]:
    return tuple(torch.ops.sparse_engine_cuda.signin_reset(m, w, mask, float(beta), _stream(w)))  # type: ignore


@_guard("w_values", csr_only=True)
def compact_linear_fwd(
    x: Tensor, m_values: Tensor | None, w_values: Tensor, bias: Tensor | None,
    crow: Tensor, col: Tensor, row: Tensor, ccol: Tensor, row_t: Tensor, perm: Tensor,
    out_features: int, in_features: int,
) -> Tensor:
    y = torch.ops.sparse_engine_cuda.compact_linear_fwd(
        x, m_values, w_values, bias, crow, col, row, ccol, row_t, perm, int(out_features), int(in_features),
        _stream(x))
    _raise_on_index_error(x, "forward")
    return y


@_guard("w_values", csr_only=True)
def compact_linear_bwd(
    grad_y: Tensor, x: Tensor, m_values: Tensor | None, w_values: Tensor,
    crow: Tensor, col: Tensor, row: Tensor, ccol: Tensor, row_t: Tensor, perm: Tensor,
    out_features: int, in_features: int, needs_x_grad: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """(g_x (B, K) | None, g_m_values | None, g_w_values); needs_x_grad=False skips the dX launch."""
    g_x, g_m, g_w = torch.ops.sparse_engine_cuda.compact_linear_bwd(
        grad_y, x, m_values, w_values, crow, col, row, ccol, row_t, perm, int(out_features), int(in_features),
        bool(needs_x_grad), _stream(x))
    _raise_on_index_error(x, "backward")
    return (g_x if needs_x_grad else None), (g_m if m_values is not None else None), g_w


@_guard("param")
def fused_step(
    param: Tensor, grad: Tensor, buf1: Tensor | None, buf2: Tensor | None, mask: Tensor | None, lr: Tensor,
    step: int, kind: str, momentum: float, dampening: float, nesterov: bool, beta1: float, beta2: float,
    eps: float, weight_decay: float, alpha: float, maximize: bool,
) -> None:
    fused_step_multi([param], [grad], [buf1], [buf2], [mask], lr, step, kind, momentum=momentum,
                     dampening=dampening, nesterov=nesterov, beta1=beta1, beta2=beta2, eps=eps,
                     weight_decay=weight_decay, alpha=alpha, maximize=maximize)


def fused_step_multi(
    params: Sequence[Tensor], grads: Sequence[Tensor], buf1: Sequence[Tensor | None],
    buf2: Sequence[Tensor | None], masks: Sequence[Tensor | None], lr: Tensor, step: int, kind: str, *,
    momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False, beta1: float = 0.9,
    beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0, alpha: float = 0.0,
    maximize: bool = False,
) -> None:
    """fused_step_ref on every tensor of a group (same dtype, device, hyperparameters) in one launch
    (per 40 tensors). ``lr`` should be a 0-dim tensor on the parameters' device (no host sync)."""
    if not params:
        return
    with torch.cuda.device(params[0].device):
        torch.ops.sparse_engine_cuda.fused_step(
            list(params), list(grads), list(buf1), list(buf2), list(masks), lr, int(step), str(kind),
            float(momentum), float(dampening), bool(nesterov), float(beta1), float(beta2), float(eps),
            float(weight_decay), float(alpha), bool(maximize), _stream(params[0]))
