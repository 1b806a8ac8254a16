"""The invariants of θ = m ⊙ w that every backend keeps (items 1–5 below; the linear-regression check is
test_regression_recovery.py).

Where an invariant involves an op it runs through the public ops on every backend that can run it.
"""
from __future__ import annotations

import math

import pytest
import torch
from _backends import make_mask, over_backends, randn, require, run_on

from sparse_engine import ops
from sparse_engine.param import Parameterization
from sparse_engine.ops.reference import factorize_ref

F64 = torch.float64

# ---------------------------------------------------------------- 1. the factorisation θ = m ⊙ w, β


THETAS = [0.0, 1e-30, -1e-30, 1e-6, -1e-6, 0.5, -1.0, 3.0, -1e6, 1e30, -1e30]
BETAS = [1e-6, 1e-4, 1e-2, 1.0, 10.0]


def _check_factorisation(theta: torch.Tensor, m: torch.Tensor, w: torch.Tensor, beta: float, eps: float):
    """m ⊙ w = θ and m² − w² = β to the rounding of the storage dtype (``eps`` = its unit roundoff)."""
    t, m64, w64 = theta.double(), m.double(), w.double()
    prod_err = (m64 * w64 - t).abs()
    worst = float((prod_err / t.abs().clamp_min(1e-300)).max())
    assert bool((prod_err <= 4 * eps * t.abs()).all()), f"m*w != θ: worst relative error {worst:.3g}"
    beta_err = (m64 * m64 - w64 * w64 - beta).abs()
    bound = 6 * eps * (m64 * m64 + w64 * w64)
    assert bool((beta_err <= bound).all()), f"m²−w² != β={beta}: worst err {float(beta_err.max()):.3g}"
    assert bool((m > 0).all()), "m must be > 0 for β > 0"
    assert torch.equal(torch.sign(w), torch.sign(theta)), "sign(w) must equal sign(θ)"
    assert bool((w[theta == 0] == 0).all()) and bool(torch.isfinite(m).all() and torch.isfinite(w).all())


