"""Linear ops under autocast behave like F.linear: inputs cast to the autocast dtype, grads in the param dtype."""
import torch
import torch.nn.functional as F

from sparse_engine import ops
from sparse_engine.layout import CSRIndex


def test_masked_linear_under_cpu_autocast_matches_f_linear():
    x = torch.randn(5, 16)
    m = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(4, 16, requires_grad=True)
    mask = torch.rand(4, 16) < 0.5
    b = torch.randn(4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.masked_linear(x, m, w, mask, b)
        expect = F.linear(x, m * w * mask, b)
    assert y.dtype == expect.dtype == torch.bfloat16
    # Both round to bfloat16 (8 significant bits), in a different order: the op rounds x, m and w and
    # forms θ from the rounded factors; the expectation rounds x and θ = m ⊙ w ⊙ mask. Each path is within
    # a few units of 2^-8 of the exact result relative to Σ|x||θ| (cancellation makes |y| itself no
    # bound), plus the rounding of the output.
    scale = x.abs() @ (m * w * mask).abs().detach().t() + b.abs().detach()
    bound = 4 * 2.0 ** -8 * scale + 2.0 ** -8 * expect.float().abs()
    diff = (y.float() - expect.float()).abs()
    assert (diff <= bound).all(), (diff - bound).max()
    y.float().sum().backward()
    assert m.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32


def test_compact_linear_under_cpu_autocast_returns_autocast_dtype():
    mask = torch.rand(6, 10) < 0.3
    mask[0, 0] = True
    index = CSRIndex.from_mask(mask)
    w = torch.randn(index.nnz, requires_grad=True)
    x = torch.randn(3, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.compact_linear(x, None, w, index)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x @ index.scatter(w.detach()).t(), rtol=3e-2, atol=3e-2)
