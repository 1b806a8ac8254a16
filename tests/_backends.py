"""Shared helpers of the per-op tests: the backend parametrization, device × dtype grid, input makers.

Every op test is parametrised over ``BACKENDS`` (decorator ``over_backends``); a backend that cannot run
the case skips with the reason ``sparse_engine.ops.backends`` gives (missing module, missing function, wrong
device, unsupported dtype, or the backend's own ``unsupported`` hook), prefixed by the backend name, e.g.
``triton: sparse_engine.kernels.masked_linear does not exist (no triton kernel for masked_linear)``.
Triton runs on CPU tensors through the interpreter (conftest sets TRITON_INTERPRET=1 when no GPU is
visible) because ``backends.force("triton")`` counts as an explicit request.

``DEVICE_DTYPES`` holds the CPU rows (fp32, fp16, fp64) and the ``gpu``-marked CUDA rows (fp32, fp16,
bf16): ``pytest -m gpu`` runs only the latter, on a GPU machine.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterable, Iterator

import pytest
import torch

from sparse_engine.ops import backends

BACKENDS = backends.BACKENDS  # ("reference", "triton", "cpp", "cuda")

CPU_DTYPES = (torch.float32, torch.float16, torch.float64)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


DEVICE_DTYPES = [pytest.param("cpu", d, id=f"cpu-{_dtype_id(d)}") for d in CPU_DTYPES] + [
    pytest.param("cuda", d, id=f"cuda-{_dtype_id(d)}", marks=pytest.mark.gpu) for d in GPU_DTYPES
]

#: mask densities of the grid; None = no mask at all
DENSITIES = (None, 0.0, 0.1, 0.5, 1.0)


#: decorate a test taking a ``backend`` argument to run it on every backend (skipping with a reason)
over_backends = pytest.mark.parametrize("backend", BACKENDS)


def require(backend: str, impls: Iterable[str], device: str | torch.device,
            dtype: torch.dtype | None) -> None:
    """Skip (printing why) unless ``backend`` can run every impl in ``impls`` on ``device`` / ``dtype``."""
    for impl in impls:
        why = backends.reason(backend, impl, device, dtype, explicit=True)
        if why:
            pytest.skip(f"{backend}: {why}")


@contextlib.contextmanager
def run_on(backend: str) -> Iterator[None]:
    """Force ``backend``; a backend that rejects these exact arguments (its ``unsupported`` hook) skips.

    Only the error that ``backends.select`` raises for an unmet request is turned into a skip; anything
    a kernel raises while running is a failure.
    """
    with backends.force(backend):
        try:
            yield
        except RuntimeError as e:
            if str(e).startswith(f"backend {backend!r} was requested for"):
                pytest.skip(f"{backend}: {e}")
            raise


def make_mask(shape, density: float | None, device="cpu") -> torch.Tensor | None:
    """None, all-False, all-True, or a random bool mask of about ``density``."""
    if density is None:
        return None
    if density == 0.0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    if density == 1.0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    return torch.rand(shape, device=device) < density


def randn(*shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Fresh N(0, 1) values bounded away from zero, so that nothing can pass by being zero."""
    t = torch.randn(*shape, device=device)
    t = t + 0.1 * torch.sign(t) + (t == 0).to(t.dtype)
    return t.to(dtype)


def leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone().requires_grad_(True)


def upcast_leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    """The same values in float64, as a fresh leaf (for the reference side of a comparison)."""
    return None if t is None else t.detach().to(torch.float64).requires_grad_(True)


def grads(out: torch.Tensor, inputs: list, grad_out: torch.Tensor) -> list:
    """Gradients of ``out`` w.r.t. each input (None entries stay None)."""
    live = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(out, live, grad_out, allow_unused=False))
    return [None if t is None else next(got) for t in inputs]


def assert_zero_where(t: torch.Tensor | None, off: torch.Tensor | None, what: str) -> None:
    """``t`` must be exactly 0 where ``off`` is True (pruned coordinates: invariant 5 of test_invariants.py)."""
    if t is None or off is None or not bool(off.any()):
        return
    bad = int((t.detach()[off] != 0).sum())
    assert bad == 0, f"{what}: {bad} pruned coordinates are not exactly zero"


def require_cpp_extension(cpp) -> None:
    """Skip when there is no C++ compiler and no prebuilt extension; fail when a compiler is present
    but ``cpp`` (sparse_engine.ops._cpp) says the extension is unavailable."""
    if cpp.UNAVAILABLE:
        if shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++"):
            pytest.fail(f"a C++ compiler is present but the C++ extension is unavailable: {cpp.UNAVAILABLE}")
        pytest.skip(f"no C++ compiler and no prebuilt extension: {cpp.UNAVAILABLE}")


def check_compact_linear_kernel(mod, close, x, m, w, bias, gy, fields, n: int, k: int, dtype) -> tuple:
    """A compiled backend ``mod``'s compact_linear_fwd / _bwd against the float64 reference: y and every
    gradient through ``close(actual, expected, magnitude, dtype, what)`` (magnitude: the reference on
    absolute values), no g_m without m, and without dX the very same weight gradients. Returns
    (g_x, g_m, g_w)."""
    from sparse_engine.ops import reference as R

    up = (lambda t: None if t is None else t.double())
    ab = (lambda t: None if t is None else t.double().abs())
    y = mod.compact_linear_fwd(x, m, w, bias, *fields, n, k)
    y_ref = R.compact_linear_ref(x.double(), up(m), w.double(), up(bias), *fields, n, k)
    close(y, y_ref, R.compact_linear_ref(ab(x), ab(m), ab(w), ab(bias), *fields, n, k), dtype, "y")
    g_x, g_m, g_w = mod.compact_linear_bwd(gy, x, m, w, *fields, n, k)
    r_x, r_m, r_w = R.compact_linear_backward_ref(gy.double(), x.double(), up(m), w.double(), *fields, n, k)
    a_x, a_m, a_w = R.compact_linear_backward_ref(ab(gy), ab(x), ab(m), ab(w), *fields, n, k)
    close(g_x, r_x, a_x, dtype, "g_x")
    close(g_w, r_w, a_w, dtype, "g_w_values")
    if m is not None:
        close(g_m, r_m, a_m, dtype, "g_m_values")
    else:
        assert g_m is None
    # without dX (the first layer): no g_x, and the weight gradients are the very same numbers
    n_x, n_m, n_w = mod.compact_linear_bwd(gy, x, m, w, *fields, n, k, needs_x_grad=False)
    assert n_x is None
    assert torch.equal(n_w, g_w), "g_w_values differs with needs_x_grad=False"
    assert (n_m is None) if m is None else torch.equal(n_m, g_m), "g_m_values differs with needs_x_grad=False"
    return g_x, g_m, g_w
