"""The methods: dense, static, Sign-In, PILoT (final prune, iterative prune-retrain), wd_switchoff, Compose."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparse_engine.masks import layer_densities, num_active
from sparse_engine.methods import Compose, PILoT, SignIn, Static, WDSwitchOff, make_method
from sparse_engine.models import MLP
from sparse_engine.optim import SGD, AdamW, parameterizations


def small_model():
    return MLP(20, (24, 16), 4)


def data(n=64):
    return torch.randn(n, 20), torch.randint(0, 4, (n,))


def run_steps(model, opt, n, x=None, y=None):
    for _ in range(n):
        xb, yb = (x, y) if x is not None else data(16)
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()


def layers(model):
    return dict(parameterizations(model))


def test_make_method_errors_name_the_argument():
    with pytest.raises(ValueError, match="method must be one of"):
        make_method("lottery")
    for bad in (0.0, 1.5, float("nan"), -0.1, "0.1"):
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]|density must be a number"):
            make_method("signin", density=bad)
    with pytest.raises(ValueError, match="unknown option"):
        make_method("static", reset_every=3)
    with pytest.raises(ValueError, match="reset_policy"):
        make_method("signin", reset_policy="flip")
    with pytest.raises(ValueError, match="prune_scope"):
        make_method("pilot", prune_scope="row")
    with pytest.raises(ValueError, match="at"):
        make_method("signin", wd_switchoff=1.5)


def test_apply_needs_a_sparse_engine_optimizer():
    model = small_model()
    m = make_method("dense")
    with pytest.raises(TypeError, match="sparse_engine.optim"):
        m.apply(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_dense_leaves_the_model_alone():
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = make_method("dense")
    assert m.prepare(model) is None
    assert not layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_static_mask_is_fixed_and_exact():
    model = small_model()
    m = make_method("static", density=0.3, distribution="erk", seed=3)
    report = m.prepare(model)
    lay = layers(model)
    assert lay and all(pz.kind == "masked" for pz in lay.values())
    total = sum(pz.w.numel() for pz in lay.values())
    assert report.nnz == num_active(0.3, total)
    masks = {n: pz.dense_mask().clone() if pz.dense_mask() is not None else None for n, pz in lay.items()}
    assert any(mask is not None for mask in masks.values())
    opt = m.make_optimizer(model, "sgd", lr=0.1, momentum=0.9, weight_decay=1e-3)
    m.apply(model, opt, epochs=1, steps_per_epoch=10)
    run_steps(model, opt, 10)
    for n, pz in lay.items():
        mask = masks[n]
        if mask is None:
            continue
        assert torch.equal(pz.dense_mask(), mask)
        assert not pz.theta().detach()[~mask].any()


def test_signin_resets_every_p_steps_restore_beta_and_keep_theta():
    model = small_model()
    m = make_method("signin", density=0.5, reset_every=3, reset_unit="step", reset_policy="transform")
    m.prepare(model)
    opt = m.make_optimizer(model, "sgd", lr=0.2, momentum=0.9, weight_decay=0.05)
    m.apply(model, opt, epochs=1, steps_per_epoch=9)
    x, y = data(16)
    for step in range(1, 10):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()  # the method's per-step hook runs inside step()
        for pz in layers(model).values():
            beta = (pz.m**2 - pz.w**2).detach()[pz.step_mask()] if pz.step_mask() is not None else \
                (pz.m**2 - pz.w**2).detach()
            if step % 3 == 0:
                torch.testing.assert_close(beta, torch.ones_like(beta), rtol=1e-5, atol=1e-5)
            else:
                assert float(beta.min()) < 1.0 - 1e-4  # decay and gradient noise eroded it
    assert opt.num_resets == 3 and m.schedule.count == 3 and len(m.beta_before) == 3
    assert all(b < 1.0 for b in m.beta_before)


def test_signin_reset_by_epoch_until_fraction():
    model = small_model()
    m = make_method("signin", density=0.5, reset_every=1, reset_unit="epoch", reset_until=0.5)
    m.prepare(model)
    opt = m.make_optimizer(model, "sgd", lr=0.1, momentum=0.9, weight_decay=1e-2)
    m.apply(model, opt, epochs=6, steps_per_epoch=2)
    x, _ = data(32)
    fired = []
    for epoch in range(1, 7):
        run_steps(model, opt, 2)
        out_before = model(x).detach()
        log = m.after_epoch(epoch, 0.5)
        torch.testing.assert_close(model(x).detach(), out_before, rtol=1e-4, atol=1e-5)  # §4.2
        if "beta_before_reset" in log:
            fired.append(epoch)
    assert fired == [1, 2, 3]


def test_method_ignores_steps_the_optimizer_skipped():
    model = small_model()
    m = make_method("signin", density=0.5, reset_every=1, reset_unit="step")
    m.prepare(model)
    opt = m.make_optimizer(model, "sgd", lr=0.1)
    m.apply(model, opt, epochs=1, steps_per_epoch=4)
    x, y = data(8)
    F.cross_entropy(model(x), y).backward()
    next(iter(model.parameters())).grad.fill_(float("nan"))
    opt.step()
    assert opt.skipped_steps == 1 and opt.num_resets == 0
    run_steps(model, opt, 1)
    assert opt.num_resets == 1


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_pilot_final_prune_reaches_density(scope):
    model = small_model()
    m = make_method("pilot", density=0.2, prune_scope=scope, distribution="erk", alpha=1e-3)
    report = m.prepare(model)
    lay = layers(model)
    assert all(pz.kind == "pilot" and pz.dense_mask() is None for pz in lay.values())
    opt = m.make_optimizer(model, "sgd", lr=0.1, momentum=0.9)
    m.apply(model, opt, epochs=2, steps_per_epoch=3)
    assert all(g["alpha"] == 1e-3 for g in opt.param_groups)
    for epoch in (1, 2):
        run_steps(model, opt, 3)
        log = m.after_epoch(epoch, 0.3 + 0.1 * epoch)
        assert log["alpha"] == opt.param_groups[0]["alpha"] and log["l1"] > 0
    assert m.end_of_training() is None
    shapes = {n: pz.weight_shape for n, pz in lay.items()}
    total = sum(pz.w.numel() for pz in lay.values())
    kept = {n: int(pz.dense_mask().sum()) for n, pz in lay.items()}
    if scope == "global":
        assert sum(kept.values()) == num_active(0.2, total)
    else:
        dens = layer_densities(shapes, 0.2, "erk")
        assert kept == {n: num_active(dens[n], pz.w.numel()) for n, pz in lay.items()}
    for pz in lay.values():  # what was pruned is the smallest |θ|, now exactly 0 with zero state
        mask = pz.step_mask()
        assert not pz.theta().detach().reshape(mask.shape)[~mask].any()
        for p in (pz.m, pz.w):
            assert not opt.state[p]["momentum_buffer"][~mask].any()
    assert report.method == "pilot"


def test_pilot_prune_keeps_the_largest_magnitudes():
    model = small_model()
    m = make_method("pilot", density=0.25, prune_scope="global")
    m.prepare(model)
    opt = m.make_optimizer(model, "sgd", lr=0.05)
    m.apply(model, opt, epochs=1, steps_per_epoch=1)
    thetas = {n: pz.theta().detach().abs().clone() for n, pz in layers(model).items()}
    m.end_of_training()
    kept = torch.cat([thetas[n][pz.dense_mask()] for n, pz in layers(model).items()])
    dropped = torch.cat([thetas[n][~pz.dense_mask()] for n, pz in layers(model).items()])
    assert float(kept.min()) >= float(dropped.max())


@pytest.mark.parametrize("rewind", ["lr", "weight"])
def test_pilot_iterative_prune_retrain(rewind):
    model = small_model()
    m = make_method("pilot", density=0.5, iterative=True, prune_fraction=0.2, retrain_epochs=1, rewind=rewind,
                    prune_scope="global")
    m.prepare(model)
    theta_init = {n: pz.theta().detach().clone() for n, pz in layers(model).items()}
    opt = m.make_optimizer(model, "adamw", lr=1e-2)
    m.apply(model, opt, epochs=1, steps_per_epoch=2)
    assert m.densities == pytest.approx([0.8, 0.64, 0.512, 0.5])
    run_steps(model, opt, 2)
    m.after_epoch(1, 0.5)
    total = sum(pz.w.numel() for pz in layers(model).values())
    rounds = 0
    while (r := m.end_of_training()) is not None:
        rounds += 1
        assert r.round == rounds and r.epochs == 1
        kept = sum(int(pz.dense_mask().sum()) for pz in layers(model).values())
        assert kept == num_active(r.density, total)
        assert all(g["alpha"] == 0.0 for g in opt.param_groups) and not opt.state
        if rewind == "weight":
            for n, pz in layers(model).items():
                mask = pz.dense_mask()
                torch.testing.assert_close(pz.theta().detach()[mask], theta_init[n][mask], rtol=1e-5, atol=1e-6)
        run_steps(model, opt, 2)
        m.after_epoch(1 + rounds, 0.5)
    assert rounds == 4


def test_wd_switchoff_composes_with_signin():
    model = small_model()
    m = make_method("signin", density=0.5, reset_every=2, reset_unit="step", wd_switchoff=0.5)
    assert isinstance(m, Compose) and m.name == "signin+wd_switchoff"
    m.prepare(model)
    opt = m.make_optimizer(model, "sgd", lr=0.1, momentum=0.9, weight_decay=1e-2)
    m.apply(model, opt, epochs=2, steps_per_epoch=5)
    for step in range(1, 11):
        run_steps(model, opt, 1)
        assert opt.param_groups[0]["weight_decay"] == (1e-2 if step < 5 else 0.0)
    log = m.after_epoch(2, 0.5)
    assert log["wd_off"] is True and log["wd_dose"] == pytest.approx(5 * 0.1 * 1e-2)
    assert opt.num_resets == 5
    sd = m.state_dict()
    m2 = make_method("signin", density=0.5, reset_every=2, reset_unit="step", wd_switchoff=0.5)
    m2.apply(model, SGD(model, lr=0.1), epochs=2, steps_per_epoch=5)
    m2.load_state_dict(sd)
    assert m2.methods[0].schedule.count == 5 and m2.methods[1].schedule.switched


def test_compose_rejects_two_sparsifiers():
    with pytest.raises(ValueError, match="only one method may sparsify"):
        Compose([Static(density=0.5), SignIn(density=0.5)])
    assert Compose([WDSwitchOff(), PILoT(density=0.5)]).sparsify_as == "pilot"


def test_factor_lr_scale_puts_factors_in_their_own_group():
    model = small_model()
    m = make_method("signin", density=0.5, factor_lr_scale=2.0)
    m.prepare(model)
    opt = m.make_optimizer(model, "sgd", lr=0.05)
    groups = {g["name"]: float(g["lr"]) for g in opt.param_groups}
    assert groups == {"factors": pytest.approx(0.1), "other": pytest.approx(0.05)}
    assert isinstance(make_method("static", density=0.5).make_optimizer(small_model(), "adamw"), AdamW)


@pytest.mark.parametrize("method, reference", [
    (lambda: make_method("wd_switchoff", at=0.0), lambda: make_method("dense")),
    (lambda: make_method("signin", density=0.5, wd_switchoff=0.0), lambda: make_method("signin", density=0.5)),
], ids=["alone", "with-signin"])
def test_wd_switchoff_at_zero_never_decays(method, reference):
    """at=0: no step has weight decay, the first one included; the run equals one with weight_decay=0."""
    x, y = data(16)
    runs, logs = [], []
    for make, wd in ((method, 5e-2), (reference, 0.0)):
        torch.manual_seed(0)
        model, m = small_model(), make()
        m.prepare(model)
        opt = m.make_optimizer(model, "sgd", lr=0.1, momentum=0.9, weight_decay=wd)
        m.apply(model, opt, epochs=1, steps_per_epoch=3)
        assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)  # before the first step
        run_steps(model, opt, 3, x, y)
        runs.append([p.detach().clone() for p in model.parameters()])
        logs.append(m.after_epoch(1, 0.5))
    assert logs[0]["wd_off"] is True and logs[0]["wd_dose"] == 0.0
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
