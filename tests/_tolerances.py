"""The one tolerance table of the op tests: one row per dtype, for CPU and for GPU runs.

How results are compared: the op runs in the test dtype; the reference runs on the *same* inputs upcast
to float64 (exact: upcasting a low-precision value loses nothing), so the table measures the error of
the op alone. Each entry is (rtol, atol) for ``torch.testing.assert_close`` where atol is *relative to
the largest magnitude of the expected tensor*: matmul errors scale with the size of the result, and an
all-zero expected tensor (density 0) must then come out exactly zero.

Why these numbers (eps = unit roundoff of the dtype):
* float64: rounding only (eps 1.1e-16, K ≤ 129 terms).
* float32: fp32 accumulation over K ≤ 129 terms; observed ~1e-6, bound 1e-5.
* float16: inputs are exactly representable, the kernel must accumulate in fp32 and round once
  (eps 4.9e-4); a kernel that accumulates in fp16 shows ~1e-2 and fails.
* bfloat16 (GPU only; the Triton interpreter computes bf16 wrongly): eps 3.9e-3.
* GPU float32: Triton's ``tl.dot`` on fp32 uses TF32 by default (10-bit mantissa, eps 4.9e-4 per
  product); torch's own fp32 matmul does not (``torch.backends.cuda.matmul.allow_tf32`` is False by
  default). The table allows TF32; a kernel that wants the strict row must use ``input_precision="ieee"``.
"""
from __future__ import annotations

import torch

#: dtype -> (rtol, atol relative to max |expected|) for CPU runs (reference, C++, Triton interpreter)
CPU_TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}

#: dtype -> (rtol, atol relative to max |expected|) for CUDA runs (TF32 allowed for float32)
GPU_TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (5e-3, 5e-3),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}

#: elementwise ops with no reduction (reparam, fused_step, signin_reset) are compared against the
#: reference run in the same dtype, so they need only a few units of roundoff
ELEMENTWISE_TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-6, 2e-6),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tolerance(dtype: torch.dtype, device: torch.device | str = "cpu", *, elementwise: bool = False):
    """(rtol, atol_rel) for results of ``dtype`` computed on ``device``."""
    table = ELEMENTWISE_TOL if elementwise else (GPU_TOL if torch.device(device).type == "cuda" else CPU_TOL)
    return table[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, *,
                 device: torch.device | str = "cpu", elementwise: bool = False, scale: float | None = None) -> None:
    """Compare ``actual`` (computed in ``dtype``) with ``expected`` (usually float64), naming ``what``.

    scale: the magnitude atol is relative to (default: max |expected|). Give the inputs' magnitude where the
    expected value may be a near-cancellation of them (an optimizer state of a one-element tensor).
    """
    assert isinstance(actual, torch.Tensor), f"{what}: expected a tensor, got {type(actual).__name__}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    rtol, atol_rel = tolerance(dtype, device, elementwise=elementwise)
    exp = expected.detach().to(torch.float64)
    if scale is None:
        scale = float(exp.abs().max()) if exp.numel() else 0.0
    torch.testing.assert_close(
        actual.detach().to(torch.float64).cpu(), exp.cpu(), rtol=rtol, atol=atol_rel * scale, equal_nan=False,
        msg=lambda m: f"{what} ({dtype}, rtol={rtol}, atol={atol_rel}*{scale:.3g}): {m}",
    )


def linear_terms_scale(x: torch.Tensor, m: torch.Tensor | None, w: torch.Tensor, mask: torch.Tensor | None,
                       bias: torch.Tensor | None) -> float:
    """Largest |x| |θ|ᵀ + |b| of y = x θᵀ + b (θ = M ⊙ m ⊙ w): the scale for y's atol. x θᵀ and b can nearly
    cancel (seen at 1×1×1 in fp16), leaving a result far smaller than the rounding of θ = m·w that the
    kernels do in the storage dtype; zero where the mask removes everything, so density 0 stays exact."""
    with torch.no_grad():
        theta = (w if m is None else m * w).detach().double().abs()
        if mask is not None:
            theta = torch.where(mask.to(theta.device), theta, torch.zeros_like(theta))
        terms = x.detach().double().abs() @ theta.t()
        if bias is not None:
            terms = terms + bias.detach().double().abs()
        return float(terms.max()) if terms.numel() else 0.0
