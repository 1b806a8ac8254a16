"""The C++ (CPU) kernels of sparse_engine.ops._cpp against their references in reference.py.

Every compiled op: output and every gradient, float32 and float64, shapes with 1 and odd sizes, batch
sizes that hit every panel width of the SpMM/SDDMM kernels (1: gather path; 3, 17, 65, 200: one, two
and four vectors, several chunks with a ragged tail), densities 0 to 1 (0.5 ... 0.001), a layer with an
empty row and an empty column, CSR and BSR (edge blocks cut by the matrix border), and each instruction
set variant this CPU can run. Then the error paths: corrupt indices, sizes past int32, wrong dtypes.

The extension is built by ``pip install`` (csrc/build_ext.py). If it is missing, these tests fail when a
C++ compiler is present (a broken build must not pass CI as skips) and skip, saying why, otherwise.
"""
from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from sparse_engine.ops import backends, reference as R
from sparse_engine import layout, ops

from _tolerances import assert_close

from _backends import check_compact_linear_kernel, require_cpp_extension  # noqa: E402

from sparse_engine.export.infer import _col16  # 16-bit columns as the inference layers keep them

_cpp = pytest.importorskip("sparse_engine.ops._cpp", reason="sparse_engine.ops._cpp failed to import")


@pytest.fixture(autouse=True, scope="module")
def _need_extension():
    require_cpp_extension(_cpp)
    yield


DTYPES = [torch.float32, torch.float64]
ISAS = ["base", "avx2", "avx512"]


def _isa_or_skip(name: str):
    before = _cpp.isa()
    if not _cpp.set_isa(name):
        pytest.skip(f"this CPU cannot run the {name} kernels")
    _cpp.set_isa(before)
    return _cpp.use_isa(name)


# ------------------------------------------------------------------------------------ helpers


