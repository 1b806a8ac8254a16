"""Parameterization: every kind × layout, θ and its invariance under assign/reset, masks, checkpoints,
copies, diagnostics and bad input."""
from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from _backends import make_mask, randn

from sparse_engine.param import KINDS, Parameterization
from sparse_engine.param import STORAGES as LAYOUTS

# (weight shape, BSR block shape): a Linear weight whose edges cut partial blocks on both sides, and a
# Conv weight (viewed as 6 × 27).
SHAPES = [((10, 13), (4, 8)), ((6, 3, 3, 3), (4, 8))]


def _make(kind, layout, shape=(10, 13), block=(4, 8), density=0.5, beta=1.0, dtype=torch.float32):
    theta = randn(*shape, dtype=dtype)
    mask = make_mask(shape, density)
    if layout != "dense" or kind != "pilot":
        mask[(0,) * len(shape)] = True  # never an empty pattern
    else:
        mask = None  # PILoT trains dense until pruned
    return Parameterization(theta, kind, mask, beta=beta, layout=layout, block_shape=block), theta, mask


def _expected_theta(p, theta, mask):
    """The masked init: BSR trains whole blocks, but its initial θ is still the element-masked one."""
    return theta if mask is None else torch.where(mask, theta, torch.zeros_like(theta))


def _tol(p):
    return dict(rtol=0, atol=0) if p.kind == "masked" else dict(rtol=2e-6, atol=1e-7)


# ----------------------------------------------------------------------------------- kind × layout


