"""masked_linear: y = x θᵀ + b with θ = M ⊙ m ⊙ w, and its backward (g_x, g_m, g_w, g_b).

Every backend runs through the public ``ops.masked_linear`` (so the torch.library registration and its
autograd are exercised) and is compared with autograd through ``masked_linear_ref`` in float64.
"""
from __future__ import annotations

import pytest
import torch
from _backends import (BACKENDS, DENSITIES, DEVICE_DTYPES, assert_zero_where, grads, leaf, make_mask,
                       over_backends, randn, require, run_on, upcast_leaf)
from _tolerances import assert_close, linear_terms_scale

from sparse_engine.ops import backends
from sparse_engine import ops
from sparse_engine.ops.reference import masked_linear_backward_ref, masked_linear_ref

IMPLS = ("masked_linear_fwd", "masked_linear_bwd")

# ------------------------------------------------------------------------------- hand-computed cases

# B=2, K=3, N=2. θ = M⊙m⊙w = [[2, 0, 2], [0.5, -3, 0]]; worked out by hand in the comments.
X = [[1.0, 2.0, 3.0], [-1.0, 0.0, 2.0]]
W = [[1.0, -1.0, 2.0], [0.5, 3.0, -2.0]]
M = [[2.0, 1.0, 1.0], [1.0, -1.0, 0.5]]
MASK = [[True, False, True], [True, True, False]]
BIAS = [0.5, -1.0]
GY = [[1.0, 2.0], [-1.0, 1.0]]


def _t(v, dtype=torch.float64):
    return torch.tensor(v, dtype=dtype)


def test_hand_case_reference():
    x, w, m, mask, b, gy = _t(X), _t(W), _t(M), _t(MASK, torch.bool), _t(BIAS), _t(GY)
    # y = x θᵀ + b: [1·2 + 3·2, 1·0.5 + 2·(−3)] + b, [−1·2 + 2·2, −1·0.5] + b
    assert torch.equal(masked_linear_ref(x, m, w, mask, b), _t([[8.5, -6.5], [2.5, -1.5]]))
    g_x, g_m, g_w = masked_linear_backward_ref(gy, x, m, w, mask)
    assert torch.equal(g_x, _t([[3.0, -6.0, 2.0], [-1.5, -3.0, -2.0]]))  # gy θ
    # dθ = gyᵀ x = [[2, 2, 1], [1, 4, 8]]; g_m = dθ⊙M⊙w, g_w = dθ⊙M⊙m
    assert torch.equal(g_m, _t([[2.0, 0.0, 2.0], [0.5, 12.0, 0.0]]))
    assert torch.equal(g_w, _t([[4.0, 0.0, 1.0], [1.0, -4.0, 0.0]]))
    # Masked parameterization (m None): θ = M⊙w = [[1, 0, 2], [0.5, 3, 0]]
    assert torch.equal(masked_linear_ref(x, None, w, mask, b), _t([[7.5, 5.5], [3.5, -1.5]]))
    g_x, g_m, g_w = masked_linear_backward_ref(gy, x, None, w, mask)
    assert g_m is None
    assert torch.equal(g_w, _t([[2.0, 0.0, 1.0], [1.0, 4.0, 0.0]]))
    # no mask, no m: plain linear
    assert torch.equal(masked_linear_ref(x, None, w, None, None), x @ w.t())


def test_hand_case_through_op_and_autograd():
    x, w, m, b = (leaf(_t(v)) for v in (X, W, M, BIAS))
    mask = _t(MASK, torch.bool)
    with backends.force("reference"):
        y = ops.masked_linear(x, m, w, mask, b)
    y.backward(_t(GY))
    assert torch.equal(y.detach(), _t([[8.5, -6.5], [2.5, -1.5]]))
    assert torch.equal(m.grad, _t([[2.0, 0.0, 2.0], [0.5, 12.0, 0.0]]))
    assert torch.equal(w.grad, _t([[4.0, 0.0, 1.0], [1.0, -4.0, 0.0]]))
    assert torch.equal(x.grad, _t([[3.0, -6.0, 2.0], [-1.5, -3.0, -2.0]]))
    assert torch.equal(b.grad, _t([0.0, 3.0]))


def test_nan_at_pruned_coordinate_does_not_leak():
    x, w, m = (randn(*s, dtype=torch.float64) for s in ((3, 4), (2, 4), (2, 4)))
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, 1] = False
    w[0, 1] = float("nan")
    m[0, 1] = float("inf")
    y = masked_linear_ref(x, m, w, mask, None)
    assert torch.isfinite(y).all()
    g_x, g_m, g_w = masked_linear_backward_ref(torch.ones(3, 2, dtype=torch.float64), x, m, w, mask)
    assert torch.isfinite(g_x).all() and g_m[0, 1] == 0 and g_w[0, 1] == 0