def _mask(n: int, k: int, density: float, *, empty_row: bool = False, empty_col: bool = False) -> torch.Tensor:
    mask = torch.rand(n, k) < density
    if density >= 1.0:
        mask[:] = True
    if empty_row and n > 1:
        mask[n // 2] = False
    if empty_col and k > 1:
        mask[:, k // 3] = False
    return mask


def _index(mask: torch.Tensor, block):
    return layout.CSRIndex.from_mask(mask) if block is None else layout.BSRIndex.from_mask(mask, block)


def _values(idx, dtype, *, positive: bool = False) -> torch.Tensor:
    """Random values in the layout; BSR edge padding is zero as the layout requires."""
    dense = torch.randn(idx.shape, dtype=dtype)
    if positive:
        dense = dense.abs() + 0.5
    return idx.gather(dense)


def _fields(idx):
    return (idx.crow, idx.col, idx.row, idx.ccol, idx.row_t, idx.perm)


#: error bound per unit roundoff-weighted magnitude: a sum of products computed in the dtype is within
#: ~(terms) * eps * sum|products| of the exact value; 64 covers K, B <= 257 with the kernels' blocked sums
_SUM_TOL = {torch.float32: 64 * 2**-24, torch.float64: 64 * 2**-53}


def _assert_sums_close(actual, expected, magnitude, dtype, what):
    """Elementwise |actual - expected| <= tol * sum|terms| (+ rtol): the bound of a floating-point sum.

    A tolerance relative to max|expected| fails spuriously when the terms cancel (a single output that is
    a small difference of large products); the sum of absolute products is the honest scale.
    """
    assert actual.shape == expected.shape and actual.dtype == dtype, (what, actual.shape, actual.dtype)
    err = (actual.double() - expected).abs()
    bound = _SUM_TOL[dtype] * magnitude + 1e-6 * _SUM_TOL[dtype] * expected.abs()
    bad = err > bound
    assert not bool(bad.any()), (
        f"{what} ({dtype}): {int(bad.sum())} of {err.numel()} elements exceed the sum bound; worst error "
        f"{float(err.max()):.3g}, bound there {float(bound.flatten()[err.flatten().argmax()]):.3g}")


def _check_compact_linear(n, k, b, density, block, dtype, *, use_m=True, use_bias=True, empty=False):
    mask = _mask(n, k, density, empty_row=empty, empty_col=empty)
    idx = _index(mask, block)
    m = _values(idx, dtype, positive=True) if use_m else None
    w = _values(idx, dtype)
    bias = torch.randn(n, dtype=dtype) if use_bias else None
    x = torch.randn(b, k, dtype=dtype)
    gy = torch.randn(b, n, dtype=dtype)
    _, _, g_w = check_compact_linear_kernel(_cpp, _assert_sums_close, x, m, w, bias, gy, _fields(idx), n, k,
                                            dtype)
    if block is not None and w.numel():
        # gradients of the zero padding of edge blocks are exactly zero
        pad = idx.gather(torch.ones(idx.shape, dtype=dtype)) == 0
        assert torch.all(g_w[pad] == 0)


# ------------------------------------------------------------------------------- compact_linear

SHAPES = [  # (N, K): ones, odd sizes, wide and tall
    (1, 1), (7, 5), (1, 129), (129, 7), (33, 64), (64, 33),
]
BATCHES = [1, 3, 17, 65, 200]
DENSITIES = [0.0, 0.001, 0.1, 0.5, 1.0]
BLOCKS = [None, (4, 8), (3, 5)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: "csr" if b is None else f"bsr{b[0]}x{b[1]}")
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_compact_linear_grid(shape, density, block, dtype):
    n, k = shape
    for b in BATCHES:
        _check_compact_linear(n, k, b, density, block, dtype, use_m=b % 2 == 1, use_bias=b != 3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: "csr" if b is None else f"bsr{b[0]}x{b[1]}")
@pytest.mark.parametrize("batch", [1, 2, 16, 33, 64])
def test_compact_linear_empty_row_and_column(batch, block, dtype):
    _check_compact_linear(40, 37, batch, 0.3, block, dtype, empty=True)


@pytest.mark.parametrize("density", [0.05, 0.01, 0.001])
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_compact_linear_high_sparsity_larger_layer(density, batch):
    _check_compact_linear(257, 511, batch, density, None, torch.float32)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compact_linear_every_isa(isa, dtype):
    with _isa_or_skip(isa):
        assert _cpp.isa() == isa
        for b in (1, 5, 20, 70):
            _check_compact_linear(45, 77, b, 0.2, None, dtype)
            _check_compact_linear(45, 77, b, 0.2, (8, 4), dtype, use_m=False)


@pytest.mark.parametrize("block", [None, (4, 8)], ids=["csr", "bsr4x8"])
@pytest.mark.parametrize("batch", [1, 64])
def test_compact_linear_backward_bitwise_repeatable_at_two_threads(block, batch):
    """Two identical backward calls at 2 threads give identical bits (the dX reduction order is fixed by
    the pattern, not by which thread ran which rows). Many calls: a schedule-dependent order shows up."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        if torch.get_num_threads() != 2:
            pytest.skip("torch cannot run 2 threads here")
        idx = _index(_mask(700, 900, 0.1), block)
        m, w = _values(idx, torch.float32, positive=True), _values(idx, torch.float32)
        x, gy = torch.randn(batch, 900), torch.randn(batch, 700)
        first = _cpp.compact_linear_bwd(gy, x, m, w, *_fields(idx), 700, 900)
        for _ in range(30):
            again = _cpp.compact_linear_bwd(gy, x, m, w, *_fields(idx), 700, 900)
            for name, a, b in zip(("g_x", "g_m", "g_w"), first, again):
                assert torch.equal(a, b), f"{name} differs between identical calls at 2 threads"
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", [None, (4, 8)], ids=["csr", "bsr4x8"])
def test_compact_linear_chunk_schedules_at_one_and_two_threads(block, dtype):
    """A batch of several panel chunks runs two ways: one thread packs, multiplies and unpacks chunk after
    chunk (forward and backward), threads pack all of x first and share the rows. Both against the
    reference, and the forward's bits are the same either way (each row's sum runs in one order)."""
    before = torch.get_num_threads()
    try:
        ys = []
        idx = _index(_mask(300, 400, 0.1), block)
        m, w = _values(idx, dtype, positive=True), _values(idx, dtype)
        x, bias = torch.randn(200, 400, dtype=dtype), torch.randn(300, dtype=dtype)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            if torch.get_num_threads() != threads:
                pytest.skip(f"torch cannot run {threads} threads here")
            _check_compact_linear(300, 400, 200, 0.1, block, dtype)
            _check_compact_linear(300, 400, 200, 0.1, block, dtype, use_m=False, use_bias=False)
            ys.append(_cpp.compact_linear_fwd(x, m, w, bias, *_fields(idx), 300, 400))
        assert torch.equal(ys[0], ys[1]), "the forward's bits differ between 1 and 2 threads"
    finally:
        torch.set_num_threads(before)


def test_compact_linear_empty_batch_and_zero_features():
    idx = _index(_mask(6, 4, 0.5), None)
    w = _values(idx, torch.float32)
    f = _fields(idx)
    y = _cpp.compact_linear_fwd(torch.randn(0, 4), None, w, None, *f, 6, 4)
    assert y.shape == (0, 6)
    g_x, _, g_w = _cpp.compact_linear_bwd(torch.randn(0, 6), torch.randn(0, 4), None, w, *f, 6, 4)
    assert g_x.shape == (0, 4) and torch.all(g_w == 0)
    g_x, _, g_w = _cpp.compact_linear_bwd(torch.randn(0, 6), torch.randn(0, 4), None, w, *f, 6, 4, False)
    assert g_x is None and torch.all(g_w == 0)
    idx0 = _index(torch.zeros(3, 0, dtype=torch.bool), None)
    y0 = _cpp.compact_linear_fwd(torch.randn(2, 0), None, torch.randn(0), torch.ones(3), *_fields(idx0), 3, 0)
    assert torch.equal(y0, torch.ones(2, 3))


def test_compact_linear_through_ops_autograd():
    """The registered op (sparse_engine.ops) on the cpp backend: output and autograd gradients."""
    idx = _index(_mask(31, 23, 0.2), None)
    m = _values(idx, torch.float64, positive=True).requires_grad_()
    w = _values(idx, torch.float64).requires_grad_()
    bias = torch.randn(31, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, 23, dtype=torch.float64, requires_grad=True)
    with backends.force("cpp"):
        y = ops.compact_linear(x, m, w, idx, bias)
        grads = torch.autograd.grad(y.square().sum(), (x, m, w, bias))
    x2, m2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, m, w, bias))
    y2 = R.compact_linear_ref(x2.reshape(-1, 23), m2, w2, b2, *_fields(idx), 31, 23).reshape(2, 5, 31)
    grads2 = torch.autograd.grad(y2.square().sum(), (x2, m2, w2, b2))
    assert_close(y, y2, torch.float64, "y")
    for name, g, g2 in zip(("x", "m", "w", "bias"), grads, grads2):
        assert_close(g, g2, torch.float64, f"grad {name}")


# ------------------------------------------------------------------ compact_linear_eager (training)


@pytest.mark.parametrize("block", [None, (4, 8)])
@pytest.mark.parametrize("with_m", [True, False])
def test_compact_linear_eager_matches_reference(block, with_m):
    """The lean eager entry of a module's forward: output and every gradient against the reference (float64),
    and the same bits as ops.compact_linear (the same C++ op behind it)."""
    n, k = 31, 23
    idx = _index(_mask(n, k, 0.3, empty_row=True), block)
    m = _values(idx, torch.float64).requires_grad_() if with_m else None
    w = _values(idx, torch.float64).requires_grad_()
    bias = torch.randn(n, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, k, dtype=torch.float64, requires_grad=True)
    leaves = [t for t in (x, m, w, bias) if t is not None]
    y = ops.compact_linear_eager(x, m, w, _fields(idx), bias, n, k)
    assert y is not None
    grads = torch.autograd.grad(y.square().sum(), leaves)
    y_op = ops.compact_linear(x, m, w, idx, bias)
    assert torch.equal(y, y_op)
    copies = [t.detach().clone().requires_grad_() for t in leaves]
    xr, *rest = copies
    mr, wr, br = (rest if with_m else [None, *rest])
    y_ref = R.compact_linear_ref(xr, mr, wr, br, *_fields(idx), n, k)
    assert_close(y, y_ref, torch.float64, "y")
    for t, g, g_ref in zip(leaves, grads, torch.autograd.grad(y_ref.square().sum(), copies)):
        assert_close(g, g_ref, torch.float64, f"grad {tuple(t.shape)}")


def test_compact_linear_eager_declines_what_it_does_not_cover():
    """None (the caller then takes ops.compact_linear, which checks and names what is wrong)."""
    idx, w, x, _ = _small_case()
    f = _fields(idx)
    assert ops.compact_linear_eager(x, None, w, f, None, 9, 11) is not None
    for bad_x in (x.double(), x[:, :10], x.t().contiguous().t(), x.reshape(2, 2, 11), x[:0], "x"):
        assert ops.compact_linear_eager(bad_x, None, w, f, None, 9, 11) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.compact_linear_eager(x, None, w, f, None, 9, 11) is None
    with backends.force("reference"):
        assert ops.compact_linear_eager(x, None, w, f, None, 9, 11) is None


# ---------------------------------------------------------------------------------------- all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["active", "pruned"])
@pytest.mark.parametrize("with_mask", [True, False])
def test_all_finite_matches_reference(dtype, bad, where, with_mask):
    """The C++ check against the reference, a non-finite value at an active or a pruned coordinate, every
    vector tail (sizes 0..37), several tensors with masks and without."""
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(n, generator=g, dtype=torch.float64).to(dtype) for n in (0, 1, 7, 16, 37)]
    tensors.append(torch.randn(5, 9, generator=g, dtype=torch.float64).to(dtype).t())  # non-contiguous
    masks = [torch.rand(t.shape, generator=g) < 0.5 if with_mask else None for t in tensors]
    if bad is not None:
        t, m = tensors[4], masks[4]
        if m is None:
            m = torch.ones(t.shape, dtype=torch.bool)
        pos = int((m if where == "active" else ~m).nonzero()[0, 0]) if (m if where == "active" else ~m).any() else 0
        t[pos] = bad
    expected = R.all_finite_ref(tensors, masks)
    assert _cpp.all_finite(tensors, masks) is expected
    assert ops.all_finite(tensors, masks) is expected
    assert torch.ops.sparse_engine_C.all_finite(tensors, masks) is expected  # the op the CPython entry skips
    if bad is not None and (where == "active" or not with_mask):
        assert expected is False
    if bad is None:
        assert expected is True


def test_all_finite_arguments():
    x = torch.randn(4)
    assert ops.all_finite([]) is True
    assert ops.all_finite([x, torch.randn(3, dtype=torch.float64)]) is True  # mixed dtypes: the reference
    with pytest.raises(ValueError, match="masks must have one entry per tensor"):
        ops.all_finite([x], [])
    with pytest.raises(ValueError, match="masks\\[0\\] must have shape"):
        ops.all_finite([x], [torch.ones(3, dtype=torch.bool)])
    with pytest.raises(ValueError, match="tensors\\[0\\] must be floating point"):
        ops.all_finite([torch.ones(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="masks must have one entry per tensor"):
        _cpp.all_finite([x], [])


# ------------------------------------------------------------- compact_linear_infer (eager inference)


@pytest.mark.parametrize("entry", ["python", "op"])
@pytest.mark.parametrize("block", [None, (4, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 3, 40])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.6])
def test_compact_linear_infer_matches_reference(entry, block, dtype, batch, density):
    """The CPython entry (and the registered op it falls back to in a JIT build) against the reference,
    with rows long and short enough for every tail of the batch-1 row loop (4 entries per step)."""
    infer = _cpp._infer_by_op if entry == "op" else _cpp.compact_linear_infer
    if entry == "python" and _cpp._INFER is None:
        pytest.skip("this build has no sparse_engine._C Python module (a JIT build): the op serves")
    n, k = 37, 71
    idx = _index(_mask(n, k, density, empty_row=True), block)
    w = _values(idx, dtype)
    bias = torch.randn(n, dtype=dtype)
    x = torch.randn(batch, k, dtype=dtype)
    for b in (bias, None):
        y = infer(x, w, b, idx.crow, idx.col, n, k)
        expected = R.compact_linear_ref(x, None, w, b, *_fields(idx), n, k)
        assert y.shape == (batch, n) and y.dtype == dtype
        assert_close(y, expected, dtype, f"infer {entry} {block} B={batch} d={density}")


def test_compact_linear_infer_rejects_bad_arguments():
    if _cpp._INFER is None:
        pytest.skip("this build has no sparse_engine._C Python module (a JIT build)")
    idx, w, x, _ = _small_case()
    col = idx.col.clone()
    col[idx.nnz // 2] = 11
    with pytest.raises(ValueError, match="out of range"):
        _cpp._INFER(x[:1], w, None, idx.crow, col, 9, 11)
    with pytest.raises(ValueError, match="crow"):
        _cpp._INFER(x, w, None, idx.crow[:-1], idx.col, 9, 11)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        _cpp._INFER(x, w, 1.0, idx.crow, idx.col, 9, 11)
    with pytest.raises(TypeError, match="7 arguments"):
        _cpp._INFER(x, w, None, idx.crow, idx.col, 9)


@pytest.mark.parametrize("entry", ["infer", "op"])
def test_compact_linear_infer_declines_what_is_the_ops(entry):
    """The lean entry computes nothing and answers None where x is a case for the registered op (a
    gradient is wanted, another dtype or device, a wrong width, an empty or 0-D x); it takes x with any
    leading dimensions, contiguous or not. ``infer`` is the entry the inference layers call (the CPython
    one, or the op in a JIT build)."""
    infer = _cpp._infer_by_op if entry == "op" else _cpp.compact_linear_infer
    idx, w, x, _ = _small_case()
    bias = torch.randn(9)
    args = (idx.crow, idx.col, 9, 11)
    assert infer(torch.randn(4, 12), w, bias, *args) is None
    assert infer(x.double(), w, bias, *args) is None
    assert infer(torch.randn(0, 11), w, bias, *args) is None
    assert infer(torch.tensor(1.0), w, bias, *args) is None
    for grad_of in ("x", "w", "bias"):
        xs, ws, bs = (t.clone().requires_grad_(name == grad_of) for name, t in (("x", x), ("w", w), ("bias", bias)))
        assert infer(xs, ws, bs, *args) is None
        with torch.no_grad():
            assert infer(xs, ws, bs, *args) is not None
    dense = idx.scatter(w)
    for xs in (x[:1], x[0], x.reshape(2, 2, 11), x.t().contiguous().t(), torch.randn(3, 2, 22)[..., ::2]):
        y = infer(xs, w, bias, *args)
        assert y.shape == (*xs.shape[:-1], 9)
        assert_close(y, xs @ dense.t() + bias, torch.float32, f"x {tuple(xs.shape)}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("entry", ["infer", "op"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 3, 17, 40, 200])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.6])
def test_16_bit_columns_give_the_int32_result(isa, entry, dtype, batch, density):
    """The CSR forward with 16-bit columns (what the inference layers pass where K <= 65536) against the
    reference and the int32 columns, every panel width, rows long and short enough for every tail of the
    batch-1 loop (4 entries per 64-bit index load). Same sums in the same order, but the compiler may
    contract a product and a sum into an FMA in one variant and not the other: equal within rounding.
    ``infer`` is the entry the inference layers call (the CPython one, or the op in a JIT build)."""
    infer = _cpp._infer_by_op if entry == "op" else _cpp.compact_linear_infer
    n, k = 37, 71
    idx = _index(_mask(n, k, density, empty_row=True), None)
    w = _values(idx, dtype)
    x = torch.randn(batch, k, dtype=dtype)
    for b in (torch.randn(n, dtype=dtype), None):
        with _isa_or_skip(isa):
            y32 = infer(x, w, b, idx.crow, idx.col, n, k)
            y16 = infer(x, w, b, idx.crow, _col16(idx.col), n, k)
        assert_close(y16, y32, dtype, f"16-bit vs int32 col, B={batch} d={density}")
        assert_close(y16, R.compact_linear_ref(x, None, w, b, *_fields(idx), n, k), dtype, "16-bit col")


@pytest.mark.parametrize("batch", [1, 5, 40])
def test_16_bit_columns_reach_65535(batch):
    """K = 65536, the widest layer whose columns fit 16 bits: columns 32768.. (negative as int16) are read
    unsigned, up to the last column 65535."""
    n, k = 3, 65536
    mask = torch.zeros(n, k, dtype=torch.bool)
    mask[:, torch.tensor([0, 1, 32767, 32768, 40000, 65534, 65535])] = True
    mask[1, 65535] = False
    idx = _index(mask, None)
    w = _values(idx, torch.float64)
    x = torch.randn(batch, k, dtype=torch.float64)
    y16 = _cpp.compact_linear_infer(x, w, None, idx.crow, _col16(idx.col), n, k)
    assert_close(y16, R.compact_linear_ref(x, None, w, None, *_fields(idx), n, k), torch.float64, "K=65536")


def test_16_bit_columns_only_where_they_apply():
    """16-bit columns are for the CSR forward with K <= 65536; elsewhere one line says so."""
    idx, w, x, gy = _small_case()
    f = list(_fields(idx))
    f[1] = _col16(idx.col)
    with pytest.raises(ValueError, match="col may be 16-bit .int16. only in the forward of a CSR layer .* a backward"):
        _cpp.compact_linear_bwd(gy, x, None, w, *f, 9, 11)
    bidx = _index(_mask(9, 11, 0.4), (2, 2))
    bw = _values(bidx, torch.float32)
    with pytest.raises(ValueError, match="col may be 16-bit .* a BSR forward"):
        _cpp.compact_linear_infer(x, bw, None, bidx.crow, _col16(bidx.col), 9, 11)
    wide = _index(_mask(2, 65537, 0.01), None)
    with pytest.raises(ValueError, match="in_features 65537"):
        _cpp.compact_linear_infer(torch.randn(1, 65537), _values(wide, torch.float32), None, wide.crow,
                                  _col16(wide.col), 2, 65537)
    with pytest.raises(ValueError, match="col must be int32"):
        _cpp.compact_linear_infer(x, w, None, idx.crow, idx.col.long(), 9, 11)


# -------------------------------------------------------------------------- error paths


def _small_case():
    idx = _index(_mask(9, 11, 0.4), None)
    w = _values(idx, torch.float32)
    return idx, w, torch.randn(4, 11), torch.randn(4, 9)


@pytest.mark.parametrize("batch", [1, 4, 40])
@pytest.mark.parametrize("bad", [11, 1000, -1])
def test_out_of_range_col_raises(batch, bad):
    idx, w, _, _ = _small_case()
    assert idx.nnz > 2
    col = idx.col.clone()
    col[idx.nnz // 2] = bad
    f = (idx.crow, col, idx.row, idx.ccol, idx.row_t, idx.perm)
    x, gy = torch.randn(batch, 11), torch.randn(batch, 9)
    with pytest.raises(ValueError, match="out of range"):
        _cpp.compact_linear_fwd(x, None, w, None, *f, 9, 11)
    with pytest.raises(ValueError, match="out of range"):
        _cpp.compact_linear_bwd(gy, x, None, w, *f, 9, 11)
    with pytest.raises(ValueError, match="out of range"):  # the SDDMM alone still catches it
        _cpp.compact_linear_bwd(gy, x, None, w, *f, 9, 11, needs_x_grad=False)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("width", [32, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 40, 100])  # 100: several batch chunks, one after the other
def test_range_check_catches_every_position(isa, width, dtype, batch):
    """The batch-1 SpMV, the panel SpMM and the dX scatter check each group of 16 indices just before
    they read through them, then the row's tail; the dθ rows check a whole row in groups and a tail first.
    A bad index at any position of a row (any lane of a group, the tail) raises before it is read,
    whatever its value: int32 columns just past the bound, the largest int32 or negative, with and
    without m (forward; backward with and without dX); 16-bit columns (the inference entry) just past
    the bound or 65535, read unsigned."""
    n, k = 3, 37
    idx = _index(torch.ones(n, k, dtype=torch.bool), None)  # 37 entries per row: two groups of 16, tail 5
    w = _values(idx, dtype)
    x, gy = torch.randn(batch, k, dtype=dtype), torch.randn(batch, n, dtype=dtype)
    bads = (k, k + 1, 2**31 - 1, -1, -(2**31)) if width == 32 else (k, k + 1, 65535)
    with _isa_or_skip(isa):
        for pos in range(idx.nnz):
            for bad in bads:
                if width == 32:
                    col = idx.col.clone()
                    col[pos] = bad
                    f = (idx.crow, col, idx.row, idx.ccol, idx.row_t, idx.perm)
                    for m in (None, torch.ones_like(w)):
                        with pytest.raises(ValueError, match="out of range"):
                            _cpp.compact_linear_fwd(x, m, w, None, *f, n, k)
                    for with_dx in (True, False):  # the dX scatter's groups, the dθ rows
                        with pytest.raises(ValueError, match="out of range"):
                            _cpp.compact_linear_bwd(gy, x, torch.ones_like(w), w, *f, n, k, with_dx)
                else:
                    col = _col16(idx.col)
                    col[pos] = bad - 65536 if bad >= 32768 else bad  # the int16 whose bits read as `bad`
                    with pytest.raises(ValueError, match="out of range"):
                        _cpp.compact_linear_infer(x, w, None, idx.crow, col, n, k)
        y = _cpp.compact_linear_fwd(x, None, w, None, idx.crow, idx.col, idx.row, idx.ccol, idx.row_t, idx.perm,
                                    n, k)
    assert_close(y, R.compact_linear_ref(x, None, w, None, *_fields(idx), n, k), dtype, "all in range")


@pytest.mark.parametrize("field", ["ccol", "row_t", "perm"])
def test_transposed_fields_are_size_checked(field):
    """The CPU backward reads only crow/col (dX by scatter from the rows); the transposed fields of the
    signature are still checked for dtype and size."""
    idx, w, x, gy = _small_case()
    f = dict(zip(("crow", "col", "row", "ccol", "row_t", "perm"), _fields(idx)))
    f[field] = f[field][:-1]
    with pytest.raises(ValueError, match=f"{field} must have"):
        _cpp.compact_linear_bwd(gy, x, w.clone(), w, *f.values(), 9, 11)
    f[field] = _fields(idx)[("crow", "col", "row", "ccol", "row_t", "perm").index(field)].long()
    with pytest.raises(ValueError, match=f"{field} must be int32"):
        _cpp.compact_linear_bwd(gy, x, w.clone(), w, *f.values(), 9, 11)


@pytest.mark.parametrize("budget", [1, 4096])
def test_narrow_panels(budget):
    """Batches cut into narrower chunks than the batch size asks for (large K) give the same results."""
    try:
        _cpp.set_panel_budget(budget)
        for b in (20, 70):
            _check_compact_linear(30, 129, b, 0.2, None, torch.float32)
            _check_compact_linear(30, 129, b, 0.2, (4, 8), torch.float64)
    finally:
        _cpp.set_panel_budget(0)


def _libc_l2_bytes():
    """What the C library's sysconf(_SC_LEVEL2_CACHE_SIZE) says, as the kernels ask it; -1 where unknown."""
    if "SC_LEVEL2_CACHE_SIZE" in os.sysconf_names:
        return os.sysconf("SC_LEVEL2_CACHE_SIZE")
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        # CPython's table of sysconf names leaves this one out; 191 is its value in glibc's <unistd.h>
        libc = ctypes.CDLL(None, use_errno=True)
        libc.sysconf.restype = ctypes.c_long
        return libc.sysconf(191)
    return -1


def test_default_panel_budget_is_one_cores_l2_at_most_512k():
    """The default budget follows the L2 size the system reports, clamped to 256-512 KiB (512 KiB where
    it reports none), and set_panel_budget(0) returns to it."""
    budget = _cpp.set_panel_budget(0)
    l2 = _libc_l2_bytes()
    expect = 512 << 10 if l2 <= 0 else min(max(l2, 256 << 10), 512 << 10)
    assert budget == expect
    with _cpp.use_panel_budget(4096):
        assert _cpp.set_panel_budget(4096) == 4096
    assert _cpp.set_panel_budget(0) == expect


def test_bad_pointers_raise():
    idx, w, x, _ = _small_case()
    crow = idx.crow.clone()
    a, b = int(crow[3]), int(crow[4])
    crow[3], crow[4] = b + 1, a  # crow[3] > crow[4]
    with pytest.raises(ValueError, match="non-decreasing"):
        _cpp.compact_linear_fwd(x, None, w, None, crow, *_fields(idx)[1:], 9, 11)
    crow = idx.crow.clone()
    crow[-1] -= 1
    with pytest.raises(ValueError, match=r"crow\[-1\]"):
        _cpp.compact_linear_fwd(x, None, w, None, crow, *_fields(idx)[1:], 9, 11)
    with pytest.raises(ValueError, match="crow must have 10 entries"):
        _cpp.compact_linear_fwd(x, None, w, None, idx.crow[:-1], *_fields(idx)[1:], 9, 11)


def test_wrong_index_dtype_and_sizes_raise():
    idx, w, x, gy = _small_case()
    f = list(_fields(idx))
    with pytest.raises(ValueError, match="col must be int32"):
        _cpp.compact_linear_fwd(x, None, w, None, f[0], f[1].long(), *f[2:], 9, 11)
    with pytest.raises(ValueError, match="perm must have"):
        _cpp.compact_linear_bwd(gy, x, None, w, *f[:5], f[5][:-1], 9, 11)
    with pytest.raises(ValueError, match="x must be"):
        _cpp.compact_linear_fwd(torch.randn(4, 12), None, w, None, *f, 9, 11)
    with pytest.raises(ValueError, match="dtype"):
        _cpp.compact_linear_fwd(x.double(), None, w, None, *f, 9, 11)
    with pytest.raises(ValueError, match="m_values must have the shape"):
        _cpp.compact_linear_fwd(x, w[:-1], w, None, *f, 9, 11)


@pytest.mark.parametrize("what", ["out_features", "in_features"])
def test_int32_overflow_sizes_refused(what):
    """Dimensions past int32 are refused before anything is allocated (the tensors here are tiny)."""
    idx, w, x, gy = _small_case()
    big = 2**31
    n, k = (big, 11) if what == "out_features" else (9, big)
    with pytest.raises(ValueError, match=f"{what} = {big} is outside the int32 index range"):
        _cpp.compact_linear_fwd(x, None, w, None, *_fields(idx), n, k)
    with pytest.raises(ValueError, match="int32 index range"):
        _cpp.compact_linear_bwd(gy, x, None, w, *_fields(idx), n, k)
    # the largest int32 value itself passes the check (and then fails on the pointer sizes)
    with pytest.raises(ValueError, match="crow must have"):
        _cpp.compact_linear_fwd(x, None, w, None, *_fields(idx), 2**31 - 1, 11)


# ------------------------------------------------------------------------------ reparam


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (7, 5), (3, 4, 5, 2), (300, 257)], ids=str)
@pytest.mark.parametrize("use_m", [True, False])
@pytest.mark.parametrize("density", [None, 0.0, 0.3, 1.0])
def test_reparam(shape, dtype, use_m, density):
    w = torch.randn(shape, dtype=dtype)
    m = torch.randn(shape, dtype=dtype) if use_m else None
    mask = None if density is None else torch.rand(shape) < density
    if mask is not None and (~mask).any():
        w[~mask] = float("nan")  # pruned coordinates may hold anything: nothing may leak
    theta = _cpp.reparam_fwd(m, w, mask)
    assert_close(theta, R.reparam_ref(m, w, mask), dtype, "theta", elementwise=True)
    grad = torch.randn(shape, dtype=dtype)
    g_m, g_w = _cpp.reparam_bwd(grad, m, w, mask)
    r_m, r_w = R.reparam_backward_ref(grad, m, w, mask)
    assert_close(g_w, r_w, dtype, "g_w", elementwise=True)
    if use_m:
        assert_close(g_m, r_m, dtype, "g_m", elementwise=True)
    else:
        assert g_m is None and g_w.data_ptr() != grad.data_ptr()


