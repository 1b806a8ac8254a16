"""The direct sparse convolution (ops.sparse_conv2d; C++ kernel csrc/cpu/sparse_conv.cpp) against its
reference (reference.sparse_conv2d_ref / sparse_conv2d_backward_ref): output and every gradient, float32
and float64, odd sizes (1, 7, 13), stride 1 and 2, padding 0 / 1 / 2, kernels 1x1 / 3x3 / 5x5 (and a
non-square one), densities 0 (every row empty), 0.05, 0.5 (with an empty row) and 1, each instruction set
variant; gradcheck, opcheck, the error paths, and SparseConv2d / SparseConv1d with layout="csr" (which run
it) against layout="dense".

The C++ results are compared with the reference run in float64 on the same (upcast) inputs, with the
bound of a floating-point sum: |error| <= c * eps * sum|terms|, where sum|terms| is the same convolution
of the absolute values (a tolerance relative to max|expected| would fail spuriously on cancellations).
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from sparse_engine.ops import backends
from sparse_engine import ops
from sparse_engine.ops import reference as R
from sparse_engine.layout import BSRIndex, CSRIndex
from sparse_engine.nn import SparseConv1d, SparseConv2d

from _backends import require_cpp_extension  # noqa: E402

_cpp = pytest.importorskip("sparse_engine.ops._cpp", reason="sparse_engine.ops._cpp failed to import")


@pytest.fixture(autouse=True, scope="module")
def _need_extension():
    require_cpp_extension(_cpp)
    yield


#: c in c * eps * sum|terms|; the kernels' sums are blocked (vector lanes, batch chunks), so the observed
#: error is far below the n * eps worst case of a sequential sum
_SUM_TOL = {torch.float32: 64 * 2**-24, torch.float64: 64 * 2**-53}


def _assert_sums_close(actual, expected, magnitude, dtype, what):
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.dtype == dtype, (what, actual.dtype)
    err = (actual.double() - expected).abs()
    bound = _SUM_TOL[dtype] * magnitude
    bad = err > bound
    assert not bool(bad.any()), (
        f"{what} ({dtype}): {int(bad.sum())} of {err.numel()} elements exceed the sum bound; worst error "
        f"{float(err.max()):.3g}, bound there {float(bound.flatten()[err.flatten().argmax()]):.3g}")


def _mask(o: int, k: int, density: float) -> torch.Tensor:
    mask = torch.rand(o, k) < density
    if density >= 1.0:
        mask[:] = True
    elif 0 < density < 1 and o > 1:
        mask[o // 2] = False  # an output channel with no stored entry
    if density > 0 and not mask.any():  # a low density may draw nothing: keep one entry
        mask[torch.randint(o, ()), torch.randint(k, ())] = True
    return mask


def _fields(idx: CSRIndex) -> tuple[torch.Tensor, ...]:
    return (idx.crow, idx.col, idx.row, idx.ccol, idx.row_t, idx.perm)


def _randn(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def _check(b, c, o, hw, kernel, stride, padding, density, dtype, *, factored=True, use_bias=True, fmt="nchw"):
    """fmt: "nchw", or "nhwc" (x and grad_y channels_last: y and g_x must come out channels_last), or
    "nhwc-gy" (channels_last x, a contiguous grad_y: the kernel converts it)."""
    kh, kw = kernel
    h, w = hw
    idx = CSRIndex.from_mask(_mask(o, c * kh * kw, density))
    x = _randn(b, c, h, w, dtype=dtype)
    w_v = _randn(idx.nnz, dtype=dtype)
    m_v = _randn(idx.nnz, dtype=dtype) if factored else None
    bias = _randn(o, dtype=dtype) if use_bias else None
    dims = (o, kh, kw, stride, stride, padding, padding)
    cl = torch.channels_last
    xk = x.contiguous(memory_format=cl) if fmt != "nchw" else x
    y = _cpp.sparse_conv2d_fwd(xk, m_v, w_v, bias, *_fields(idx), *dims)
    gy = _randn(*y.shape, dtype=dtype)
    gyk = gy.contiguous(memory_format=cl) if fmt == "nhwc" else gy
    g_x, g_m, g_w = _cpp.sparse_conv2d_bwd(gyk, xk, m_v, w_v, *_fields(idx), *dims)
    if fmt != "nchw" and c > 1:  # (with one channel both formats are one layout)
        assert y.is_contiguous(memory_format=cl), y.stride()
        assert g_x.is_contiguous(memory_format=cl), g_x.stride()

    d = lambda t: None if t is None else t.double()  # noqa: E731
    a = lambda t: None if t is None else t.double().abs()  # noqa: E731
    y_ref = R.sparse_conv2d_ref(d(x), d(m_v), d(w_v), d(bias), *_fields(idx), *dims)
    y_mag = R.sparse_conv2d_ref(a(x), a(m_v), a(w_v), a(bias), *_fields(idx), *dims)
    what = f"B={b} C={c} O={o} {h}x{w} k={kernel} s={stride} p={padding} density={density}"
    _assert_sums_close(y, y_ref, y_mag, dtype, f"y {what}")
    gx_ref, gm_ref, gw_ref = R.sparse_conv2d_backward_ref(d(gy), d(x), d(m_v), d(w_v), *_fields(idx), *dims)
    gx_mag, gm_mag, gw_mag = R.sparse_conv2d_backward_ref(a(gy), a(x), a(m_v), a(w_v), *_fields(idx), *dims)
    _assert_sums_close(g_x, gx_ref, gx_mag, dtype, f"g_x {what}")
    _assert_sums_close(g_w, gw_ref, gw_mag, dtype, f"g_w_values {what}")
    if factored:
        _assert_sums_close(g_m, gm_ref, gm_mag, dtype, f"g_m_values {what}")
    else:
        assert g_m is None
    return y_ref


# ------------------------------------------------------------------------------ the grid


_SPATIAL = [(7, 13), (13, 7), (1, 7), (13, 13)]
_GRID = list(itertools.product([(1, 1), (3, 3), (5, 5)], [1, 2], [0, 1, 2]))


@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("kernel,stride,padding", _GRID, ids=[f"k{k[0]}-s{s}-p{p}" for k, s, p in _GRID])
def test_matches_reference(kernel, stride, padding, density, dtype, fmt):
    i = _GRID.index((kernel, stride, padding))
    h, w = _SPATIAL[i % len(_SPATIAL)]
    # too small for the kernel after padding: grow to the smallest valid size (1 stays 1 where it can)
    h, w = max(h, kernel[0] - 2 * padding), max(w, kernel[1] - 2 * padding)
    b, c, o = (2, 3, 7) if i % 2 else (3, 7, 1 if density == 1.0 else 5)
    y = _check(b, c, o, (h, w), kernel, stride, padding, density, dtype, factored=i % 3 != 0,
               use_bias=i % 4 != 1, fmt=fmt if fmt == "nchw" or i % 3 else "nhwc-gy")
    if density > 0:
        assert y.abs().max() > 0  # a test that compares zeros would prove nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_non_square_kernel_and_a_wider_layer(dtype):
    _check(4, 16, 24, (13, 11), (3, 5), 1, 2, 0.1, dtype)
    _check(3, 8, 9, (12, 14), (5, 3), 2, 1, 0.3, dtype, factored=False)


def _isa_or_skip(name: str):
    """use_isa(name), or a skip saying why where this CPU cannot run that variant."""
    before = _cpp.isa()
    if not _cpp.set_isa(name):
        pytest.skip(f"this CPU cannot run the {name} kernels")
    _cpp.set_isa(before)
    return _cpp.use_isa(name)


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_every_isa(isa):
    with _isa_or_skip(isa):
        for dtype, fmt in itertools.product((torch.float32, torch.float64), ("nchw", "nhwc")):
            _check(3, 5, 6, (13, 7), (3, 3), 1, 1, 0.5, dtype, fmt=fmt)
            _check(2, 4, 7, (7, 13), (5, 5), 2, 2, 0.5, dtype, fmt=fmt)
            # 8 or more channels and pixels: the channels_last copies' 8x8 register blocks and their edges
            _check(2, 16, 24, (9, 19), (3, 3), 1, 1, 0.3, dtype, fmt=fmt)
            _check(2, 9, 17, (12, 17), (3, 3), 2, 1, 0.3, dtype, fmt=fmt)


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_row_copies_at_every_width(isa):
    """The stride-1 layout changes (x padded, grad_y margined, g_x folded back, the output rows with their
    bias) at image widths on both sides of one and two vectors of every instruction set and dtype."""
    with _isa_or_skip(isa):
        for dtype, fmt in itertools.product((torch.float32, torch.float64), ("nchw", "nhwc")):
            for w in (1, 4, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 40):
                for padding in (0, 1, 2):
                    if w + 2 * padding >= 3:
                        _check(2, 3, 4, (5, w), (3, 3), 1, padding, 0.5, dtype, use_bias=padding != 2,
                               fmt=fmt)


def test_batch_chunks_and_threads_give_the_same_result():
    """dθ is summed in a fixed number of batch chunks: bitwise the same for any thread count."""
    idx = CSRIndex.from_mask(_mask(6, 4 * 9, 0.5))
    x, gy = torch.randn(19, 4, 9, 9), torch.randn(19, 6, 9, 9)
    w_v = torch.randn(idx.nnz)
    dims = (6, 3, 3, 1, 1, 1, 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _cpp.sparse_conv2d_bwd(gy, x, None, w_v, *_fields(idx), *dims)
        torch.set_num_threads(2)
        two = _cpp.sparse_conv2d_bwd(gy, x, None, w_v, *_fields(idx), *dims)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[2], two[2])


def test_backward_without_x_grad():
    idx = CSRIndex.from_mask(_mask(5, 3 * 9, 0.5))
    x, gy = torch.randn(2, 3, 7, 7), torch.randn(2, 5, 4, 4)
    m_v, w_v = torch.randn(idx.nnz), torch.randn(idx.nnz)
    dims = (5, 3, 3, 2, 2, 1, 1)
    full = _cpp.sparse_conv2d_bwd(gy, x, m_v, w_v, *_fields(idx), *dims)
    skip = _cpp.sparse_conv2d_bwd(gy, x, m_v, w_v, *_fields(idx), *dims, needs_x_grad=False)
    assert skip[0] is None
    assert torch.equal(full[1], skip[1]) and torch.equal(full[2], skip[2])


# ------------------------------------------------------------------------- ops level: autograd


@pytest.mark.parametrize("factored", [False, True], ids=["masked", "factored"])
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0), (2, 2)])
def test_gradcheck_float64(stride, padding, factored):
    idx = CSRIndex.from_mask(_mask(4, 3 * 9, 0.5))
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    w_v = torch.randn(idx.nnz, dtype=torch.float64, requires_grad=True)
    m_v = torch.randn(idx.nnz, dtype=torch.float64, requires_grad=True) if factored else None
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    with backends.force("cpp"):
        assert torch.autograd.gradcheck(
            lambda x, m, w, b: ops.sparse_conv2d(x, m, w, idx, 3, b, stride, padding), (x, m_v, w_v, b),
            eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("factored", [False, True], ids=["masked", "factored"])
@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
def test_native_autograd_path(dtype, factored, use_bias):
    """The C++ backend's one-node autograd path (sparse_conv2d_train) gives the very bits of the custom op
    path (same kernels) for y and every gradient, with and without x's gradient."""
    if backends.extra("sparse_conv2d_fwd", torch.device("cpu"), dtype, "sparse_conv2d_train") is None:
        pytest.fail("the C++ backend is available but has no sparse_conv2d_train")
    idx = CSRIndex.from_mask(_mask(5, 3 * 9, 0.4))
    x, gy = _randn(2, 3, 8, 7, dtype=dtype), _randn(2, 5, 4, 4, dtype=dtype)
    w_v = _randn(idx.nnz, dtype=dtype)
    m_v = _randn(idx.nnz, dtype=dtype) if factored else None
    b = _randn(5, dtype=dtype) if use_bias else None

    def run(native: bool, x_grad: bool):
        leaves = [None if t is None else t.clone().requires_grad_(True) for t in (m_v, w_v, b)]
        xx = x.clone().requires_grad_(x_grad)
        with backends.force("cpp"), pytest.MonkeyPatch.context() as mp:
            if not native:
                mp.setattr(backends, "extra", lambda *a, **k: None)
            y = ops.sparse_conv2d(xx, leaves[0], leaves[1], idx, 3, leaves[2], 2, 1)
            y.backward(gy)
        return [y.detach(), xx.grad] + [None if t is None else t.grad for t in leaves]

    for x_grad in (True, False):
        got, want = run(True, x_grad), run(False, x_grad)
        for name, a, c in zip(("y", "g_x", "g_m", "g_w", "g_bias"), got, want):
            assert (a is None) == (c is None), f"{name}: present on one path only (x_grad={x_grad})"
            assert a is None or torch.equal(a, c), f"{name} differs between the native and the custom op path"
        assert (got[1] is None) == (not x_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_channels_last_gives_the_bits_of_contiguous(stride, padding, dtype):
    """channels_last x goes to the C++ node without a copy: y and x's gradient come out channels_last
    (as from nn.Conv2d), with the very bits of the contiguous call (the kernels compute in their own
    layout either way; the bias gradient is torch's sum); a non-contiguous x of another kind is copied and
    gives contiguous results."""
    idx = CSRIndex.from_mask(_mask(6, 4 * 9, 0.4))
    x, b = _randn(3, 4, 9, 8, dtype=dtype), _randn(6, dtype=dtype)
    w_v, m_v = _randn(idx.nnz, dtype=dtype), _randn(idx.nnz, dtype=dtype)
    gy = None

    def run(xx):
        nonlocal gy
        leaves = [t.clone().requires_grad_(True) for t in (m_v, w_v, b)]
        xx = xx.detach().requires_grad_(True)
        with backends.force("cpp"):
            y = ops.sparse_conv2d(xx, leaves[0], leaves[1], idx, 3, leaves[2], stride, padding)
            gy = _randn(*y.shape, dtype=dtype) if gy is None else gy
            y.backward(gy)
        return y.detach(), xx.grad, *(t.grad for t in leaves)

    want = run(x)
    cl = run(x.contiguous(memory_format=torch.channels_last))
    assert cl[0].is_contiguous(memory_format=torch.channels_last) and not cl[0].is_contiguous()
    assert cl[1].is_contiguous(memory_format=torch.channels_last) and not cl[1].is_contiguous()
    other = run(x.transpose(2, 3).contiguous().transpose(2, 3))  # (B, C, W, H) memory: neither format
    assert other[0].is_contiguous()
    for name, a, c, o in zip(("y", "g_x", "g_m", "g_w"), cl, want, other):
        assert torch.equal(a, c), f"{name}: channels_last differs from contiguous"
        assert torch.equal(o, c), f"{name}: a transposed x differs from contiguous"
    torch.testing.assert_close(cl[4], want[4])  # torch's sum of grad_y over (B, H, W) in memory order


@pytest.mark.parametrize("layout", ["csr", "dense"])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_sparse_conv2d_module_keeps_channels_last(in_channels, layout):
    """SparseConv2d in a model moved to channels_last: its output is channels_last, so the batch norm after
    it runs NHWC, and the model trains as the contiguous one. With one input channel the input is
    contiguous in both formats; the module then follows the format the model was moved to, as nn.Conv2d
    follows its weight's (the marker that carries it is not saved)."""
    torch.manual_seed(0)
    nn = torch.nn
    # (no conv bias: before a batch norm its gradient is rounding noise, different in each format)
    conv = SparseConv2d(in_channels, 8, 3, padding=1, bias=False, kind="signin", density=0.3, layout=layout)
    model = nn.Sequential(conv,
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 2))
    x = torch.randn(4, in_channels, 6, 6)
    with backends.force("cpp"):
        y = model(x)
        assert y.is_contiguous() and model[0](x).is_contiguous()
        y.sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        model.to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        out = model[0](xc)
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        yc = model(xc)
        yc.sum().backward()
    torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-6)
    for (name, p), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert not any("format" in k for k in model.state_dict())
    # sparsify / from_dense of a conv already in channels_last keeps the format
    dense = nn.Conv2d(in_channels, 8, 3, padding=1).to(memory_format=torch.channels_last)
    conv = SparseConv2d.from_dense(dense, kind="signin", density=0.3, layout=layout)
    with backends.force("cpp"):
        assert conv(xc).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("factored", [False, True], ids=["masked", "factored"])
