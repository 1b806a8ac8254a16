"""The CUDA kernels of sparse_engine.ops._cuda against their references (marker ``gpu``).

compact_linear (CSR: forward SpMM, dX by the transposed SpMM, SDDMM with the g_m/g_w epilogue) over both
kernel paths (batch <= 8: row-major, lanes over the row; larger: batch-contiguous, lanes over the batch;
SDDMM switches at 32), the multi-tensor fused_step (one launch for a group, several launches past 40
tensors), reparam and signin_reset, in float32 and float64, plus the error paths.

Skipped, saying why, without a GPU (conftest) or without the CUDA extension. On a GPU machine build it
with ``SPARSE_ENGINE_CUDA=1 pip install --no-build-isolation -e .`` or run with ``SPARSE_ENGINE_JIT=1``.
"""
from __future__ import annotations

import pytest
import torch

from sparse_engine.ops import backends, reference as R
from sparse_engine import layout

from _backends import check_compact_linear_kernel
from _tolerances import assert_close

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float64]


@pytest.fixture(scope="module")
def cu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: none visible to torch")
    import sparse_engine.ops._cuda as module

    if module.UNAVAILABLE:
        pytest.skip(f"CUDA extension unavailable: {module.UNAVAILABLE}")
    return module


def _index(n, k, density, *, empty=False):
    mask = torch.rand(n, k) < density
    if density >= 1.0:
        mask[:] = True
    if empty and n > 1 and k > 1:
        mask[n // 2] = False
        mask[:, k // 3] = False
    return layout.CSRIndex.from_mask(mask).to("cuda")


def _fields(idx):
    return (idx.crow, idx.col, idx.row, idx.ccol, idx.row_t, idx.perm)


#: a sum of products in the dtype is within ~(terms) * eps * sum|products| of the exact value
_SUM_TOL = {torch.float32: 64 * 2**-24, torch.float64: 64 * 2**-53}


def _close(actual, expected, magnitude, dtype, what):
    """Elementwise |actual - expected| <= tol * sum|terms|: the kernels accumulate in the input dtype with
    FMAs (no TF32). Relative to the sum of absolute products, not to max|expected|, which fails
    spuriously when terms cancel."""
    assert actual.is_cuda and actual.dtype == dtype and actual.shape == expected.shape, what
    err = (actual.double() - expected).abs().cpu()
    bad = err > _SUM_TOL[dtype] * magnitude.cpu()
    assert not bool(bad.any()), f"{what} ({dtype}): {int(bad.sum())} elements off, worst error {float(err.max()):.3g}"


def _check_linear(cu, n, k, b, density, dtype, *, use_m=True, use_bias=True, empty=False):
    idx = _index(n, k, density, empty=empty)
    nnz = idx.nnz
    dev = "cuda"
    m = (torch.rand(nnz, dtype=dtype, device=dev) + 0.5) if use_m else None
    w = torch.randn(nnz, dtype=dtype, device=dev)
    bias = torch.randn(n, dtype=dtype, device=dev) if use_bias else None
    x = torch.randn(b, k, dtype=dtype, device=dev)
    gy = torch.randn(b, n, dtype=dtype, device=dev)
    check_compact_linear_kernel(cu, _close, x, m, w, bias, gy, _fields(idx), n, k, dtype)
    assert cu.index_errors() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 0.001, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (1, 129), (129, 7), (300, 257)], ids=str)
def test_compact_linear(cu, shape, density, dtype):
    n, k = shape
    for b in (1, 3, 8, 9, 31, 32, 100):
        _check_linear(cu, n, k, b, density, dtype, use_m=b % 2 == 1, use_bias=b != 3)


@pytest.mark.parametrize("batch", [1, 8, 20, 64])
def test_compact_linear_empty_row_and_column(cu, batch):
    _check_linear(cu, 40, 37, batch, 0.3, torch.float32, empty=True)


def test_compact_linear_large(cu):
    _check_linear(cu, 1024, 2048, 256, 0.05, torch.float32)