@pytest.mark.parametrize("shape,block", SHAPES, ids=["linear", "conv"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_theta_is_the_masked_init(kind, layout, shape, block):
    p, theta, mask = _make(kind, layout, shape, block)
    got = p.theta()
    assert got.shape == theta.shape and got.dtype == theta.dtype
    torch.testing.assert_close(got.detach(), _expected_theta(p, theta, mask), **_tol(p))
    if mask is not None:
        assert bool((got.detach()[~mask] == 0).all())
    if kind != "masked":  # pruned coordinates and BSR padding hold m = sqrt(β), w = 0
        off = p.step_mask()
        if off is not None and not bool(off.all()):
            assert bool((p.w.detach()[~off] == 0).all())
            assert torch.equal(p.m.detach()[~off], torch.ones_like(p.m.detach()[~off]))
    # theta() is differentiable in the trainable tensors
    got.square().sum().backward()
    assert p.w.grad is not None and (p.m is None or p.m.grad is not None)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_storage_and_density(kind, layout):
    p, theta, mask = _make(kind, layout)
    numel = math.prod(theta.shape)
    if layout == "dense":
        assert p.w.shape == (10, 13)
        assert p.density() == (1.0 if mask is None else mask.float().mean().item())
    elif layout == "csr":
        assert p.w.shape == (int(mask.sum()),) and p.density() == pytest.approx(int(mask.sum()) / numel)
    else:
        nnzb = p.index.nnzb
        assert p.w.shape == (nnzb, 4, 8)
        assert p.density() == pytest.approx(int(p.dense_mask().sum()) / numel)
        assert int(p.pad_mask.sum()) == int(p.dense_mask().sum())  # padding is exactly the overhang
    assert (p.m is None) == (kind == "masked")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_assign_and_reset_keep_theta(kind, layout):
    p, _, _ = _make(kind, layout)
    new = randn(10, 13)
    p.assign(new)
    active = p.dense_mask()
    want = new if active is None else torch.where(active, new, torch.zeros_like(new))
    torch.testing.assert_close(p.theta().detach(), want, **_tol(p))
    if kind == "masked":
        with pytest.raises(RuntimeError, match="reset\\(\\) needs a factored parameterization"):
            p.reset()
        return
    before = p.theta().detach().clone()
    with torch.no_grad():
        p.m.mul_(0.5)  # decay β, keep θ by scaling w up
        p.w.mul_(2.0)
    p.reset(beta=2.0)
    assert float(p.beta) == 2.0
    torch.testing.assert_close(p.theta().detach(), before, rtol=2e-6, atol=1e-6)
    beta = p.m.detach().double() ** 2 - p.w.detach().double() ** 2
    torch.testing.assert_close(beta, torch.full_like(beta, 2.0), rtol=0, atol=1e-5)


def test_beta_zero_is_the_balanced_start():
    p = Parameterization(torch.tensor([[0.0, 4.0], [-9.0, 1.0]]), "pilot", beta=0.0)
    assert torch.equal(p.m.detach(), torch.tensor([[0.0, 2.0], [3.0, 1.0]]))
    assert torch.equal(p.w.detach(), torch.tensor([[0.0, 2.0], [-3.0, 1.0]]))


# --------------------------------------------------------------------------------------- set_mask


def test_set_mask_keeps_survivors_and_zeroes_the_rest():
    theta = randn(6, 7)
    old = make_mask((6, 7), 0.5)
    p = Parameterization(theta, "signin", old, beta=4.0)
    with torch.no_grad():  # pretend training moved the factors off the β = 4 factorisation
        p.m.add_(0.1)
        p.w.add_(0.1 * old)
    m0, w0 = p.m.detach().clone(), p.w.detach().clone()
    new = make_mask((6, 7), 0.5)
    p.set_mask(new)
    stay, rest = old & new, ~(old & new)
    assert torch.equal(p.mask, new)
    assert torch.equal(p.m.detach()[stay], m0[stay]) and torch.equal(p.w.detach()[stay], w0[stay])
    assert bool((p.m.detach()[rest] == 2.0).all()) and bool((p.w.detach()[rest] == 0).all())  # sqrt(4), 0
    theta_now = p.theta().detach()
    assert bool((theta_now[~new] == 0).all())
    torch.testing.assert_close(theta_now[stay], (m0 * w0)[stay])


def test_set_mask_from_none_and_back():
    p = Parameterization(randn(5, 4), "pilot", None)
    theta0 = p.theta().detach().clone()
    mask = make_mask((5, 4), 0.5)
    p.set_mask(mask)
    assert torch.equal(p.theta().detach(), torch.where(mask, theta0, torch.zeros_like(theta0)))
    p.set_mask(None)
    assert p.mask is None
    assert torch.equal(p.theta().detach(), torch.where(mask, theta0, torch.zeros_like(theta0)))


def test_set_mask_errors():
    p, _, _ = _make("signin", "dense")
    with pytest.raises(ValueError, match=r"mask must have shape \(10, 13\)"):
        p.set_mask(torch.ones(13, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must have dtype torch.bool"):
        p.set_mask(torch.ones(10, 13))
    q, _, _ = _make("signin", "csr")
    with pytest.raises(RuntimeError, match=r"set_mask\(\) works on the dense layout; .* is 'csr'"):
        q.set_mask(torch.ones(10, 13, dtype=torch.bool))


# ------------------------------------------------------------------------------------- checkpoints


def _assert_same_state(a: Parameterization, b: Parameterization):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if sa[k] is None or sb[k] is None:
            assert sa[k] is None and sb[k] is None, k
        else:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert torch.equal(a.theta().detach(), b.theta().detach())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_into_a_fresh_module(kind, layout):
    p, _, _ = _make(kind, layout, beta=0.37)
    with torch.no_grad():  # state that a fresh module cannot have by chance
        p.w.add_(0.01)
    sd = p.state_dict()
    assert sd["beta"].dtype == torch.float64 and float(sd["beta"]) == 0.37
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh, _, _ = _make(kind, layout, density=0.3, beta=1.0)  # other values, another pattern (size)
    w_obj = fresh.w
    fresh.load_state_dict(torch.load(buf))
    assert fresh.w is w_obj, "loading must keep the Parameter objects (optimizers hold them)"
    _assert_same_state(p, fresh)
    assert float(fresh.beta) == 0.37


def test_pilot_mask_none_vs_set_checkpoints():
    dense = Parameterization(randn(5, 6), "pilot", None)
    pruned = Parameterization(randn(5, 6), "pilot", None)
    pruned.set_mask(make_mask((5, 6), 0.5))
    dense.load_state_dict(pruned.state_dict())
    _assert_same_state(pruned, dense)
    other = Parameterization(randn(5, 6), "pilot", None)
    pruned.load_state_dict(other.state_dict())
    assert pruned.mask is None
    _assert_same_state(other, pruned)


def test_checkpoint_of_another_kind_layout_or_shape_is_refused():
    p, _, _ = _make("signin", "dense")
    for other, needle in (((("masked", "dense")), "kind"), (("signin", "csr"), "layout")):
        q, _, _ = _make(*other)
        with pytest.raises((ValueError, RuntimeError), match=needle):
            p.load_state_dict(q.state_dict())
    r = Parameterization(randn(13, 10), "signin", None)
    with pytest.raises((ValueError, RuntimeError), match="weight_shape"):
        r.load_state_dict(p.state_dict())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_deepcopy_and_pickle(kind, layout):
    p, _, _ = _make(kind, layout)
    p.diagnostics()  # the non-persistent sign cache must copy too
    for q in (copy.deepcopy(p), pickle.loads(pickle.dumps(p))):
        _assert_same_state(p, q)
        assert q.kind == kind and q.layout == layout and q.block_shape == p.block_shape
        with torch.no_grad():
            q.w.add_(1.0)
        assert not torch.equal(q.w, p.w), "the copy must not share storage with the original"


def test_dtype_casts_keep_beta_exact():
    p, _, _ = _make("signin", "dense", beta=0.1)
    p.half()
    assert p.w.dtype == torch.float16 and p.beta.dtype == torch.float64 and float(p.beta) == 0.1
    p.double()
    assert p.w.dtype == torch.float64 and float(p.beta) == 0.1


# ------------------------------------------------------------------------------------- diagnostics


def test_diagnostics_sign_flips_and_beta():
    theta = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, 0.0]])
    p = Parameterization(theta, "signin", torch.tensor([[True, True, True], [True, True, False]]), beta=1.0)
    d = p.diagnostics()
    assert d["sign_flips"] == 0 and d["density"] == pytest.approx(5 / 6)
    assert d["l1"] == pytest.approx(15.0, rel=1e-6)
    assert d["beta_mean"] == pytest.approx(1.0, abs=1e-5)
    assert d["beta_min"] == pytest.approx(1.0, abs=1e-5) and d["beta_max"] == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():  # flip two signs by hand, shrink β to 0.25 by scaling both factors by 1/2
        p.w[0, 0].neg_()
        p.w[1, 1].neg_()
        p.m.mul_(0.5)
        p.w.mul_(0.5)
    d = p.diagnostics()
    assert d["sign_flips"] == 2
    assert d["beta_mean"] == pytest.approx(0.25, abs=1e-5) and d["beta_max"] == pytest.approx(0.25, abs=1e-5)
    assert p.diagnostics()["sign_flips"] == 0  # counted since the last call


def test_diagnostics_masked_kind_has_no_beta():
    p, _, _ = _make("masked", "csr")
    d = p.diagnostics()
    assert "beta_mean" not in d and d["sign_flips"] == 0


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,exc,needle", [
    (dict(kind="dense"), ValueError, "kind must be one of"),
    (dict(layout="coo"), ValueError, "layout must be one of"),
    (dict(beta=-1.0), ValueError, "beta must be a finite number >= 0"),
    (dict(beta=float("nan")), ValueError, "beta must be a finite number >= 0"),
    (dict(beta=float("inf")), ValueError, "beta must be a finite number >= 0"),
    (dict(mask=torch.ones(13, 10, dtype=torch.bool)), ValueError,
     r"mask must have the weight's shape \(10, 13\)"),
    (dict(mask=torch.ones(10, 13)), ValueError, "mask must have dtype torch.bool"),
    (dict(theta=randn(10)), ValueError, "theta must have ndim >= 2"),
    (dict(theta=torch.ones(10, 13, dtype=torch.int64)), ValueError, "theta must be floating point"),
    (dict(theta=torch.full((10, 13), float("nan"))), ValueError, "theta must be finite"),
    (dict(layout="csr", mask=None), ValueError, "layout='csr' needs a mask"),
    (dict(layout="bsr", block_shape=(0, 4)), ValueError, "block_shape must be two positive ints"),
])
def test_bad_input_names_the_argument(kwargs, exc, needle):
    args = dict(theta=randn(10, 13), kind="signin", mask=make_mask((10, 13), 0.5), beta=1.0, layout="dense")
    args |= kwargs
    with pytest.raises(exc, match=needle):
        Parameterization(**args)


def test_bad_assign_and_reset_arguments():
    p, _, _ = _make("signin", "dense")
    with pytest.raises(ValueError, match=r"theta must have shape \(10, 13\)"):
        p.assign(randn(13, 10))
    with pytest.raises(ValueError, match="theta must be finite"):
        p.assign(torch.full((10, 13), float("inf")))
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        p.reset(beta=-2.0)