def test_reparam_noncontiguous_inputs():
    w = torch.randn(6, 8).t()
    m = torch.randn(8, 6)
    assert_close(_cpp.reparam_fwd(m, w, None), R.reparam_ref(m, w, None), torch.float32, "theta", elementwise=True)


# ------------------------------------------------------------------------------ signin_reset


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", [1e-6, 1.0, 10.0])
@pytest.mark.parametrize("use_mask", [False, True])
def test_signin_reset(dtype, beta, use_mask):
    n = 1000
    m = torch.randn(n, dtype=dtype) * 3
    w = torch.randn(n, dtype=dtype)
    big = 1e150 if dtype == torch.float64 else 1e18
    m[:6] = torch.tensor([1.0, 1.0, 1.0, 1.0, big, 1.0], dtype=dtype)
    w[:6] = torch.tensor([0.0, 1e-30, -1e-30, -big, 1.0, -0.0], dtype=dtype)  # θ = 0, ±tiny, ±huge
    mask = (torch.rand(n) < 0.7) if use_mask else None
    mo, wo = _cpp.signin_reset(m, w, mask, beta)
    rm, rw = R.signin_reset_ref(m, w, mask, beta)
    assert_close(mo, rm, dtype, "m", elementwise=True)
    assert_close(wo, rw, dtype, "w", elementwise=True)
    assert torch.all(mo > 0)
    theta = R.reparam_ref(m, w, mask)
    finite = theta.abs() < 1e30
    assert_close((mo * wo)[finite], theta[finite], dtype, "m*w == theta", elementwise=True)