def test_index_errors_are_caught_in_debug_mode(cu, monkeypatch):
    idx = _index(20, 30, 0.3)
    w = torch.randn(idx.nnz, device="cuda")
    col = idx.col.clone()
    col[0] = 10**6
    f = (idx.crow, col, idx.row, idx.ccol, idx.row_t, idx.perm)
    monkeypatch.setattr(cu, "DEBUG", True)
    for b in (2, 40):
        x = torch.randn(b, 30, device="cuda")
        with pytest.raises(ValueError, match="out of range"):
            cu.compact_linear_fwd(x, None, w, None, *f, 20, 30)
        with pytest.raises(ValueError, match="out of range"):
            cu.compact_linear_bwd(torch.randn(b, 20, device="cuda"), x, None, w, *f, 20, 30)
        with pytest.raises(ValueError, match="out of range"):  # the SDDMM alone still flags it
            cu.compact_linear_bwd(torch.randn(b, 20, device="cuda"), x, None, w, *f, 20, 30, needs_x_grad=False)
    assert cu.index_errors() == 0  # read-and-clear


def test_errors(cu):
    idx = _index(20, 30, 0.3)
    f = _fields(idx)
    w = torch.randn(idx.nnz, device="cuda")
    with pytest.raises(ValueError, match="CUDA tensor"):
        cu.compact_linear_fwd(torch.randn(2, 30), None, w.cpu(), None, *f, 20, 30)
    with pytest.raises(ValueError, match="int32 index range"):
        cu.compact_linear_fwd(torch.randn(2, 30, device="cuda"), None, w, None, *f, 2**31, 30)
    with pytest.raises(ValueError, match="crow must be"):
        cu.compact_linear_fwd(torch.randn(2, 30, device="cuda"), None, w, None, idx.crow[:-1], *f[1:], 20, 30)
    bsr = layout.BSRIndex.from_mask(torch.rand(20, 30) < 0.3, (4, 4)).to("cuda")
    wb = torch.randn(bsr.nnzb, 4, 4, device="cuda")
    assert "CSR" in cu.unsupported("compact_linear_fwd", (None, None, wb))
    with backends.force("cuda"), pytest.raises(ValueError, match="CSR"):
        cu.compact_linear_fwd(torch.randn(2, 30, device="cuda"), None, wb, None, *_fields(bsr), 20, 30)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("use_m", [True, False])