def test_opcheck(factored):
    idx = CSRIndex.from_mask(_mask(6, 4 * 9, 0.5))
    x, b = torch.randn(3, 4, 9, 7), torch.randn(6)
    w_v = torch.randn(idx.nnz)
    m_v = torch.randn(idx.nnz) if factored else None
    dims = (6, 3, 3, 2, 1, 1, 0)
    y = ops._sparse_conv2d(x, m_v, w_v, b, *_fields(idx), *dims)
    gy = torch.randn_like(y)
    leaf = lambda t: None if t is None else t.clone().requires_grad_(True)  # noqa: E731
    with backends.force("cpp"):
        torch.library.opcheck(torch.ops.sparse_engine.sparse_conv2d.default,
                              (leaf(x), leaf(m_v), leaf(w_v), leaf(b), *_fields(idx), *dims))
        for needs_x_grad in (True, False):
            torch.library.opcheck(torch.ops.sparse_engine.sparse_conv2d_backward.default,
                                  (gy, x, m_v, w_v, *_fields(idx), *dims, needs_x_grad))


def test_ops_unbatched_and_empty_batch():
    idx = CSRIndex.from_mask(_mask(5, 2 * 9, 0.5))
    w_v = torch.randn(idx.nnz, dtype=torch.float64)
    x = torch.randn(2, 6, 6, dtype=torch.float64)
    y = ops.sparse_conv2d(x, None, w_v, idx, (3, 3), None, 1, 1)
    theta = idx.scatter(w_v).reshape(5, 2, 3, 3)
    torch.testing.assert_close(y, F.conv2d(x, theta, None, 1, 1), rtol=1e-12, atol=1e-12)
    empty = torch.randn(0, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    w_leaf = w_v.clone().requires_grad_(True)
    out = ops.sparse_conv2d(empty, None, w_leaf, idx, 3, None, 2, 1)
    assert out.shape == (0, 5, 3, 3)
    out.sum().backward()
    assert torch.equal(w_leaf.grad, torch.zeros_like(w_v))


def test_bad_input_names_the_argument():
    idx = CSRIndex.from_mask(_mask(4, 2 * 9, 0.5))
    w_v = torch.randn(idx.nnz)
    x = torch.randn(2, 2, 5, 5)
    with pytest.raises(TypeError, match="index must be a layout.CSRIndex"):
        bsr = BSRIndex.from_mask(torch.ones(4, 18, dtype=torch.bool), (2, 2))
        ops.sparse_conv2d(x, None, torch.randn(bsr.nnzb, 2, 2), bsr, 3)
    with pytest.raises(ValueError, match="x must have 2 channels"):
        ops.sparse_conv2d(torch.randn(2, 3, 5, 5), None, w_v, idx, 3)
    with pytest.raises(ValueError, match="kernel_size"):
        ops.sparse_conv2d(x, None, w_v, idx, 0)
    with pytest.raises(ValueError, match="stride"):
        ops.sparse_conv2d(x, None, w_v, idx, 3, None, (1, 0))
    with pytest.raises(ValueError, match="padding"):
        ops.sparse_conv2d(x, None, w_v, idx, 3, None, 1, -1)
    with pytest.raises(ValueError, match="too small"):
        ops.sparse_conv2d(torch.randn(2, 2, 2, 5), None, w_v, idx, 3)
    with pytest.raises(ValueError, match="w_values must have shape"):
        ops.sparse_conv2d(x, None, w_v[1:], idx, 3)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.sparse_conv2d(x, None, w_v, idx, 3, torch.randn(5))
    with pytest.raises(ValueError, match="x must have the weight dtype"):
        ops.sparse_conv2d(x.double(), None, w_v, idx, 3)


def test_corrupt_index_raises_in_the_kernel():
    idx = CSRIndex.from_mask(_mask(4, 2 * 9, 1.0))
    w_v = torch.randn(idx.nnz)
    x, gy = torch.randn(2, 2, 5, 5), torch.randn(2, 4, 5, 5)
    dims = (4, 3, 3, 1, 1, 1, 1)
    fields = list(_fields(idx))
    bad_col = fields[1].clone()
    bad_col[3] = 2 * 9
    with pytest.raises(ValueError, match=r"col\[3\] = 18 is out of range"):
        _cpp.sparse_conv2d_fwd(x, None, w_v, None, fields[0], bad_col, *fields[2:], *dims)
    bad_row_t = fields[4].clone()
    bad_row_t[0] = -1
    with pytest.raises(ValueError, match="row_t"):
        _cpp.sparse_conv2d_bwd(gy, x, None, w_v, *fields[:4], bad_row_t, fields[5], *dims)
    bad_perm = fields[5].clone()
    bad_perm[1] = idx.nnz
    with pytest.raises(ValueError, match="perm"):
        _cpp.sparse_conv2d_bwd(gy, x, None, w_v, *fields[:5], bad_perm, *dims)
    with pytest.raises(ValueError, match="w_values must be 1-D"):
        _cpp.sparse_conv2d_fwd(x, None, w_v.reshape(-1, 1, 1), None, *fields, *dims)


# --------------------------------------------------------------------------- nn: csr == dense


def _grads(mod):
    """Weight gradients in the dense weight shape, whatever the storage."""
    p = mod.param

    def dense(g):
        return (g if mod.storage == "dense" else p.index.scatter(g)).reshape(mod.weight_shape)

    return [dense(p.w.grad)] + ([dense(p.m.grad)] if p.m is not None else [])


_NN_CASES = [
    dict(cls=SparseConv2d, cin=5, cout=7, k=3, opts=dict(padding=1), spatial=(13, 7)),
    dict(cls=SparseConv2d, cin=4, cout=6, k=(5, 3), opts=dict(stride=2, padding=(2, 1)), spatial=(13, 12)),
    dict(cls=SparseConv2d, cin=3, cout=5, k=3, opts=dict(padding="same", padding_mode="reflect"), spatial=(7, 9)),
    dict(cls=SparseConv2d, cin=3, cout=4, k=4, opts=dict(padding="same"), spatial=(8, 7)),  # asymmetric pad
    dict(cls=SparseConv2d, cin=3, cout=4, k=3, opts=dict(dilation=2, padding=2), spatial=(9, 9)),  # unfold
    dict(cls=SparseConv1d, cin=4, cout=6, k=5, opts=dict(stride=2, padding=2), spatial=(13,)),
]


@pytest.mark.parametrize("kind", ["masked", "signin"])
@pytest.mark.parametrize("case", range(len(_NN_CASES)))
def test_nn_csr_matches_dense(case, kind, monkeypatch):
    spec = _NN_CASES[case]
    cls = spec["cls"]
    plain = cls._dense_cls(spec["cin"], spec["cout"], spec["k"], **spec["opts"], dtype=torch.float64)
    flat = plain.weight.shape[1] * plain.weight[0, 0].numel()
    mask = (torch.rand(spec["cout"], flat) < 0.3).reshape(plain.weight.shape)
    x = torch.randn(3, spec["cin"], *spec["spatial"], dtype=torch.float64)
    g = None
    results = {}
    direct = all(d == 1 for d in plain.dilation)
    for layout in ("dense", "csr"):
        mod = cls.from_dense(plain, kind=kind, mask=mask, layout=layout)
        xi = x.clone().requires_grad_(True)
        with monkeypatch.context() as mp:
            if layout == "csr" and direct:
                # the direct kernel must serve: no im2col on this path
                mp.setattr(F, "unfold", lambda *a, **k: pytest.fail("csr conv used F.unfold"))
            y = mod(xi)
        g = torch.randn_like(y) if g is None else g
        y.backward(g)
        results[layout] = [y.detach(), xi.grad, mod.bias.grad, *_grads(mod)]
    for a, b in zip(results["dense"], results["csr"]):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    assert results["dense"][0].abs().max() > 0


def test_nn_csr_float32_with_the_cpp_backend():
    plain = torch.nn.Conv2d(8, 12, 3, padding=1, stride=2)
    mask = torch.rand(plain.weight.shape) < 0.2
    x = torch.randn(4, 8, 15, 15)
    dense = SparseConv2d.from_dense(plain, kind="signin", mask=mask, layout="dense")
    csr = SparseConv2d.from_dense(plain, kind="signin", mask=mask, layout="csr")
    with backends.force("cpp"):
        y = csr(x)
    torch.testing.assert_close(y, dense(x), rtol=1e-5, atol=1e-5)


def test_auto_key_names_the_csr_conv_kernel():
    """layout="auto" caches measurements by key: the key must say which kernel the csr candidate ran, so
    that a measurement of the unfold path is never reused for the direct kernel (or the reverse)."""
    x = torch.randn(2, 4, 8, 8)
    mod = SparseConv2d(4, 6, 3, padding=1, kind="signin", density=0.2, layout="csr")
    assert mod._auto_key(x, mod.mask2d())["extra"]["csr_conv"] == "sparse_conv2d:cpp"
    with backends.force("reference"):
        assert mod._auto_key(x, mod.mask2d())["extra"]["csr_conv"] == "sparse_conv2d:reference"
    dilated = SparseConv2d(4, 6, 3, padding=2, dilation=2, kind="signin", density=0.2, layout="csr")
    assert dilated._auto_key(x, dilated.mask2d())["extra"]["csr_conv"] == "unfold+compact_linear"


def test_auto_layout_measures_in_the_models_memory_format():
    """layout="auto" in a channels_last model times its candidates on channels_last inputs (the probes keep
    the model's format) and keeps that decision apart from a contiguous model's."""
    from sparse_engine.nn import autolayout

    torch.manual_seed(0)
    keys = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        conv = SparseConv2d(1, 8, 3, padding=1, kind="signin", density=0.5, layout="auto")
        conv.to(memory_format=fmt)
        assert (conv._empty_copy()._memory_format() is not None) == (fmt is torch.channels_last)  # the probes
        x = torch.randn(8, 1, 10, 10).contiguous(memory_format=fmt)
        keys[fmt] = autolayout.tune(torch.nn.Sequential(conv), x)["0"].key
        y = conv(x)
        assert y.is_contiguous(memory_format=torch.channels_last) == (fmt is torch.channels_last)
    assert '"memory_format":"channels_last"' in keys[torch.channels_last]
    assert "memory_format" not in keys[torch.contiguous_format]
