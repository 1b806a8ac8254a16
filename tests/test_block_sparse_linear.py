"""block_sparse_linear: y = x θᵀ + b with θ = B ⊙ m ⊙ w, B the active blocks of a BSRIndex.

The expected values come from autograd through ``masked_linear_ref`` with the element mask of the
index (``index.to_mask()``), in float64: an independent route from ``block_sparse_linear_ref``.
"""
from __future__ import annotations

import pytest
import torch
from _backends import (BACKENDS, DENSITIES, DEVICE_DTYPES, assert_zero_where, grads, leaf, over_backends,
                       randn, require, run_on, upcast_leaf)
from _tolerances import assert_close, linear_terms_scale

from sparse_engine.ops import backends
from sparse_engine import ops
from sparse_engine.layout import BSRIndex, CSRIndex
from sparse_engine.ops.reference import (block_mask_from_index_ref, block_sparse_linear_backward_ref,
                                         block_sparse_linear_ref, masked_linear_ref)

IMPLS = ("block_sparse_linear_fwd", "block_sparse_linear_bwd")


def _t(v, dtype=torch.float64):
    return torch.tensor(v, dtype=dtype)


def _index_args(index):
    return (index.crow, index.col, index.row, index.ccol, index.row_t, index.perm, *index.block_shape)


def _block_index(shape, block_shape, density, device="cpu") -> BSRIndex:
    """A BSRIndex whose *blocks* are active with probability ``density`` (None: every block)."""
    nbr, nbc = -(-shape[0] // block_shape[0]), -(-shape[1] // block_shape[1])
    if density is None or density == 1.0:
        blocks = torch.ones(nbr, nbc, dtype=torch.bool)
    elif density == 0.0:
        blocks = torch.zeros(nbr, nbc, dtype=torch.bool)
    else:
        blocks = torch.rand(nbr, nbc) < density
    return BSRIndex.from_block_mask(blocks, block_shape, shape).to(device)


# ------------------------------------------------------------------------------- hand-computed cases

# 3×4 weight, 2×2 blocks (grid 2×2, the bottom row of blocks is partial); active blocks (0,1), (1,0).
HAND_BLOCKS = [[False, True], [True, False]]
HAND_W = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]]
HAND_X = [[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, -1.0, 2.0]]


def _hand_index():
    return BSRIndex.from_block_mask(_t(HAND_BLOCKS, torch.bool), (2, 2), (3, 4))


def test_hand_block_mask():
    idx = _hand_index()
    mask = block_mask_from_index_ref(idx.row, idx.col, (3, 4), (2, 2))
    assert torch.equal(mask, _t([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0]], torch.bool))


