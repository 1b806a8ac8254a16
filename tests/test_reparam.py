"""reparam: θ = M ⊙ m ⊙ w and its backward g_m = G ⊙ M ⊙ w, g_w = G ⊙ M ⊙ m (any weight shape)."""
from __future__ import annotations

import pytest
import torch
from _backends import (DENSITIES, DEVICE_DTYPES, assert_zero_where, grads, leaf, make_mask, over_backends,
                       randn, require, run_on, upcast_leaf)
from _tolerances import assert_close

from sparse_engine.ops import backends
from sparse_engine import ops
from sparse_engine.ops.reference import reparam_backward_ref, reparam_ref

IMPLS = ("reparam_fwd", "reparam_bwd")


def _t(v, dtype=torch.float64):
    return torch.tensor(v, dtype=dtype)


# ------------------------------------------------------------------------------- hand-computed cases

M = [[2.0, -1.0], [0.5, 3.0]]
W = [[1.5, 2.0], [-4.0, 0.25]]
MASK = [[True, False], [True, True]]
G = [[1.0, 2.0], [3.0, -1.0]]


def test_hand_case_reference():
    m, w, mask, g = _t(M), _t(W), _t(MASK, torch.bool), _t(G)
    assert torch.equal(reparam_ref(m, w, mask), _t([[3.0, 0.0], [-2.0, 0.75]]))
    assert torch.equal(reparam_ref(m, w, None), _t([[3.0, -2.0], [-2.0, 0.75]]))
    assert torch.equal(reparam_ref(None, w, mask), _t([[1.5, 0.0], [-4.0, 0.25]]))
    g_m, g_w = reparam_backward_ref(g, m, w, mask)
    assert torch.equal(g_m, _t([[1.5, 0.0], [-12.0, -0.25]]))  # G⊙M⊙w
    assert torch.equal(g_w, _t([[2.0, 0.0], [1.5, -3.0]]))  # G⊙M⊙m
    g_m, g_w = reparam_backward_ref(g, None, w, mask)
    assert g_m is None and torch.equal(g_w, _t([[1.0, 0.0], [3.0, -1.0]]))


def test_hand_case_through_op():
    m, w = leaf(_t(M)), leaf(_t(W))
    with backends.force("reference"):
        theta = ops.reparam(m, w, _t(MASK, torch.bool))
    theta.backward(_t(G))
    assert torch.equal(theta.detach(), _t([[3.0, 0.0], [-2.0, 0.75]]))
    assert torch.equal(m.grad, _t([[1.5, 0.0], [-12.0, -0.25]]))
    assert torch.equal(w.grad, _t([[2.0, 0.0], [1.5, -3.0]]))


def test_outputs_never_alias_inputs():
    """A registered op may not return its input; with nothing to do the reference still copies."""
    w, g = randn(3, 4), randn(3, 4)
    theta = reparam_ref(None, w, None)
    assert theta.data_ptr() != w.data_ptr() and torch.equal(theta, w)
    _, g_w = reparam_backward_ref(g, None, w, None)
    assert g_w.data_ptr() != g.data_ptr() and torch.equal(g_w, g)