def test_signin_reset_rejects_bad_beta():
    with pytest.raises(ValueError, match="beta"):
        _cpp.signin_reset(torch.ones(3), torch.ones(3), None, float("inf"))


# -------------------------------------------------------------------------------- fused_step

SGD_CONFIGS = [
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, alpha=0.0, maximize=False),
    dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=1e-2, alpha=0.0, maximize=False),
    dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=5e-4, alpha=1e-3, maximize=False),
    dict(momentum=0.5, dampening=0.2, nesterov=False, weight_decay=0.0, alpha=1e-2, maximize=True),
]
ADAMW_CONFIGS = [
    dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, alpha=0.0, maximize=False),
    dict(beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=1e-2, alpha=1e-3, maximize=True),
    dict(beta1=0.3, beta2=0.9, eps=1e-8, weight_decay=0.1, alpha=0.0, maximize=False),  # lerp's other branch
]
_DEFAULTS = dict(momentum=0.0, dampening=0.0, nesterov=False, beta1=0.9, beta2=0.999, eps=1e-8,
                 weight_decay=0.0, alpha=0.0, maximize=False)


def _step_both(kind, cfg, dtype, shape, use_mask, step, compact):
    args = dict(_DEFAULTS, **cfg)
    param = torch.randn(shape, dtype=dtype)
    grad = torch.randn(shape, dtype=dtype)
    buf1 = torch.randn(shape, dtype=dtype) if (kind == "adamw" or args["momentum"]) else None
    buf2 = torch.rand(shape, dtype=dtype) if kind == "adamw" else None
    mask = (torch.rand(shape) < 0.6) if use_mask else None
    if mask is not None:
        grad[~mask] = float("nan")  # ignored at pruned coordinates
    lr = torch.tensor(0.05, dtype=torch.float32)
    out = []
    for fn in (_cpp.fused_step, R.fused_step_ref):
        p, b1, b2 = param.clone(), None if buf1 is None else buf1.clone(), None if buf2 is None else buf2.clone()
        fn(p, grad, b1, b2, mask, lr, step, kind, args["momentum"], args["dampening"], args["nesterov"],
           args["beta1"], args["beta2"], args["eps"], args["weight_decay"], args["alpha"], args["maximize"])
        out.append((p, b1, b2))
    (p, b1, b2), (rp, rb1, rb2) = out
    # atol relative to the inputs' magnitude too: a one-element state can be a near-cancellation
    inputs = [t[torch.isfinite(t)] for t in (param, grad, buf1, buf2) if t is not None]
    scale = max((float(t.abs().max()) for t in inputs if t.numel()), default=0.0)
    for name, b, rb in (("param", p, rp), ("buf1", b1, rb1), ("buf2", b2, rb2)):
        if rb is not None:
            own = float(rb.abs().max()) if rb.numel() else 0.0
            assert_close(b, rb, dtype, name, elementwise=True, scale=max(scale, own))
    if mask is not None:
        assert torch.equal(p[~mask], param[~mask]), "pruned parameters must not move"
        for b in (b1, b2):
            if b is not None:
                assert torch.all(b[~mask] == 0), "pruned optimizer state must be exactly 0"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", SGD_CONFIGS, ids=lambda c: f"mom{c['momentum']}-nest{c['nesterov']}-max{c['maximize']}")