@pytest.mark.parametrize("use_mask", [True, False])
def test_reparam(cu, dtype, use_m, use_mask):
    shape = (257, 129)
    w = torch.randn(shape, dtype=dtype, device="cuda")
    m = torch.randn(shape, dtype=dtype, device="cuda") if use_m else None
    mask = (torch.rand(shape, device="cuda") < 0.3) if use_mask else None
    if mask is not None:
        w[~mask] = float("nan")
    assert_close(cu.reparam_fwd(m, w, mask).cpu(), R.reparam_ref(m, w, mask).cpu(), dtype, "theta", elementwise=True)
    grad = torch.randn(shape, dtype=dtype, device="cuda")
    g_m, g_w = cu.reparam_bwd(grad, m, w, mask)
    r_m, r_w = R.reparam_backward_ref(grad, m, w, mask)
    assert_close(g_w.cpu(), r_w.cpu(), dtype, "g_w", elementwise=True)
    if use_m:
        assert_close(g_m.cpu(), r_m.cpu(), dtype, "g_m", elementwise=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", [1e-6, 1.0, 10.0])
def test_signin_reset(cu, dtype, beta):
    m = torch.randn(5000, dtype=dtype, device="cuda") * 2
    w = torch.randn(5000, dtype=dtype, device="cuda")
    w[:3] = torch.tensor([0.0, 1e-30, -1e-30])
    mask = torch.rand(5000, device="cuda") < 0.5
    mo, wo = cu.signin_reset(m, w, mask, beta)
    rm, rw = R.signin_reset_ref(m, w, mask, beta)
    assert_close(mo.cpu(), rm.cpu(), dtype, "m", elementwise=True)
    assert_close(wo.cpu(), rw.cpu(), dtype, "w", elementwise=True)


def _step_args(kind, i):
    if kind == "sgd":
        return dict(momentum=0.9, dampening=0.1 * (i % 2), nesterov=i % 3 == 0, beta1=0.9, beta2=0.999, eps=1e-8,
                    weight_decay=1e-2, alpha=1e-3 * (i % 2), maximize=i % 4 == 1)
    return dict(momentum=0.0, dampening=0.0, nesterov=False, beta1=0.9 if i % 2 else 0.3, beta2=0.99, eps=1e-8,
                weight_decay=1e-2, alpha=1e-3 * (i % 2), maximize=i % 4 == 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("count", [1, 3, 45])
@pytest.mark.parametrize("step", [1, 4])
def test_fused_step_multi(cu, dtype, kind, count, step):
    cfg = _step_args(kind, count + step)
    shapes = [(1,), (7, 5), (1029,), (33, 65), (0,), (4096,)]
    params, grads, b1s, b2s, masks = [], [], [], [], []
    for i in range(count):
        shape = shapes[i % len(shapes)]
        params.append(torch.randn(shape, dtype=dtype, device="cuda"))
        grads.append(torch.randn(shape, dtype=dtype, device="cuda"))
        b1s.append(torch.randn(shape, dtype=dtype, device="cuda"))
        b2s.append(torch.rand(shape, dtype=dtype, device="cuda") if kind == "adamw" else None)
        mask = (torch.rand(shape, device="cuda") < 0.5) if i % 2 else None
        if mask is not None:
            grads[-1][~mask] = float("nan")
        masks.append(mask)
    lr = torch.tensor(0.05, device="cuda")
    ref = [(p.clone(), b.clone(), None if c is None else c.clone()) for p, b, c in zip(params, b1s, b2s)]
    originals = [p.clone() for p in params]
    cu.fused_step_multi(params, grads, b1s, b2s, masks, lr, step, kind, **cfg)
    for i, (p, b, c) in enumerate(ref):
        R.fused_step_ref(p, grads[i], b, c, masks[i], lr, step, kind, cfg["momentum"], cfg["dampening"],
                         cfg["nesterov"], cfg["beta1"], cfg["beta2"], cfg["eps"], cfg["weight_decay"], cfg["alpha"],
                         cfg["maximize"])
        # atol relative to the inputs too: the (1,) tensor's state can be a near-cancellation
        g = grads[i][torch.isfinite(grads[i])]
        scale = max([float(t.abs().max()) for t in (originals[i], g, b1s[i], p, b) if t.numel()], default=0.0)
        assert_close(params[i].cpu(), p.cpu(), dtype, f"param[{i}]", elementwise=True, scale=scale)
        assert_close(b1s[i].cpu(), b.cpu(), dtype, f"buf1[{i}]", elementwise=True, scale=scale)
        if c is not None:
            assert_close(b2s[i].cpu(), c.cpu(), dtype, f"buf2[{i}]", elementwise=True,
                         scale=max(scale, float(c.abs().max()) if c.numel() else 0.0))
        if masks[i] is not None:
            assert torch.equal(params[i][~masks[i]], originals[i][~masks[i]])
            assert torch.all(b1s[i][~masks[i]] == 0)


def test_fused_step_single_matches_reference(cu):
    p = torch.randn(1000, device="cuda")
    g = torch.randn(1000, device="cuda")
    b = torch.zeros(1000, device="cuda")
    lr = torch.tensor(0.1, device="cuda")
    p2, b2 = p.clone(), b.clone()
    cu.fused_step(p, g, b, None, None, lr, 1, "sgd", 0.9, 0.0, False, 0.9, 0.999, 1e-8, 0.0, 0.0, False)
    R.fused_step_ref(p2, g, b2, None, None, lr, 1, "sgd", 0.9, 0.0, False, 0.9, 0.999, 1e-8, 0.0, 0.0, False)
    assert_close(p.cpu(), p2.cpu(), torch.float32, "param", elementwise=True)
    assert_close(b.cpu(), b2.cpu(), torch.float32, "buf1", elementwise=True)