def test_nan_at_pruned_coordinate_does_not_leak():
    m, w = randn(2, 3, dtype=torch.float64), randn(2, 3, dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    m[1, 2], w[1, 2] = float("inf"), float("nan")
    assert torch.isfinite(reparam_ref(m, w, mask)).all()
    g = randn(2, 3, dtype=torch.float64)
    g[1, 2] = float("nan")
    g_m, g_w = reparam_backward_ref(g, m, w, mask)
    assert g_m[1, 2] == 0 and g_w[1, 2] == 0 and torch.isfinite(g_m).all() and torch.isfinite(g_w).all()


# ------------------------------------------------------------------------------------ backend grid

SHAPES = [(1, 1), (7, 33), (129, 7), (5, 3, 3, 3)]  # the last: a Conv weight (out, in, kh, kw)


@pytest.mark.parametrize("factored", [False, True], ids=["masked", "factored"])
@pytest.mark.parametrize("density", DENSITIES, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@over_backends
def test_matches_reference(backend, device, dtype, shape, density, factored):
    require(backend, IMPLS, device, dtype)
    w = randn(*shape, dtype=dtype, device=device)
    m = randn(*shape, dtype=dtype, device=device) if factored else None
    mask = make_mask(shape, density, device)
    g = randn(*shape, dtype=dtype, device=device)
    inputs = [leaf(m), leaf(w)]
    with run_on(backend):
        theta = ops.reparam(inputs[0], inputs[1], mask)
        got = grads(theta, inputs, g)
    ref_in = [upcast_leaf(m), upcast_leaf(w)]
    theta_ref = reparam_ref(ref_in[0], ref_in[1], mask)
    want = grads(theta_ref, ref_in, g.double())
    assert_close(theta, theta_ref, dtype, "theta", device=device, elementwise=True)
    for name, a, b in zip(("g_m", "g_w"), got, want):
        if b is not None:
            assert_close(a, b, dtype, name, device=device, elementwise=True)
    if mask is not None:
        assert_zero_where(theta, ~mask, "theta")
        assert_zero_where(got[0], ~mask, "g_m")
        assert_zero_where(got[1], ~mask, "g_w")


# ------------------------------------------------------------------------------- gradcheck, opcheck


@pytest.mark.parametrize("factored", [False, True], ids=["masked", "factored"])
@over_backends
def test_gradcheck_float64(backend, factored):
    require(backend, IMPLS, "cpu", torch.float64)
    w = leaf(randn(4, 5, dtype=torch.float64))
    m = leaf(randn(4, 5, dtype=torch.float64)) if factored else None
    mask = make_mask((4, 5), 0.6)
    with run_on(backend):
        assert torch.autograd.gradcheck(lambda m, w: ops.reparam(m, w, mask), (m, w), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("density", [None, 0.5])
@pytest.mark.parametrize("factored", [False, True], ids=["masked", "factored"])
@over_backends
def test_opcheck(backend, factored, density):
    require(backend, IMPLS, "cpu", torch.float32)
    w = randn(4, 6)
    m = randn(4, 6) if factored else None
    mask = make_mask((4, 6), density)
    with run_on(backend):
        torch.library.opcheck(torch.ops.sparse_engine.reparam.default, (leaf(m), leaf(w), mask))
        torch.library.opcheck(torch.ops.sparse_engine.reparam_backward.default, (randn(4, 6), m, w, mask))


# --------------------------------------------------------------------------------- input validation


@pytest.mark.parametrize("case,exc,needle", [
    ("w_not_tensor", TypeError, "w must be a torch.Tensor"),
    ("w_int", ValueError, "w must be a floating-point tensor"),
    ("m_shape", ValueError, r"m must have shape \(3, 4\)"),
    ("m_dtype", ValueError, "m must have dtype torch.float32"),
    ("m_device", ValueError, "m must be on cpu"),
    ("mask_shape", ValueError, r"mask must have shape \(3, 4\)"),
    ("mask_dtype", ValueError, "mask must have dtype torch.bool"),
    ("mask_device", ValueError, "mask must be on cpu"),
])
def test_bad_input_names_the_argument(case, exc, needle):
    m, w, mask = randn(3, 4), randn(3, 4), make_mask((3, 4), 0.5)
    args = dict(m=m, w=w, mask=mask) | {
        "w_not_tensor": dict(w=3.0, m=None, mask=None),
        "w_int": dict(w=torch.ones(3, 4, dtype=torch.int32), m=None),
        "m_shape": dict(m=randn(4, 3)),
        "m_dtype": dict(m=m.half()),
        "m_device": dict(m=m.to("meta")),
        "mask_shape": dict(mask=make_mask((3, 5), 0.5)),
        "mask_dtype": dict(mask=mask.to(torch.uint8)),
        "mask_device": dict(mask=mask.to("meta")),
    }[case]
    with pytest.raises(exc, match=needle):
        ops.reparam(args["m"], args["w"], args["mask"])


def test_non_contiguous_inputs_are_accepted():
    m, w, mask = randn(6, 5), randn(6, 5), make_mask((6, 5), 0.5)
    mt, wt, maskt = leaf(m.t().contiguous().t()), leaf(w.t().contiguous().t()), mask.t().contiguous().t()
    assert not (mt.is_contiguous() or wt.is_contiguous() or maskt.is_contiguous())
    theta = ops.reparam(mt, wt, maskt)
    g = randn(6, 5).t().contiguous().t()  # a non-contiguous incoming gradient as well
    theta.backward(g)
    mc, wc = leaf(m), leaf(w)
    theta_c = ops.reparam(mc, wc, mask)  # same backend, contiguous inputs
    theta_c.backward(g.contiguous())
    assert torch.equal(theta, theta_c) and torch.equal(mt.grad, mc.grad) and torch.equal(wt.grad, wc.grad)


def test_empty_weight():
    m, w = leaf(randn(0, 4)), leaf(randn(0, 4))
    theta = ops.reparam(m, w, torch.zeros(0, 4, dtype=torch.bool))
    assert theta.shape == (0, 4)
    theta.sum().backward()
    assert m.grad.shape == (0, 4) and w.grad.shape == (0, 4)