def test_hand_case_reference():
    idx = _hand_index()
    x, w, b = _t(HAND_X), _t(HAND_W), _t([1.0, 0.0, -1.0])
    # θ = [[0, 0, 3, 4], [0, 0, 7, 8], [9, 10, 0, 0]]
    y = block_sparse_linear_ref(x, None, w, b, *_index_args(idx))
    assert torch.equal(y, _t([[8.0, 15.0, 18.0], [6.0, 9.0, 8.0]]))
    gy = _t([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    g_x, g_m, g_w = block_sparse_linear_backward_ref(gy, x, None, w, *_index_args(idx))
    assert g_m is None
    assert torch.equal(g_x, _t([[9.0, 10.0, 3.0, 4.0], [0.0, 0.0, 7.0, 8.0]]))
    # dθ = gyᵀ x = [x0, x1, x0], kept only on the active blocks
    assert torch.equal(g_w, _t([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, -1.0, 2.0], [1.0, 1.0, 0.0, 0.0]]))
    # factored: m = 2 everywhere doubles θ and g_w, and g_m = dθ⊙B⊙w
    m = torch.full((3, 4), 2.0, dtype=torch.float64)
    assert torch.equal(block_sparse_linear_ref(x, m, w, None, *_index_args(idx)), 2 * (y - b))
    _, g_m, g_w2 = block_sparse_linear_backward_ref(gy, x, m, w, *_index_args(idx))
    assert torch.equal(g_w2, 2 * g_w)
    assert torch.equal(g_m, _t([[0.0, 0.0, 3.0, 4.0], [0.0, 0.0, -7.0, 16.0], [9.0, 10.0, 0.0, 0.0]]))


# ------------------------------------------------------------------------------------ backend grid

# (B, N, K, bias, block shape): partial edge blocks in every case but the 1×1; (4, 8) is a small block
# a CPU kernel may like; 16×16 and 32×16 are tl.dot-sized.
CASES = [
    (1, 1, 1, True, (16, 16)),
    (7, 33, 129, False, (16, 16)),
    (65, 129, 7, True, (32, 16)),
    (7, 7, 33, True, (4, 8)),
]


@pytest.mark.parametrize("factored", [False, True], ids=["masked", "factored"])
@pytest.mark.parametrize("density", DENSITIES, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("case", CASES,
                         ids=lambda c: "B{}N{}K{}{}-bs{}x{}".format(*c[:3], "b" if c[3] else "", *c[4]))
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@over_backends
def test_matches_reference(backend, device, dtype, case, density, factored):
    B, N, K, with_bias, bs = case
    require(backend, IMPLS, device, dtype)
    index = _block_index((N, K), bs, density, device)
    x, w = randn(B, K, dtype=dtype, device=device), randn(N, K, dtype=dtype, device=device)
    m = randn(N, K, dtype=dtype, device=device) if factored else None
    b = randn(N, dtype=dtype, device=device) if with_bias else None
    gy = randn(B, N, dtype=dtype, device=device)
    inputs = [leaf(t) for t in (x, m, w, b)]
    with run_on(backend):
        y = ops.block_sparse_linear(inputs[0], inputs[1], inputs[2], index, inputs[3])
        got = grads(y, inputs, gy)
    mask = index.to_mask()
    ref_in = [upcast_leaf(t) for t in (x, m, w, b)]
    y_ref = masked_linear_ref(ref_in[0], ref_in[1], ref_in[2], mask, ref_in[3])
    want = grads(y_ref, ref_in, gy.double())
    scale = linear_terms_scale(ref_in[0], ref_in[1], ref_in[2], mask, ref_in[3])  # x θᵀ and b may cancel
    assert_close(y, y_ref, dtype, "y", device=device, scale=scale)
    for name, g, r in zip(("g_x", "g_m", "g_w", "g_bias"), got, want):
        if r is not None:
            assert_close(g, r, dtype, name, device=device)
    assert_zero_where(got[1], ~mask, "g_m")
    assert_zero_where(got[2], ~mask, "g_w")


# ------------------------------------------------------------------------------- gradcheck, opcheck


@pytest.mark.parametrize("factored", [False, True], ids=["masked", "factored"])
@over_backends
def test_gradcheck_float64(backend, factored):
    require(backend, IMPLS, "cpu", torch.float64)
    index = BSRIndex.from_block_mask(_t([[True, False], [False, True]], torch.bool), (3, 4), (5, 6))
    x, w, b = (leaf(randn(*s, dtype=torch.float64)) for s in ((3, 6), (5, 6), (5,)))
    m = leaf(randn(5, 6, dtype=torch.float64)) if factored else None
    with run_on(backend):
        assert torch.autograd.gradcheck(lambda x, m, w, b: ops.block_sparse_linear(x, m, w, index, b),
                                        (x, m, w, b), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("factored", [False, True], ids=["masked", "factored"])
@over_backends
def test_opcheck(backend, factored):
    require(backend, IMPLS, "cpu", torch.float32)
    index = _block_index((20, 40), (16, 16), 0.5)
    x, w, b, gy = randn(5, 40), randn(20, 40), randn(20), randn(5, 20)
    m = randn(20, 40) if factored else None
    with run_on(backend):
        torch.library.opcheck(torch.ops.sparse_engine.block_sparse_linear.default,
                              (leaf(x), leaf(m), leaf(w), leaf(b), *_index_args(index)))
        torch.library.opcheck(torch.ops.sparse_engine.block_sparse_linear_backward.default,
                              (gy, x, m, w, *_index_args(index)))


# --------------------------------------------------------------------------------- input validation


def test_bad_index_names_the_argument():
    x, w = randn(4, 8), randn(6, 8)
    with pytest.raises(TypeError, match="index must be a layout.BSRIndex, got CSRIndex"):
        ops.block_sparse_linear(x, None, w, CSRIndex.from_mask(torch.ones(6, 8, dtype=torch.bool)))
    with pytest.raises(TypeError, match="index must be a layout.BSRIndex, got Tensor"):
        ops.block_sparse_linear(x, None, w, torch.ones(6, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"index must describe a \(6, 8\) weight, got shape \(6, 9\)"):
        ops.block_sparse_linear(x, None, w, _block_index((6, 9), (2, 2), None))
    with pytest.raises(ValueError, match="index must be on the weight's device cpu, got meta"):
        ops.block_sparse_linear(x, None, w, _block_index((6, 8), (2, 2), None).to("meta"))
    with pytest.raises(ValueError, match="x must have last dim 8"):
        ops.block_sparse_linear(randn(4, 7), None, w, _block_index((6, 8), (2, 2), None))
    with pytest.raises(ValueError, match=r"m must have shape \(6, 8\)"):
        ops.block_sparse_linear(x, randn(8, 6), w, _block_index((6, 8), (2, 2), None))
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        ops.block_sparse_linear(x, None, w, _block_index((6, 8), (2, 2), None), randn(8))


def test_non_contiguous_inputs_are_accepted():
    index = _block_index((6, 8), (2, 4), 0.5)
    x, m, w = randn(8, 5).t(), randn(8, 6).t(), randn(8, 6).t()
    assert not (x.is_contiguous() or m.is_contiguous() or w.is_contiguous())
    y = ops.block_sparse_linear(x, m, w, index)
    assert torch.equal(y, ops.block_sparse_linear(x.contiguous(), m.contiguous(), w.contiguous(), index))


@pytest.mark.parametrize("forced", BACKENDS)
def test_empty_batch(forced):
    index = _block_index((6, 8), (2, 4), 0.5)
    m, w, b = leaf(randn(6, 8)), leaf(randn(6, 8)), leaf(randn(6))
    with backends.force(forced):
        y = ops.block_sparse_linear(randn(0, 8), m, w, index, b)
        assert y.shape == (0, 6)
        y.sum().backward()
    for t in (m, w, b):
        assert torch.equal(t.grad, torch.zeros_like(t))