@pytest.mark.parametrize("step", [1, 3])
@pytest.mark.parametrize("use_mask", [False, True])
def test_fused_step_sgd(dtype, cfg, step, use_mask):
    _step_both("sgd", cfg, dtype, (129, 7), use_mask, step, False)
    _step_both("sgd", cfg, dtype, (100_003,), use_mask, step, True)  # compact values, threaded path


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", ADAMW_CONFIGS, ids=lambda c: f"b1_{c['beta1']}-wd{c['weight_decay']}")
@pytest.mark.parametrize("step", [1, 5])
@pytest.mark.parametrize("use_mask", [False, True])
def test_fused_step_adamw(dtype, cfg, step, use_mask):
    _step_both("adamw", cfg, dtype, (1, 1), use_mask, step, False)
    _step_both("adamw", cfg, dtype, (33, 65), use_mask, step, False)
    _step_both("adamw", cfg, dtype, (100_003,), use_mask, step, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("step", [1, 4])
def test_fused_step_multi_is_the_per_tensor_step(dtype, kind, step):
    """One call over a list (sizes 1 to past the threading threshold, masks on some, α per tensor) gives
    the very bits of one fused_step per tensor, through the C++ op and through ops.fused_step_multi."""
    cfg = dict(_DEFAULTS, **(SGD_CONFIGS[2] if kind == "sgd" else ADAMW_CONFIGS[1]))
    shapes = [(1,), (300, 7), (100_003,), (10,)]
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, dtype=dtype) for s in shapes]
    b1s = [torch.randn(s, dtype=dtype) for s in shapes]
    b2s = [torch.rand(s, dtype=dtype) if kind == "adamw" else None for s in shapes]
    masks = [None, torch.rand(shapes[1]) < 0.5, torch.rand(shapes[2]) < 0.1, None]
    alphas = [0.0, 1e-3, 2e-3, 0.0]
    lr = torch.tensor(0.05, dtype=torch.float64)
    hyper = {k: cfg[k] for k in ("momentum", "dampening", "nesterov", "beta1", "beta2", "eps", "weight_decay",
                                 "maximize")}

    def fresh():
        return ([t.clone() for t in params], [t.clone() for t in b1s],
                [None if t is None else t.clone() for t in b2s])

    ref_p, ref_b1, ref_b2 = fresh()
    for i in range(len(shapes)):
        _cpp.fused_step(ref_p[i], grads[i], ref_b1[i], ref_b2[i], masks[i], lr, step, kind, hyper["momentum"],
                        hyper["dampening"], hyper["nesterov"], hyper["beta1"], hyper["beta2"], hyper["eps"],
                        hyper["weight_decay"], alphas[i], hyper["maximize"])
    for call in ("cpp", "op", "ops"):
        p, b1, b2 = fresh()
        if call == "op":  # the registered op; "cpp" takes the CPython entry where the build has one
            torch.ops.sparse_engine_C.fused_step_multi(
                p, grads, b1, b2, masks, lr, step, kind, hyper["momentum"], hyper["dampening"], hyper["nesterov"],
                hyper["beta1"], hyper["beta2"], hyper["eps"], hyper["weight_decay"], alphas, hyper["maximize"])
        elif call == "cpp":
            _cpp.fused_step_group(
                p, grads, b1, b2, masks, lr, step, kind, hyper["momentum"], hyper["dampening"], hyper["nesterov"],
                hyper["beta1"], hyper["beta2"], hyper["eps"], hyper["weight_decay"], alphas, hyper["maximize"])
        else:
            ops.fused_step_multi(p, grads, b1, b2, masks, lr, step, kind, alphas=alphas, **hyper)
        for i in range(len(shapes)):
            for name, a, c in (("param", p[i], ref_p[i]), ("buf1", b1[i], ref_b1[i]), ("buf2", b2[i], ref_b2[i])):
                assert (a is None) == (c is None)
                assert a is None or torch.equal(a, c), f"{call}: {name} of tensor {i} differs from fused_step"


