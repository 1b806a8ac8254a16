"""signin_reset: re-factor θ = M ⊙ m ⊙ w to m² − w² = β (θ unchanged), and the factorisation behind it.

The invariants of the factorisation over extreme θ and β are in test_invariants.py (item 1).
"""
from __future__ import annotations

import math

import pytest
import torch
from _backends import DEVICE_DTYPES, make_mask, over_backends, randn, require, run_on
from _tolerances import assert_close

from sparse_engine.ops import backends
from sparse_engine import ops
from sparse_engine.ops.reference import factorize_ref, reparam_ref, signin_reset_ref

IMPL = ("signin_reset",)
F64 = torch.float64


def _t(v, dtype=F64):
    return torch.tensor(v, dtype=dtype)


# ------------------------------------------------------------------------------- hand-computed cases

# (θ, β, m, w) with m = sqrt(β/2 + hypot(β/2, θ)), w = θ/m; chosen so that every number is exact.
HAND = [
    (0.0, 1.0, 1.0, 0.0),  # θ = 0: m = sqrt(β), w = 0
    (6.0, 5.0, 3.0, 2.0),  # hypot(2.5, 6) = 6.5, m = sqrt(9)
    (-6.0, 5.0, 3.0, -2.0),  # sign(w) = sign(θ)
    (-12.0, 7.0, 4.0, -3.0),  # hypot(3.5, 12) = 12.5, m = sqrt(16)
    (0.0, 0.0, 0.0, 0.0),  # β = 0, θ = 0: the dead balanced start
    (4.0, 0.0, 2.0, 2.0),  # β = 0: m = |w| = sqrt|θ|
]


@pytest.mark.parametrize("theta,beta,m,w", HAND)
def test_hand_factorize(theta, beta, m, w):
    got_m, got_w = factorize_ref(_t([theta]), beta)
    assert got_m.item() == m and got_w.item() == w


def test_hand_reset_with_mask():
    m, w = _t([[2.0, 1.0, 4.0]]), _t([[3.0, -6.0, -3.0]])  # θ = [6, −6, −12]
    mask = _t([[True, False, True]], torch.bool)
    new_m, new_w = signin_reset_ref(m, w, mask, 5.0)
    # pruned coordinate: m = sqrt(β), w = 0; θ = −12 at β = 5: hypot(2.5, 12) = 12.26.., not exact
    assert new_m[0, 0].item() == 3.0 and new_w[0, 0].item() == 2.0
    assert new_m[0, 1].item() == math.sqrt(5.0) and new_w[0, 1].item() == 0.0
    assert (new_m[0, 2] * new_w[0, 2]).item() == pytest.approx(-12.0, rel=1e-15)
    assert (new_m[0, 2] ** 2 - new_w[0, 2] ** 2).item() == pytest.approx(5.0, rel=1e-14)


def test_factorize_rejects_bad_beta():
    for beta in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
            factorize_ref(_t([1.0]), beta)


# ------------------------------------------------------------------------------------ backend grid

SHAPES = [(1, 1), (7, 33), (129, 7), (5, 3, 3, 3)]


@pytest.mark.parametrize("beta", [1e-3, 1.0, 10.0], ids=lambda b: f"beta{b:g}")
@pytest.mark.parametrize("density", [None, 0.0, 0.5, 1.0], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@over_backends
def test_matches_reference(backend, device, dtype, shape, density, beta):
    require(backend, IMPL, device, dtype)
    # a decayed state: small positive m, any-sign w, so that the reset really changes them
    m = (randn(*shape, device=device).abs() * 0.3).to(dtype)
    w = randn(*shape, dtype=dtype, device=device)
    mask = make_mask(shape, density, device)
    with run_on(backend):
        new_m, new_w = ops.signin_reset(m, w, mask, beta)
    ref_m, ref_w = signin_reset_ref(m, w, mask, beta)
    assert_close(new_m, ref_m, dtype, "m", device=device, elementwise=True)
    assert_close(new_w, ref_w, dtype, "w", device=device, elementwise=True)
    # θ is unchanged (to the rounding of the storage dtype) and pruned coordinates are (sqrt β, 0)
    theta = reparam_ref(m.double(), w.double(), mask)
    assert_close(new_m * new_w, theta, dtype, "m*w vs θ before the reset", device=device, elementwise=True)
    assert bool((new_m > 0).all()), "m must be > 0 after a reset with β > 0"
    if mask is not None and not bool(mask.all()):
        assert bool((new_w[~mask] == 0).all())
        assert_close(new_m[~mask], torch.full_like(new_m[~mask], math.sqrt(beta), dtype=F64), dtype,
                     "m at pruned coordinates (sqrt β)", device=device, elementwise=True)


# ------------------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("density", [None, 0.5])
@over_backends
def test_opcheck(backend, density):
    require(backend, IMPL, "cpu", torch.float32)
    with run_on(backend):
        torch.library.opcheck(torch.ops.sparse_engine.signin_reset.default,
                              (randn(4, 6).abs(), randn(4, 6), make_mask((4, 6), density), 1.0))


# --------------------------------------------------------------------------------- input validation


@pytest.mark.parametrize("beta", [-0.5, float("nan"), float("inf"), True, "1"])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        ops.signin_reset(randn(2, 3), randn(2, 3), None, beta)


def test_bad_factors_name_the_argument():
    m, w = randn(2, 3), randn(2, 3)
    with pytest.raises(TypeError, match="m must be a torch.Tensor"):
        ops.signin_reset(None, w, None, 1.0)
    with pytest.raises(ValueError, match=r"m must have shape \(2, 3\)"):
        ops.signin_reset(randn(3, 2), w, None, 1.0)
    with pytest.raises(ValueError, match="m must have dtype torch.float32"):
        ops.signin_reset(m.double(), w, None, 1.0)
    with pytest.raises(ValueError, match="mask must have dtype torch.bool"):
        ops.signin_reset(m, w, torch.ones(2, 3), 1.0)
    with pytest.raises(ValueError, match="mask must be on cpu"):
        ops.signin_reset(m, w, torch.ones(2, 3, dtype=torch.bool, device="meta"), 1.0)


def test_reset_is_not_differentiable_and_accepts_parameters():
    m, w = torch.nn.Parameter(randn(3, 4).abs()), torch.nn.Parameter(randn(3, 4))
    new_m, new_w = ops.signin_reset(m, w, None, 1.0)
    assert not new_m.requires_grad and not new_w.requires_grad
    torch.testing.assert_close(new_m * new_w, (m * w).detach(), rtol=1e-5, atol=1e-6)


def test_non_contiguous_and_empty():
    m, w = randn(5, 4).abs().t(), randn(5, 4).t()
    new_m, new_w = ops.signin_reset(m, w, None, 2.0)
    ref_m, ref_w = ops.signin_reset(m.contiguous(), w.contiguous(), None, 2.0)  # same backend, contiguous
    assert torch.equal(new_m, ref_m) and torch.equal(new_w, ref_w)
    with backends.force("reference"):
        e_m, e_w = ops.signin_reset(randn(0, 3), randn(0, 3), None, 1.0)
    assert e_m.shape == (0, 3) and e_w.shape == (0, 3)