@pytest.mark.parametrize("beta", BETAS, ids=lambda b: f"beta{b:g}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@over_backends
def test_factorisation_extreme_theta(backend, dtype, beta):
    """Through ops.signin_reset (m = θ, w = 1 is a factorisation of θ; the reset re-factors it to β)."""
    require(backend, ("signin_reset",), "cpu", dtype)
    theta = torch.tensor(THETAS, dtype=dtype)
    theta = torch.cat([theta, randn(200, dtype=dtype) * torch.logspace(-20, 20, 200, dtype=dtype)])
    with run_on(backend):
        m, w = ops.signin_reset(theta.clone(), torch.ones_like(theta), None, beta)
    _check_factorisation(theta, m, w, beta, torch.finfo(dtype).eps / 2)


@pytest.mark.parametrize("beta", BETAS, ids=lambda b: f"beta{b:g}")
def test_factorisation_bf16_storage_is_computed_in_fp32(beta):
    theta = torch.tensor(THETAS, dtype=torch.float32)
    theta = torch.cat([theta, randn(200) * torch.logspace(-20, 20, 200)]).to(torch.bfloat16)
    m, w = factorize_ref(theta, beta)
    assert m.dtype == w.dtype == torch.bfloat16
    m32, w32 = factorize_ref(theta.float(), beta)
    assert torch.equal(m, m32.to(torch.bfloat16)) and torch.equal(w, w32.to(torch.bfloat16)), \
        "bf16 factors must be the fp32 factors rounded once"
    # rounding m and w to bf16 (eps 2^-9) each: m*w within ~2 eps of θ, m²−w² within ~4 eps of m²+w²
    _check_factorisation(theta, m, w, beta, 2.0 ** -8)


# ---------------------------------------------------------------- 2. a reset leaves θ and the output


@pytest.mark.parametrize("layout", ["dense", "csr", "bsr"])
@over_backends
def test_reset_keeps_theta_and_output(backend, layout):
    require(backend, ("signin_reset", "reparam_fwd", "masked_linear_fwd"), "cpu", torch.float32)
    mask = make_mask((12, 20), 0.4)
    p = Parameterization(randn(12, 20), "signin", mask, beta=1.0, layout=layout, block_shape=(4, 8))
    x = randn(5, 20)
    with run_on(backend), torch.no_grad():
        for param in (p.m, p.w):  # move away from the β = 1 factorisation: β decays, signs mix
            param.mul_(0.7).add_(0.2 * randn(*param.shape))
        theta0 = p.theta().clone()
        y0 = x @ theta0.t()
        y0_op = ops.masked_linear(x, None, theta0, None)
        m0, w0 = p.m.clone(), p.w.clone()
        p.reset(beta=1.0)
        theta1 = p.theta()
        y1_op = ops.masked_linear(x, None, theta1, None)
    assert not torch.equal(p.m, m0) and not torch.equal(p.w, w0), "the reset must change m and w"
    torch.testing.assert_close(theta1, theta0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(y1_op, y0_op, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y1_op, y0, rtol=1e-5, atol=1e-5)
    beta = (p.m.double() ** 2 - p.w.double() ** 2)
    active = p.step_mask()
    beta = beta if active is None else beta[active]
    torch.testing.assert_close(beta, torch.ones_like(beta), rtol=0, atol=1e-5)


# ------------------------------------------------------- 3. one SGD step scales β by (1−ηλ)² − η²g²


def test_beta_after_one_sgd_step_plain_torch_fp64():
    m, w, g = randn(1000, dtype=F64), randn(1000, dtype=F64), randn(1000, dtype=F64)
    eta, lam = 0.05, 0.1
    beta = m * m - w * w
    m2 = (1 - eta * lam) * m - eta * g * w  # ∂L/∂m = g·w, decay λ on both factors
    w2 = (1 - eta * lam) * w - eta * g * m
    torch.testing.assert_close(m2 * m2 - w2 * w2, beta * ((1 - eta * lam) ** 2 - eta**2 * g * g),
                               rtol=1e-12, atol=1e-12)


@over_backends
def test_beta_after_one_fused_sgd_step(backend):
    """The same through the engine: G → reparam backward → fused_step(sgd, weight decay) on m and w."""
    require(backend, ("reparam_bwd", "fused_step"), "cpu", F64)
    m, w, G = randn(500, dtype=F64), randn(500, dtype=F64), randn(500, dtype=F64)
    eta, lam = 0.05, 0.1
    beta = m * m - w * w
    with run_on(backend):
        ml, wl = m.clone().requires_grad_(True), w.clone().requires_grad_(True)
        ops.reparam(ml, wl, None).backward(G)
        mm, ww = m.clone(), w.clone()
        lr = torch.tensor(eta, dtype=F64)
        ops.fused_step(mm, ml.grad, None, None, None, lr, 1, "sgd", weight_decay=lam)
        ops.fused_step(ww, wl.grad, None, None, None, lr, 1, "sgd", weight_decay=lam)
    torch.testing.assert_close(mm * mm - ww * ww, beta * ((1 - eta * lam) ** 2 - eta**2 * G * G),
                               rtol=1e-11, atol=1e-11)


# ---------------------------------------------- 4. β = 0 pins a coordinate at θ = 0; β = 1 lets it move


def _train_scalar(backend, theta0: float, beta: float, target: float, steps: int, wd: float = 0.0):
    """SGD on (m, w) of one coordinate, loss (θ − target)², through reparam + fused_step. θ history."""
    m, w = factorize_ref(torch.tensor([theta0], dtype=F64), beta)
    lr = torch.tensor(0.05, dtype=F64)
    history = []
    with run_on(backend):
        for step in range(1, steps + 1):
            ml, wl = m.clone().requires_grad_(True), w.clone().requires_grad_(True)
            theta = ops.reparam(ml, wl, None)
            ((theta - target) ** 2).sum().backward()
            ops.fused_step(m, ml.grad, None, None, None, lr, step, "sgd", weight_decay=wd)
            ops.fused_step(w, wl.grad, None, None, None, lr, step, "sgd", weight_decay=wd)
            history.append(float(m * w))
    return history, m, w


@pytest.mark.parametrize("wd", [0.0, 0.01])
@over_backends
def test_beta_zero_coordinate_at_zero_never_moves(backend, wd):
    require(backend, ("reparam_fwd", "reparam_bwd", "fused_step"), "cpu", F64)
    history, m, w = _train_scalar(backend, 0.0, 0.0, target=1.0, steps=50, wd=wd)
    assert m.item() == 0.0 and w.item() == 0.0 and all(h == 0.0 for h in history)


@over_backends
def test_beta_one_coordinate_at_zero_moves_and_flips(backend):
    require(backend, ("reparam_fwd", "reparam_bwd", "fused_step"), "cpu", F64)
    history, _, _ = _train_scalar(backend, 0.0, 1.0, target=1.0, steps=1)
    assert history[0] != 0.0, "with β = 1 a coordinate at θ = 0 must move"
    history, _, _ = _train_scalar(backend, -0.5, 1.0, target=1.0, steps=200)
    assert history[-1] > 0.9, f"with β = 1, θ must cross zero from −0.5 to the target +1, got {history[-1]}"
    # The contrast: with β = 0 the same start can approach zero but never cross it (β' = β(1 − η²g²) = 0
    # keeps |m| = |w|, so θ = −m² ≤ 0 at every step). In floating point the factorised β is ~1e-17, not 0,
    # so θ may reach that size on the other side, never more.
    history0, _, _ = _train_scalar(backend, -0.5, 0.0, target=1.0, steps=200)
    assert max(history0) <= 1e-12, f"with β = 0, θ crossed zero: max {max(history0)}"
    assert min(history0) < -1e-3 or history0[-1] <= 0.0


# --------------------------------------------- 5. pruned coordinates: θ, gradient and state exactly 0


def _pruned_state_checks(p: Parameterization, states: list[torch.Tensor]):
    off = ~p.dense_mask().reshape(p.shape2d)
    theta = p.theta().detach().reshape(p.shape2d)
    assert bool((theta[off] == 0).all()), "θ must stay exactly 0 at pruned coordinates"
    for t in states:
        assert bool((t.reshape(p.shape2d)[off] == 0).all()), "optimizer state must be exactly 0 where pruned"


@pytest.mark.parametrize("kind,h", [
    ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=0.05, alpha=1e-2)),
    ("adamw", dict(weight_decay=0.1, alpha=1e-2)),
], ids=["sgd", "adamw"])
@over_backends
def test_pruned_coordinates_stay_zero_with_fused_step(backend, kind, h):
    require(backend, ("masked_linear_fwd", "masked_linear_bwd", "fused_step", "signin_reset"), "cpu",
            torch.float32)
    mask = make_mask((9, 14), 0.4)
    p = Parameterization(randn(9, 14), "signin", mask, beta=1.0)
    state = {name: [torch.zeros_like(t), torch.zeros_like(t)] for name, t, _ in p.step_targets()}
    with run_on(backend):
        for step in range(1, 9):
            x = randn(6, 14)
            y = ops.masked_linear(x, p.m, p.w, p.mask)
            (y.square().sum()).backward()
            for name, t, step_mask in p.step_targets():
                assert bool((t.grad[~mask] == 0).all()), f"grad of {name} must be exactly 0 where pruned"
                b1, b2 = state[name]
                with torch.no_grad():
                    ops.fused_step(t, t.grad, b1, b2 if kind == "adamw" else None, step_mask,
                                   torch.tensor(0.01), step, kind, **h)
                t.grad = None
            if step % 3 == 0:
                p.reset()
            _pruned_state_checks(p, [b for pair in state.values() for b in pair])


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_pruned_coordinates_stay_zero_with_torch_optim(opt):
    """Even a mask-unaware torch optimizer with weight decay keeps θ = 0 and zero state there: the
    gradients at pruned coordinates are exactly 0 and w = 0 decays to 0."""
    mask = make_mask((9, 14), 0.4)
    p = Parameterization(randn(9, 14), "signin", mask, beta=1.0)
    o = (torch.optim.SGD(p.parameters(), lr=0.01, momentum=0.9, weight_decay=0.1) if opt == "sgd"
         else torch.optim.AdamW(p.parameters(), lr=0.01, weight_decay=0.1))
    for _ in range(6):
        ops.masked_linear(randn(6, 14), p.m, p.w, p.mask).square().sum().backward()
        o.step()
        o.zero_grad()
    # m keeps decaying at pruned coordinates (harmless: θ = M⊙m⊙w); w gets exactly zero gradient there
    w_states = [v for k, v in o.state[p.w].items() if k != "step"]
    assert w_states
    _pruned_state_checks(p, w_states)
    assert bool((p.w.detach()[~mask] == 0).all()) and math.isfinite(float(p.m.detach().sum()))