def test_fused_step_multi_errors():
    p, g, lr = [torch.randn(5), torch.randn(3)], [torch.randn(5), torch.randn(3)], torch.tensor(0.1)
    with pytest.raises(ValueError, match="same length"):
        _cpp.fused_step_group(p, g[:1], [None, None], [None, None], [None, None], lr, 1, "sgd", 0.0, 0.0, False,
                              0.9, 0.999, 1e-8, 0.0, [0.0, 0.0], False)
    with pytest.raises(ValueError, match="grad must have the shape of param"):
        _cpp.fused_step_group(p, g[::-1], [None, None], [None, None], [None, None], lr, 1, "sgd", 0.0, 0.0, False,
                              0.9, 0.999, 1e-8, 0.0, [0.0, 0.0], False)
    with pytest.raises(ValueError, match="alphas must have one entry per param"):
        ops.fused_step_multi(p, g, [None, None], [None, None], [None, None], lr, 1, "sgd", alphas=[0.0])


def test_optimizer_entries_reject_bad_arguments():
    """The CPython entries of the optimizer's calls: a wrong type gets one line naming the argument."""
    if _cpp._STEP_MULTI is None or _cpp._ALL_FINITE is None:
        pytest.skip("this build has no sparse_engine._C Python module (a JIT build): the ops serve")
    p, g, lr = [torch.randn(5)], [torch.randn(5)], torch.tensor(0.1)
    good = [p, g, [None], [None], [None], lr, 1, "sgd", 0.0, 0.0, False, 0.9, 0.999, 1e-8, 0.0, [0.0], False]
    _cpp._STEP_MULTI(*good)
    for i, value, message in [(0, p[0], "params must be a list of tensors"),
                              (1, [None], r"grads\[0\] must be a torch.Tensor, got None"),
                              (2, [1.0], "buf1 must be a torch.Tensor"),
                              (5, 0.1, "lr must be a torch.Tensor"),
                              (6, 1.5, "step must be an int"),
                              (7, None, "kind must be a str"),
                              (8, "0.9", "momentum must be a float"),
                              (10, 0, "nesterov must be a bool"),
                              (14, 10**400, "weight_decay does not fit a float"),
                              (15, 0.0, "alphas must be a list of floats"),
                              (15, [True], r"alphas\[i\] must be a float")]:
        args = list(good)
        args[i] = value
        with pytest.raises((TypeError, ValueError), match=message):
            _cpp._STEP_MULTI(*args)
    with pytest.raises(TypeError, match="17 arguments"):
        _cpp._STEP_MULTI(*good[:-1])
    with pytest.raises(ValueError, match="kind must be one of"):
        _cpp._STEP_MULTI(*good[:7], "lamb", *good[8:])
    assert _cpp._ALL_FINITE(g, [None]) is True
    with pytest.raises(TypeError, match=r"tensors\[0\] must be a torch.Tensor, got None"):
        _cpp._ALL_FINITE([None], [None])
    with pytest.raises(TypeError, match="2 arguments"):
        _cpp._ALL_FINITE(g)