# ------------------------------------------------------------------------------------ backend grid

# (B, N, K, bias): odd sizes; 129 crosses any power-of-two tile (several K tiles, a partial last one);
# 65×129×7 has many row/column tiles and K below any tile; 1×1×1 is the degenerate case.
SHAPES = [(1, 1, 1, True), (7, 33, 129, False), (65, 129, 7, True)]


def _compare(backend, device, dtype, B, N, K, with_bias, density, factored):
    require(backend, IMPLS, device, dtype)
    x, w = randn(B, K, dtype=dtype, device=device), randn(N, K, dtype=dtype, device=device)
    m = randn(N, K, dtype=dtype, device=device) if factored else None
    b = randn(N, dtype=dtype, device=device) if with_bias else None
    mask = make_mask((N, K), density, device)
    gy = randn(B, N, dtype=dtype, device=device)

    inputs = [leaf(t) for t in (x, m, w, b)]
    with run_on(backend):
        y = ops.masked_linear(inputs[0], inputs[1], inputs[2], mask, inputs[3])
        got = grads(y, inputs, gy)
    ref_in = [upcast_leaf(t) for t in (x, m, w, b)]
    y_ref = masked_linear_ref(ref_in[0], ref_in[1], ref_in[2], mask, ref_in[3])
    want = grads(y_ref, ref_in, gy.double())

    scale = linear_terms_scale(ref_in[0], ref_in[1], ref_in[2], mask, ref_in[3])  # x θᵀ and b may cancel
    assert_close(y, y_ref, dtype, "y", device=device, scale=scale)
    for name, g, r in zip(("g_x", "g_m", "g_w", "g_bias"), got, want):
        if r is not None:
            assert_close(g, r, dtype, name, device=device)
    if mask is not None:
        assert_zero_where(got[1], ~mask, "g_m")
        assert_zero_where(got[2], ~mask, "g_w")


@pytest.mark.parametrize("factored", [False, True], ids=["masked", "factored"])
@pytest.mark.parametrize("density", DENSITIES, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}N{}K{}{}".format(*s[:3], "b" if s[3] else ""))
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@over_backends
def test_matches_reference(backend, device, dtype, shape, density, factored):
    B, N, K, with_bias = shape
    _compare(backend, device, dtype, B, N, K, with_bias, density, factored)


# ------------------------------------------------------------------------ gradcheck, opcheck, compile


@pytest.mark.parametrize("factored", [False, True], ids=["masked", "factored"])
@over_backends
def test_gradcheck_float64(backend, factored):
    require(backend, IMPLS, "cpu", torch.float64)
    x, w = randn(3, 5, dtype=torch.float64), randn(4, 5, dtype=torch.float64)
    m = randn(4, 5, dtype=torch.float64) if factored else None
    b = randn(4, dtype=torch.float64)
    mask = make_mask((4, 5), 0.6)
    args = [leaf(t) for t in (x, m, w, b)]
    with run_on(backend):
        assert torch.autograd.gradcheck(
            lambda x, m, w, b: ops.masked_linear(x, m, w, mask, b), tuple(args), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("factored", [False, True], ids=["masked", "factored"])
@over_backends
def test_opcheck(backend, factored):
    require(backend, IMPLS, "cpu", torch.float32)
    x, w = randn(5, 7), randn(3, 7)
    m = randn(3, 7) if factored else None
    mask, b, gy = make_mask((3, 7), 0.5), randn(3), randn(5, 3)
    with run_on(backend):
        torch.library.opcheck(torch.ops.sparse_engine.masked_linear.default,
                              (leaf(x), leaf(m), leaf(w), mask, leaf(b)))
        torch.library.opcheck(torch.ops.sparse_engine.masked_linear_backward.default, (gy, x, m, w, mask))


def test_torch_compile_fullgraph_matches_eager():
    """masked_linear + reparam, forward and backward, compiled with fullgraph=True (no graph breaks)."""
    x, m, w, b = randn(6, 9), randn(5, 9), randn(5, 9), randn(5)
    mask = make_mask((5, 9), 0.5)

    def loss_fn(x, m, w, b):
        y = ops.masked_linear(x, m, w, mask, b)
        theta = ops.reparam(m, w, mask)
        return y.square().sum() + 0.1 * theta.square().sum()

    eager_in, comp_in = [leaf(t) for t in (x, m, w, b)], [leaf(t) for t in (x, m, w, b)]
    eager = loss_fn(*eager_in)
    eager.backward()
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)(*comp_in)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for e, c, name in zip(eager_in, comp_in, "xmwb"):
        torch.testing.assert_close(c.grad, e.grad, rtol=1e-5, atol=1e-5, msg=lambda s: f"grad {name}: {s}")


