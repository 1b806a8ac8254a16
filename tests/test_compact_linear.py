"""compact_linear: y = x θᵀ + b with θ stored compactly (CSR values (nnz,) or BSR values (nnzb, bn, bk)).

The expected values come from autograd through ``masked_linear_ref`` on the dense weight with the
index's element mask, in float64; dense gradients are then gathered into the compact layout. BSR edge
padding is filled with junk: it must never reach y and must get exactly zero gradient.
"""
from __future__ import annotations

import pytest
import torch
from _backends import (BACKENDS, DEVICE_DTYPES, assert_zero_where, grads, leaf, make_mask, over_backends,
                       randn, require, run_on)
from _tolerances import assert_close, linear_terms_scale

from sparse_engine.ops import backends
from sparse_engine import ops
from sparse_engine.layout import BSRIndex, CSRIndex
from sparse_engine.ops.reference import (compact_linear_backward_ref, compact_linear_ref,
                                         compact_to_dense_ref, dense_to_compact_ref, masked_linear_ref)

IMPLS = ("compact_linear_fwd", "compact_linear_bwd")


def _t(v, dtype=torch.float64):
    return torch.tensor(v, dtype=dtype)


def _index_args(index):
    return (index.crow, index.col, index.row, index.ccol, index.row_t, index.perm, *index.shape)


# ------------------------------------------------------------------------------- hand-computed cases


def test_hand_case_csr_reference():
    # mask [[1, 0, 1], [0, 1, 0]]: CSR order (0,0), (0,2), (1,1)
    idx = CSRIndex.from_mask(_t([[1, 0, 1], [0, 1, 0]], torch.bool))
    w_v, m_v = _t([2.0, -1.0, 3.0]), _t([1.0, 2.0, 0.5])
    # θ = [[2, 0, -2], [0, 1.5, 0]]
    theta = compact_to_dense_ref(m_v * w_v, idx.row, idx.col, (2, 3))
    assert torch.equal(theta, _t([[2.0, 0, -2], [0, 1.5, 0]]))
    x = _t([[1.0, 2.0, 3.0]])
    assert torch.equal(compact_linear_ref(x, m_v, w_v, _t([0.5, 0.0]), *_index_args(idx)), _t([[-3.5, 3.0]]))
    g_x, g_m, g_w = compact_linear_backward_ref(_t([[1.0, 2.0]]), x, m_v, w_v, *_index_args(idx))
    assert torch.equal(g_x, _t([[2.0, 3.0, -2.0]]))  # 1·θ₀ + 2·θ₁
    # dθ = gyᵀx = [[1, 2, 3], [2, 4, 6]] read at the pattern: [1, 3, 4]
    assert torch.equal(g_m, _t([2.0, -3.0, 12.0]))  # dθ·w
    assert torch.equal(g_w, _t([1.0, 6.0, 2.0]))  # dθ·m
    _, g_m, g_w = compact_linear_backward_ref(_t([[1.0, 2.0]]), x, None, w_v, *_index_args(idx))
    assert g_m is None and torch.equal(g_w, _t([1.0, 3.0, 4.0]))
    g_x, g_m, g_w = compact_linear_backward_ref(_t([[1.0, 2.0]]), x, m_v, w_v, *_index_args(idx), False)
    assert g_x is None and torch.equal(g_m, _t([2.0, -3.0, 12.0])) and torch.equal(g_w, _t([1.0, 6.0, 2.0]))


def test_hand_case_bsr_layout():
    # 3×4 matrix, 2×2 blocks; active blocks (0,1) and (1,0); the bottom block row is half padding.
    idx = BSRIndex.from_block_mask(_t([[0, 1], [1, 0]], torch.bool), (2, 2), (3, 4))
    values = _t([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])  # block (1,0): row 3 is padding
    dense = compact_to_dense_ref(values, idx.row, idx.col, (3, 4))
    assert torch.equal(dense, _t([[0, 0, 1, 2], [0, 0, 3, 4], [5, 6, 0, 0]]))
    back = dense_to_compact_ref(dense, idx.row, idx.col, (2, 2))
    assert torch.equal(back, _t([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [0.0, 0.0]]]))  # padding comes back 0
    x = _t([[1.0, 1.0, 1.0, 1.0]])
    assert torch.equal(compact_linear_ref(x, None, values, None, *_index_args(idx)), _t([[3.0, 7.0, 11.0]]))


# ------------------------------------------------------------------------------------ backend grid