def test_fused_step_errors():
    p, g = torch.randn(5), torch.randn(5)
    lr = torch.tensor(0.1)
    with pytest.raises(ValueError, match="kind must be one of"):
        _cpp.fused_step(p, g, None, None, None, lr, 1, "lamb", 0.0, 0.0, False, 0.9, 0.999, 1e-8, 0.0, 0.0, False)
    with pytest.raises(ValueError, match="step must be >= 1"):
        _cpp.fused_step(p, g, None, None, None, lr, 0, "sgd", 0.0, 0.0, False, 0.9, 0.999, 1e-8, 0.0, 0.0, False)
    with pytest.raises(ValueError, match="buf1"):
        _cpp.fused_step(p, g, None, None, None, lr, 1, "sgd", 0.9, 0.0, False, 0.9, 0.999, 1e-8, 0.0, 0.0, False)
    with pytest.raises(ValueError, match="contiguous"):
        q = torch.randn(5, 2).t()
        _cpp.fused_step(q, torch.randn(2, 5), None, None, None, lr, 1, "sgd", 0.0, 0.0, False, 0.9, 0.999, 1e-8,
                        0.0, 0.0, False)


# ----------------------------------------------------------------------------- dtypes, loading


def test_unsupported_dtype_goes_to_reference_unless_forced():
    # The choice is made in one place, backends.select: it reads SUPPORTED_DTYPES and sends bfloat16 to the
    # reference, or raises when cpp was requested. The kernel module itself only checks its arguments.
    w = torch.randn(4, 3, dtype=torch.bfloat16)
    assert torch.equal(ops.reparam(None, w, None), R.reparam_ref(None, w, None))
    with backends.force("cpp"), pytest.raises(RuntimeError, match="float32"):
        ops.reparam(None, w, None)
    with pytest.raises(ValueError, match="float32"):
        _cpp.reparam_fwd(None, w, None)
    assert set(_cpp.SUPPORTED_DTYPES) == {torch.float32, torch.float64}