# --------------------------------------------------------------------------------- input validation


def _ok():
    return randn(4, 6), randn(3, 6), randn(3, 6), make_mask((3, 6), 0.5), randn(3)


@pytest.mark.parametrize("case,exc,needle", [
    ("x_not_tensor", TypeError, "x must be a torch.Tensor"),
    ("x_last_dim", ValueError, "x must have last dim 6"),
    ("x_dtype", ValueError, "x must have the weight dtype"),
    ("x_device", ValueError, "x must be on the weight's device"),
    ("w_1d", ValueError, "w must be 2-D"),
    ("w_int", ValueError, "w must be a floating-point tensor"),
    ("m_shape", ValueError, "m must have shape (3, 6)"),
    ("m_dtype", ValueError, "m must have dtype torch.float32"),
    ("m_device", ValueError, "m must be on"),
    ("mask_shape", ValueError, "mask must have shape (3, 6)"),
    ("mask_dtype", ValueError, "mask must have dtype torch.bool"),
    ("bias_shape", ValueError, "bias must have shape (3,)"),
    ("bias_dtype", ValueError, "bias must have dtype torch.float32"),
])
def test_bad_input_names_the_argument(case, exc, needle):
    x, m, w, mask, b = _ok()
    bad = {
        "x_not_tensor": dict(x=[[1.0] * 6]),
        "x_last_dim": dict(x=randn(4, 5)),
        "x_dtype": dict(x=x.double()),
        "x_device": dict(x=x.to("meta")),
        "w_1d": dict(w=randn(6), m=None, mask=None, b=None),
        "w_int": dict(w=torch.ones(3, 6, dtype=torch.int64), m=None),
        "m_shape": dict(m=randn(6, 3)),
        "m_dtype": dict(m=m.double()),
        "m_device": dict(m=m.to("meta")),
        "mask_shape": dict(mask=make_mask((3, 5), 0.5)),
        "mask_dtype": dict(mask=mask.float()),
        "bias_shape": dict(b=randn(4)),
        "bias_dtype": dict(b=b.half()),
    }[case]
    args = dict(x=x, m=m, w=w, mask=mask, b=b) | bad
    with pytest.raises(exc, match=needle.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        ops.masked_linear(args["x"], args["m"], args["w"], args["mask"], args["b"])


def test_non_contiguous_inputs_are_accepted():
    x, m, w, mask, b = _ok()
    xt = randn(6, 4).t()  # (4, 6) view with strides (1, 4)
    wt, mt, maskt = w.t().contiguous().t(), m.t().contiguous().t(), mask.t().contiguous().t()
    assert not (xt.is_contiguous() or wt.is_contiguous() or mt.is_contiguous() or maskt.is_contiguous())
    mt, wt = leaf(mt), leaf(wt)
    y = ops.masked_linear(xt, mt, wt, maskt, b)
    y.backward(torch.ones_like(y))
    mc, wc = leaf(m), leaf(w)
    y_ref = ops.masked_linear(xt.contiguous(), mc, wc, mask, b)
    y_ref.backward(torch.ones_like(y_ref))
    assert torch.equal(y, y_ref) and torch.equal(mt.grad, mc.grad) and torch.equal(wt.grad, wc.grad)


def test_leading_dims_are_flattened():
    x, m, w, mask, b = _ok()
    x3 = randn(2, 3, 6)
    y = ops.masked_linear(x3, m, w, mask, b)
    assert y.shape == (2, 3, 3)
    assert torch.equal(y.reshape(6, 3), ops.masked_linear(x3.reshape(6, 6), m, w, mask, b))


@pytest.mark.parametrize("forced", BACKENDS)
def test_empty_batch(forced):
    """B = 0: an empty (0, N) result and exactly zero weight gradients, whichever backend is forced
    (zero-size work never reaches a kernel, so this holds even where a kernel is missing)."""
    _, m, w, mask, b = _ok()
    m, w, b = leaf(m), leaf(w), leaf(b)
    x = leaf(randn(0, 6))
    with backends.force(forced):
        y = ops.masked_linear(x, m, w, mask, b)
        assert y.shape == (0, 3)
        y.sum().backward()
    assert x.grad.shape == (0, 6)
    for t in (m, w, b):
        assert torch.equal(t.grad, torch.zeros_like(t))
    y4 = ops.masked_linear(randn(2, 0, 6), m, w, mask, b)
    assert y4.shape == (2, 0, 3)