# (B, N, K, bias, layout): layout "csr" or a BSR block shape with partial edge blocks
CASES = [
    (1, 1, 1, True, "csr"),
    (7, 33, 129, False, "csr"),
    (65, 129, 7, True, "csr"),
    (7, 7, 33, True, "csr"),
    (7, 33, 129, True, (16, 16)),
    (65, 129, 7, False, (32, 16)),
    (7, 7, 33, True, (4, 8)),
]
DENSITIES = (0.0, 0.1, 0.5, 1.0)  # compact storage always has a pattern; 1.0 stands for "no mask"


def _make_index(shape, layout, density, device):
    if layout == "csr":
        return CSRIndex.from_mask(make_mask(shape, density)).to(device)
    nbr, nbc = -(-shape[0] // layout[0]), -(-shape[1] // layout[1])
    return BSRIndex.from_block_mask(make_mask((nbr, nbc), density), layout, shape).to(device)


def _case_id(c):
    lay = "csr" if c[4] == "csr" else "bsr{}x{}".format(*c[4])
    return "B{}N{}K{}{}-{}".format(*c[:3], "b" if c[3] else "", lay)


@pytest.mark.parametrize("factored", [False, True], ids=["masked", "factored"])
@pytest.mark.parametrize("density", DENSITIES, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@over_backends
def test_matches_reference(backend, device, dtype, case, density, factored):
    B, N, K, with_bias, layout = case
    require(backend, IMPLS, device, dtype)
    index = _make_index((N, K), layout, density, device)
    x, w = randn(B, K, dtype=dtype, device=device), randn(N, K, dtype=dtype, device=device)
    m = randn(N, K, dtype=dtype, device=device) if factored else None
    b = randn(N, dtype=dtype, device=device) if with_bias else None
    gy = randn(B, N, dtype=dtype, device=device)

    w_v = index.gather(w)
    m_v = None if m is None else index.gather(m)
    pad = None
    if layout != "csr":  # junk in the padding of edge blocks: it must not matter
        pad = ~index.gather(torch.ones(N, K, dtype=torch.bool, device=device))
        w_v = torch.where(pad, randn(*w_v.shape, dtype=dtype, device=device), w_v)
        if m_v is not None:
            m_v = torch.where(pad, randn(*m_v.shape, dtype=dtype, device=device), m_v)

    inputs = [leaf(t) for t in (x, m_v, w_v, b)]
    with run_on(backend):
        y = ops.compact_linear(inputs[0], inputs[1], inputs[2], index, inputs[3])
        got = grads(y, inputs, gy)

    ref_in = [leaf(t.double()) if t is not None else None for t in (x, m, w, b)]
    y_ref = masked_linear_ref(ref_in[0], ref_in[1], ref_in[2], index.to_mask(), ref_in[3])
    g_x, g_m, g_w, g_b = grads(y_ref, ref_in, gy.double())
    want = [g_x, None if g_m is None else index.gather(g_m), index.gather(g_w), g_b]

    scale = linear_terms_scale(ref_in[0], ref_in[1], ref_in[2], index.to_mask(), ref_in[3])  # may cancel
    assert_close(y, y_ref, dtype, "y", device=device, scale=scale)
    for name, g, r in zip(("g_x", "g_m_values", "g_w_values", "g_bias"), got, want):
        if r is not None:
            assert_close(g, r, dtype, name, device=device)
    assert_zero_where(got[1], pad, "g_m_values (BSR padding)")
    assert_zero_where(got[2], pad, "g_w_values (BSR padding)")


# ------------------------------------------------------------------------------- gradcheck, opcheck


@pytest.mark.parametrize("factored", [False, True], ids=["masked", "factored"])
@pytest.mark.parametrize("layout", ["csr", (2, 4)], ids=["csr", "bsr2x4"])
@over_backends
def test_gradcheck_float64(backend, layout, factored):
    require(backend, IMPLS, "cpu", torch.float64)
    index = _make_index((5, 6), layout, 0.5, "cpu")
    if index.nnz == 0:  # a random pattern can come out empty: then use a fixed one
        index = _make_index((5, 6), layout, 1.0, "cpu")
    ones = index.gather(torch.ones(5, 6, dtype=torch.float64))
    x, b = leaf(randn(3, 6, dtype=torch.float64)), leaf(randn(5, dtype=torch.float64))
    w_v = leaf(randn(*ones.shape, dtype=torch.float64) * ones)
    m_v = leaf(randn(*ones.shape, dtype=torch.float64)) if factored else None
    with run_on(backend):
        assert torch.autograd.gradcheck(lambda x, m, w, b: ops.compact_linear(x, m, w, index, b),
                                        (x, m_v, w_v, b), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("factored", [False, True], ids=["masked", "factored"])
@pytest.mark.parametrize("layout", ["csr", (16, 16)], ids=["csr", "bsr16x16"])
@over_backends
def test_opcheck(backend, layout, factored):
    require(backend, IMPLS, "cpu", torch.float32)
    index = _make_index((20, 40), layout, 0.5, "cpu")
    w_v = index.gather(randn(20, 40))
    m_v = index.gather(randn(20, 40)) if factored else None
    x, b, gy = randn(5, 40), randn(20), randn(5, 20)
    with run_on(backend):
        torch.library.opcheck(torch.ops.sparse_engine.compact_linear.default,
                              (leaf(x), leaf(m_v), leaf(w_v), leaf(b), *_index_args(index)))
        for needs_x_grad in (True, False):
            torch.library.opcheck(torch.ops.sparse_engine.compact_linear_backward.default,
                                  (gy, x, m_v, w_v, *_index_args(index), needs_x_grad))


# ------------------------------------------------------------------------- no dX for a network input


@pytest.mark.parametrize("factored", [False, True], ids=["masked", "factored"])
@pytest.mark.parametrize("layout", ["csr", (4, 8)], ids=["csr", "bsr4x8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@over_backends
def test_backward_without_x_grad(backend, dtype, layout, factored):
    """needs_x_grad=False gives no g_x and the very same weight gradients, called directly and through
    autograd (x a leaf without requires_grad), where the selected backend must be told False."""
    B, N, K = 7, 33, 129
    require(backend, IMPLS, "cpu", dtype)
    index = _make_index((N, K), layout, 0.3, "cpu")
    w_v = index.gather(randn(N, K, dtype=dtype))
    m_v = index.gather(randn(N, K, dtype=dtype)) if factored else None
    x, b, gy = randn(B, K, dtype=dtype), randn(N, dtype=dtype), randn(B, N, dtype=dtype)

    with run_on(backend):
        _, fn = backends.select("compact_linear_bwd", torch.device("cpu"), dtype)
        full = fn(gy, x, m_v, w_v, *_index_args(index))
        skip = fn(gy, x, m_v, w_v, *_index_args(index), needs_x_grad=False)
    assert full[0] is not None and full[0].shape == (B, K)
    assert skip[0] is None, f"{backend}: g_x must be None with needs_x_grad=False"
    for name, a, c in zip(("g_m_values", "g_w_values"), full[1:], skip[1:]):
        assert (a is None and c is None) if a is None else torch.equal(a, c), f"{backend}: {name} differs"

    told: list[bool] = []
    real_select = backends.select

    def spy_select(impl, *args, **kwargs):
        name, fn = real_select(impl, *args, **kwargs)
        if impl != "compact_linear_bwd":
            return name, fn

        def spy(*a, **k):
            told.append(k.get("needs_x_grad", a[12] if len(a) > 12 else True))
            return fn(*a, **k)

        return name, spy

    def weight_grads(x_requires_grad):
        inputs = [leaf(t) for t in (m_v, w_v, b)]
        xx = x.clone().requires_grad_(x_requires_grad)
        with run_on(backend), pytest.MonkeyPatch.context() as mp:
            mp.setattr(backends, "select", spy_select)
            # the custom op path (a native autograd node, test_native_autograd_path, is not spied on)
            mp.setattr(backends, "extra", lambda *a, **k: None)
            y = ops.compact_linear(xx, *inputs[:2], index, inputs[2])
            y.backward(gy)
        assert (xx.grad is not None) == x_requires_grad
        return [None if t is None else t.grad for t in inputs]

    with_x, without_x = weight_grads(True), weight_grads(False)
    assert told == [True, False], f"{backend}: the backend was told needs_x_grad={told}, expected [True, False]"
    for name, a, c in zip(("g_m_values", "g_w_values", "g_bias"), with_x, without_x):
        assert (a is None and c is None) if a is None else torch.equal(a, c), f"{backend}: {name} differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["csr", (4, 8)], ids=["csr", "bsr4x8"])
@pytest.mark.parametrize("factored", [True, False], ids=["signin", "masked"])
def test_native_autograd_path(dtype, layout, factored):
    """The C++ backend's one-node autograd path (compact_linear_train) gives the very bits of the custom op
    path (same kernels) for y and every gradient, with and without x's gradient, and passes gradcheck."""
    require("cpp", IMPLS, "cpu", dtype)
    if backends.extra("compact_linear_fwd", torch.device("cpu"), dtype, "compact_linear_train") is None:
        pytest.fail("the C++ backend is available but has no compact_linear_train")
    B, N, K = 9, 33, 70
    index = _make_index((N, K), layout, 0.3, "cpu")
    w_v = index.gather(randn(N, K, dtype=dtype))
    m_v = index.gather(randn(N, K, dtype=dtype)) if factored else None
    x, b, gy = randn(2, B, K, dtype=dtype), randn(N, dtype=dtype), randn(2, B, N, dtype=dtype)

    def run(native: bool, x_grad: bool):
        inputs = [leaf(t) for t in (m_v, w_v, b)]
        xx = x.clone().requires_grad_(x_grad)
        with run_on("cpp"), pytest.MonkeyPatch.context() as mp:
            if not native:
                mp.setattr(backends, "extra", lambda *a, **k: None)
            y = ops.compact_linear(xx, *inputs[:2], index, inputs[2])
            y.backward(gy)
        return [y.detach(), xx.grad] + [None if t is None else t.grad for t in inputs]

    for x_grad in (True, False):
        for name, a, c in zip(("y", "g_x", "g_m", "g_w", "g_bias"), run(True, x_grad), run(False, x_grad)):
            assert (a is None) == (c is None), f"{name}: present on one path only"
            assert a is None or torch.equal(a, c), f"{name} differs between the native and the custom op path"
    if dtype == torch.float64:
        args = [leaf(t) for t in (x[0], m_v, w_v, b)]
        with run_on("cpp"):
            assert torch.autograd.gradcheck(
                lambda xx, m, w, bb: ops.compact_linear(xx, m, w, index, bb),
                [a for a in args] if factored else args, check_undefined_grad=False)


# --------------------------------------------------------------------------------- input validation


def test_bad_input_names_the_argument():
    mask = make_mask((6, 8), 0.5)
    mask[0, 0] = True
    csr = CSRIndex.from_mask(mask)
    bsr = BSRIndex.from_mask(mask, (4, 4))
    x, w_v = randn(3, 8), randn(csr.nnz)
    with pytest.raises(TypeError, match="index must be a layout.CSRIndex or BSRIndex, got Tensor"):
        ops.compact_linear(x, None, w_v, mask)
    with pytest.raises(ValueError, match=rf"w_values must have shape \({csr.nnz},\)"):
        ops.compact_linear(x, None, randn(csr.nnz + 1), csr)
    with pytest.raises(ValueError, match=rf"w_values must have shape \({bsr.nnzb}, 4, 4\)"):
        ops.compact_linear(x, None, randn(bsr.nnz), bsr)
    with pytest.raises(ValueError, match="w_values must be a floating-point tensor"):
        ops.compact_linear(x, None, torch.ones(csr.nnz, dtype=torch.int64), csr)
    with pytest.raises(ValueError, match="m_values must have dtype torch.float32"):
        ops.compact_linear(x, w_v.double(), w_v, csr)
    with pytest.raises(ValueError, match=rf"m_values must have shape \({csr.nnz},\)"):
        ops.compact_linear(x, randn(csr.nnz + 2), w_v, csr)
    with pytest.raises(ValueError, match="x must have last dim 8"):
        ops.compact_linear(randn(3, 6), None, w_v, csr)
    with pytest.raises(ValueError, match="x must have the weight dtype"):
        ops.compact_linear(x.half(), None, w_v, csr)
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        ops.compact_linear(x, None, w_v, csr, randn(8))
    with pytest.raises(ValueError, match="index must be on the weight's device cpu, got meta"):
        ops.compact_linear(x, None, w_v, csr.to("meta"))


def test_non_contiguous_inputs_are_accepted():
    index = BSRIndex.from_mask(make_mask((6, 8), 1.0), (2, 4))  # 6 blocks of 2×4
    w_v = randn(4, 2, 6).permute(2, 1, 0)  # (6, 2, 4), non-contiguous
    x = randn(8, 3).t()
    assert not (w_v.is_contiguous() or x.is_contiguous())
    y = ops.compact_linear(x, None, w_v, index)
    assert torch.equal(y, ops.compact_linear(x.contiguous(), None, w_v.contiguous(), index))


@pytest.mark.parametrize("forced", BACKENDS)
def test_empty_batch(forced):
    index = CSRIndex.from_mask(make_mask((6, 8), 1.0))
    m_v, w_v, b = leaf(randn(48)), leaf(randn(48)), leaf(randn(6))
    with backends.force(forced):
        y = ops.compact_linear(randn(0, 8), m_v, w_v, index, b)
        assert y.shape == (0, 6)
        y.sum().backward()
    for t in (m_v, w_v, b):
        assert torch.equal(t.grad, torch.zeros_like(t))