_BLOCK_PREBUILT = textwrap.dedent("""
    import importlib.abc, sys, warnings
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "sparse_engine._C":
                raise ImportError("blocked by the test")
    sys.meta_path.insert(0, Block())
""")


def test_missing_extension_warns_once_and_reference_serves():
    code = _BLOCK_PREBUILT + textwrap.dedent("""
        import torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import sparse_engine.ops._cpp as c
            from sparse_engine.ops import backends
            from sparse_engine import ops
            y = ops.reparam(None, torch.ones(3), None)
        msgs = [str(w.message) for w in caught if "C++ backend unavailable" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert c.UNAVAILABLE and "blocked by the test" in c.UNAVAILABLE
        assert backends.select("reparam_fwd", torch.device("cpu"))[0] == "reference"
        print("OK")
    """)
    env = dict(os.environ, SPARSE_ENGINE_JIT="0")
    env.pop("SPARSE_ENGINE_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.slow
def test_jit_build(tmp_path):
    """SPARSE_ENGINE_JIT=1 builds the extension with torch.utils.cpp_extension.load when no .so is installed."""
    code = _BLOCK_PREBUILT + textwrap.dedent("""
        import torch
        import sparse_engine.ops._cpp as c
        assert c.UNAVAILABLE is None, c.UNAVAILABLE
        from sparse_engine.ops import reference as R
        w, m = torch.randn(50), torch.randn(50)
        assert torch.allclose(c.reparam_fwd(m, w, None), R.reparam_ref(m, w, None))
        print("OK", c.isa())
    """)
    env = dict(os.environ, SPARSE_ENGINE_JIT="1", SPARSE_ENGINE_CACHE=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]
