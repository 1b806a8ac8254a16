"""The fused optimizer: torch.optim equivalence, state_dict, invariants §4.3 / §4.5, resets, step-in-backward."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_engine.optim import SGD, AdamW, NonFiniteGradError, transform_adam, transform_momentum
from sparse_engine.param import Parameterization


class PLinear(nn.Module):
    """A linear layer whose weight is a Parameterization (independent of sparse_engine.nn)."""

    def __init__(self, n_in, n_out, kind="masked", mask=None, beta=1.0, dtype=torch.float32):
        super().__init__()
        theta = torch.randn(n_out, n_in, dtype=dtype) / math.sqrt(n_in)
        self.param = Parameterization(theta, kind, mask=mask, beta=beta)
        self.bias = nn.Parameter(torch.randn(n_out, dtype=dtype) * 0.1)

    def forward(self, x):
        return F.linear(x, self.param.theta(), self.bias)


def make_model(kind="masked", density=1.0, dtype=torch.float32, beta=1.0, sizes=(9, 13, 5)):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        mask = None if density == 1.0 else torch.rand(b, a) < density
        if density == 1.0 and i == 0:
            mask = torch.ones(b, a, dtype=torch.bool)  # "Masked at density 1.0": an all-true mask
        layers += [PLinear(a, b, kind, mask, beta, dtype), nn.Tanh()]
    layers.append(nn.LayerNorm(sizes[-1], dtype=dtype))  # an ordinary parameter with a norm
    return nn.Sequential(*layers)


def torch_twin(model):
    """The same network with plain nn.Linear weights θ (for torch.optim)."""
    layers = []
    for mod in model:
        if isinstance(mod, PLinear):
            lin = nn.Linear(mod.param.weight_shape[1], mod.param.weight_shape[0], dtype=mod.bias.dtype)
            with torch.no_grad():
                lin.weight.copy_(mod.param.theta())
                lin.bias.copy_(mod.bias)
            layers.append(lin)
        else:
            layers.append(copy.deepcopy(mod))
    return nn.Sequential(*layers)


def pairs(model, twin):
    """(our tensor, torch tensor) for every trainable tensor, in parameter order."""
    out = []
    for mod, tmod in zip(model, twin):
        if isinstance(mod, PLinear):
            out += [(mod.bias, tmod.bias), (mod.param.w, tmod.weight)]
        else:
            out += list(zip(mod.parameters(), tmod.parameters()))
    return out


def assert_same_state(a, b, what):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        same = torch.equal(v, sb[k]) if isinstance(v, torch.Tensor) else v == sb[k]
        assert same, f"{k} differs {what}"


def loss_fn(model, x, y):
    return F.cross_entropy(model(x), y)


def batch(dtype, n_in=9, n_cls=5, b=6):
    return torch.randn(b, n_in, dtype=dtype), torch.randint(0, n_cls, (b,))


SGD_CONFIGS = [
    dict(momentum=0.0, weight_decay=0.0),
    dict(momentum=0.9, weight_decay=1e-2),
    dict(momentum=0.9, dampening=0.3, weight_decay=5e-3),
    dict(momentum=0.8, nesterov=True, weight_decay=1e-2),
    dict(momentum=0.9, weight_decay=1e-3, maximize=True),
]


def tol(dtype):
    return dict(rtol=1e-12, atol=1e-13) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)


def same_gradients_step(model, twin, ours, ref, dtype):
    """One step of both optimizers on the same gradient (ours, computed through the parameterization):
    the comparison then measures the optimizers only, not two forward paths' rounding."""
    x, y = batch(dtype)
    ours.zero_grad()
    ref.zero_grad()
    loss_fn(model, x, y).backward()
    for p, q in pairs(model, twin):
        q.grad = p.grad.detach().clone()
    ours.step()
    ref.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", SGD_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_sgd_matches_torch_every_step_and_buffer(cfg, dtype):
    model = make_model(dtype=dtype)
    twin = torch_twin(model)
    ours = SGD(model, lr=0.07, **cfg)
    ref = torch.optim.SGD(twin.parameters(), lr=0.07, foreach=False, **cfg)
    for step in range(20):
        same_gradients_step(model, twin, ours, ref, dtype)
        for p, q in pairs(model, twin):
            torch.testing.assert_close(p, q, **tol(dtype), msg=lambda s, step=step: f"param differs at step {step + 1}: {s}")
            if cfg["momentum"]:
                torch.testing.assert_close(ours.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"],
                                           **tol(dtype), msg=lambda s, step=step: f"momentum buffer differs at step {step + 1}: {s}")
            else:
                assert "momentum_buffer" not in ours.state[p] and "momentum_buffer" not in ref.state[q]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", [dict(weight_decay=1e-2), dict(weight_decay=0.0, betas=(0.8, 0.99), eps=1e-6),
                                 dict(weight_decay=0.1, maximize=True)], ids=["default", "betas", "maximize"])
def test_adamw_matches_torch_every_step_and_buffer(cfg, dtype):
    model = make_model(dtype=dtype)
    twin = torch_twin(model)
    ours = AdamW(model, lr=3e-3, **cfg)
    ref = torch.optim.AdamW(twin.parameters(), lr=3e-3, foreach=False, **cfg)
    for step in range(20):
        same_gradients_step(model, twin, ours, ref, dtype)
        for p, q in pairs(model, twin):
            torch.testing.assert_close(p, q, **tol(dtype), msg=lambda s, step=step: f"param differs at step {step + 1}: {s}")
            for name in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(ours.state[p][name], ref.state[q][name], **tol(dtype),
                                           msg=lambda s, step=step, name=name: f"{name} differs at step {step + 1}: {s}")
            assert float(ours.state[p]["step"]) == float(ref.state[q]["step"]) == step + 1


def test_roles_are_discovered():
    model = nn.Sequential(PLinear(4, 3, "signin"), PLinear(3, 2, "masked"), nn.LayerNorm(2))
    opt = SGD(model, lr=0.1)
    assert opt.role(model[0].param.m) == "m" and opt.role(model[0].param.w) == "w"
    assert opt.role(model[1].param.w) == "theta"
    assert opt.role(model[0].bias) == opt.role(model[2].weight) == "other"
    # param groups + bind give the same roles; modules inside a group are expanded and bound
    opt2 = SGD([{"params": [model[0]]}, {"params": list(model[1].parameters()) + list(model[2].parameters())}],
               lr=0.1).bind(model)
    assert opt2.role(model[0].param.w) == "w" and opt2.role(model[1].param.w) == "theta"


def test_factor_lr_group():
    model = nn.Sequential(PLinear(4, 3, "signin"), PLinear(3, 2, "masked"))
    opt = SGD(model, lr=0.1, factor_lr=0.2)
    names = {g["name"]: g for g in opt.param_groups}
    assert set(names) == {"factors", "other"}
    assert float(names["factors"]["lr"]) == pytest.approx(0.2)
    assert {id(p) for p in names["factors"]["params"]} == {id(model[0].param.m), id(model[0].param.w)}
    with pytest.raises(ValueError, match="factor_lr needs a model"):
        SGD(model.parameters(), lr=0.1, factor_lr=0.2)


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_state_dict_round_trip_gives_identical_continuation(opt_name):
    torch.manual_seed(torch.initial_seed() % 2**31)
    model = make_model("signin", density=0.6)
    make = (lambda m: SGD(m, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, alpha=1e-3)) \
        if opt_name == "sgd" else (lambda m: AdamW(m, lr=1e-3, alpha=1e-3))
    opt = make(model)
    data = [batch(torch.float32) for _ in range(20)]

    def run(m, o, items):
        for i, (x, y) in enumerate(items):
            o.zero_grad()
            loss_fn(m, x, y).backward()
            o.step()
            if i % 4 == 3:
                o.signin_reset(policy="transform")

    run(model, opt, data[:10])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    run(model, opt, data[10:])

    model2 = make_model("signin", density=0.6)  # fresh random weights, overwritten by the checkpoint
    model2.load_state_dict(saved_model)
    opt2 = make(model2)
    opt2.load_state_dict(saved_opt)
    lr_tensor = opt2.param_groups[0]["lr"]
    assert isinstance(lr_tensor, torch.Tensor) and lr_tensor.dtype == torch.float64
    assert opt2.num_steps == 10 and opt2.num_resets == 2
    run(model2, opt2, data[10:])
    assert_same_state(model, model2, "after resuming")
    sa, sb = opt.state_dict(), opt2.state_dict()
    for idx in sa["state"]:
        for name, v in sa["state"][idx].items():
            assert torch.equal(v, sb["state"][idx][name]), f"state {idx}.{name} differs after resuming"
    assert opt2.param_groups[0]["lr"] is lr_tensor  # resuming keeps the lr tensor a schedule captured


def test_lr_is_a_tensor_that_torch_schedulers_fill():
    model = make_model()
    opt = SGD(model, lr=0.1, momentum=0.9)
    lr = opt.param_groups[0]["lr"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 ** k)
    for _ in range(3):
        x, y = batch(torch.float32)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] is lr
    assert float(lr) == pytest.approx(0.1 * 0.5**3)


@pytest.mark.parametrize("layout", ["dense", "csr"])
@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_a_backward_after_a_step_on_its_saved_weights_raises_as_torch_does(layout, opt_name):
    """The fused step writes the weights through their data pointers; it tells autograd, so a backward
    whose forward saved them before the step raises (as after torch.optim's step on nn.Linear) instead of
    silently using the updated values."""
    from sparse_engine.nn import SparseLinear

    torch.manual_seed(0)
    layer = SparseLinear(8, 4, kind="signin", density=0.5, layout=layout)
    opt = (SGD(layer, lr=0.1, momentum=0.9) if opt_name == "sgd" else AdamW(layer, lr=0.1))
    x = torch.randn(3, 8, requires_grad=True)  # dX needs θ: the forward saves the weights
    layer(x).sum().backward()
    opt.step()
    versions = [p._version for p in layer.parameters()]
    y = layer(x).sum()
    opt.step()  # the gradients of the first backward are still there: the weights change under y
    assert all(p._version > v for p, v in zip(layer.parameters(), versions))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    lin = nn.Linear(8, 4)  # the behaviour this mirrors
    topt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    lin(x).sum().backward()
    topt.step()
    y = lin(x).sum()
    topt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_bad_arguments_name_the_argument():
    model = make_model()
    with pytest.raises(ValueError, match="lr"):
        SGD(model, lr=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        SGD(model, lr=0.1, momentum=float("nan"))
    with pytest.raises(ValueError, match="nesterov"):
        SGD(model, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        AdamW(model, lr=0.1, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="reset_policy"):
        SGD(model, lr=0.1, reset_policy="flip")
    with pytest.raises(ValueError, match="nonfinite"):
        SGD(model, lr=0.1, nonfinite="ignore")
    with pytest.raises(ValueError, match="policy"):
        SGD(model, lr=0.1).signin_reset(policy="nope")


# ------------------------------------------------------------ invariant 3: β shrinks by an exact factor


def test_beta_shrinks_by_exact_factor_fp64():
    torch.manual_seed(torch.initial_seed() % 2**31)
    theta = torch.randn(7, 11, dtype=torch.float64)
    pz = Parameterization(theta, "signin", beta=1.0)
    pz.m.data.mul_(1.0 + 0.3 * torch.rand_like(pz.m))  # a generic β ≠ const, still m > |w|
    lr, lam = 0.03, 0.2
    opt = SGD([pz.m, pz.w], lr=lr, weight_decay=lam).bind(pz)
    x = torch.randn(5, 11, dtype=torch.float64)
    target = torch.randn(5, 7, dtype=torch.float64)
    beta0 = (pz.m**2 - pz.w**2).detach().clone()
    th = pz.theta()
    th.retain_grad()
    ((x @ th.T - target) ** 2).sum().backward()
    g = th.grad.detach().clone()
    opt.step()
    beta1 = (pz.m**2 - pz.w**2).detach()
    expected = beta0 * ((1 - lr * lam) ** 2 - lr**2 * g**2)
    torch.testing.assert_close(beta1, expected, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(beta1, beta0)  # the check is not vacuous


# ------------------------------------------------ invariant 5: pruned coordinates stay exactly zero


def _assert_pruned_zero(model, opt):
    for mod in model:
        if not isinstance(mod, PLinear):
            continue
        pz = mod.param
        mask = pz.step_mask()
        off = ~mask
        assert torch.equal(pz.theta().detach()[off], torch.zeros(int(off.sum()))), "θ nonzero at a pruned coordinate"
        assert torch.equal(pz.w.detach()[off], torch.zeros(int(off.sum())))
        for _, p, _ in pz.step_targets():
            for name, buf in opt.state[p].items():
                if isinstance(buf, torch.Tensor) and buf.shape == p.shape:
                    assert torch.equal(buf[off], torch.zeros(int(off.sum()))), f"{name} nonzero at a pruned coordinate"


@pytest.mark.parametrize("kind", ["masked", "signin", "pilot"])
@pytest.mark.parametrize("opt_name", ["sgd", "sgd_nesterov", "adamw"])
@pytest.mark.parametrize("mode", ["step", "attached"])
def test_pruned_coordinates_stay_exactly_zero(kind, opt_name, mode):
    model = make_model(kind, density=0.4)
    kw = dict(weight_decay=0.05, alpha=0.01)
    opt = {"sgd": lambda: SGD(model, lr=0.2, momentum=0.9, dampening=0.1, **kw),
           "sgd_nesterov": lambda: SGD(model, lr=0.2, momentum=0.9, nesterov=True, **kw),
           "adamw": lambda: AdamW(model, lr=0.05, **kw)}[opt_name]()
    if mode == "attached":
        opt.attach()
    theta0 = [mod.param.theta().detach().clone() for mod in model if isinstance(mod, PLinear)]
    policies = ["transform", "zero", "keep"]
    for i in range(12):
        x, y = batch(torch.float32)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        for mod in model:  # grads of pruned coordinates are exactly zero (when they still exist)
            if isinstance(mod, PLinear) and mod.param.w.grad is not None:
                assert torch.equal(mod.param.w.grad[~mod.param.step_mask()], torch.zeros(int((~mod.param.step_mask()).sum())))
        opt.step()
        if kind != "masked" and i % 3 == 2:
            opt.signin_reset(policy=policies[(i // 3) % 3])
        _assert_pruned_zero(model, opt)
    assert opt.num_steps == 12
    for t0, mod in zip(theta0, [mod for mod in model if isinstance(mod, PLinear)]):  # the active ones moved
        active = mod.param.step_mask()
        assert (mod.param.theta().detach()[active] != t0[active]).float().mean() > 0.9


def test_nan_gradient_at_pruned_coordinate_is_ignored():
    model = make_model("signin", density=0.5)
    opt = SGD(model, lr=0.1, momentum=0.9)
    x, y = batch(torch.float32)
    loss_fn(model, x, y).backward()
    pz = model[0].param
    pz.w.grad[~pz.step_mask()] = float("nan")
    before = pz.w.detach().clone()
    opt.step()
    assert opt.skipped_steps == 0
    assert torch.isfinite(pz.w).all() and not torch.equal(before, pz.w.detach())
    _assert_pruned_zero(model, opt)


# ----------------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_step(bad):
    model = make_model("signin", density=0.5)
    opt = SGD(model, lr=0.1, momentum=0.9)
    before = copy.deepcopy(model.state_dict())
    x, y = batch(torch.float32)
    loss_fn(model, x, y).backward()
    model[0].bias.grad[0] = bad
    opt.step()
    assert opt.skipped_steps == 1 and opt.num_steps == 0
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), f"{k} changed in a skipped step"
    assert not opt.state or all(not s for s in opt.state.values())


def test_nonfinite_gradient_raises_when_configured():
    model = make_model()
    opt = AdamW(model, lr=0.1, nonfinite="raise")
    before = copy.deepcopy(model.state_dict())
    x, y = batch(torch.float32)
    loss_fn(model, x, y).backward()
    active = model[0].param.step_mask()
    model[0].param.w.grad[active.nonzero()[0].tolist()] = float("nan")
    with pytest.raises(NonFiniteGradError, match="non-finite"):
        opt.step()
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), f"{k} changed"


def test_nonfinite_gradient_in_attached_mode_skips_that_tensor():
    model = make_model()
    opt = SGD(model, lr=0.1).attach()
    before = model[0].bias.detach().clone()
    w_before = model[0].param.w.detach().clone()
    x, y = batch(torch.float32)
    model[0].bias.register_hook(lambda g: torch.full_like(g, float("nan")))
    loss_fn(model, x, y).backward()
    opt.step()
    assert torch.equal(model[0].bias.detach(), before)
    assert not torch.equal(model[0].param.w.detach(), w_before)  # the others were updated
    assert opt.skipped_updates == 1 and opt.skipped_steps == 1


# ----------------------------------------------------------------------------------------- resets


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("policy", ["keep", "zero", "transform"])
def test_reset_policies(opt_name, policy):
    model = make_model("signin", density=0.7)
    opt = SGD(model, lr=0.1, momentum=0.9, weight_decay=0.05) if opt_name == "sgd" else AdamW(model, lr=0.01)
    for _ in range(5):
        x, y = batch(torch.float32)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    pz = model[0].param
    theta = pz.theta().detach().clone()
    out = model(x).detach()
    m0, w0 = pz.m.detach().clone(), pz.w.detach().clone()
    state0 = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in (pz.m, pz.w)}
    opt.signin_reset(beta=1.0, policy=policy)
    torch.testing.assert_close(pz.theta().detach(), theta, rtol=1e-5, atol=1e-6)  # §4.2: θ unchanged
    torch.testing.assert_close(model(x).detach(), out, rtol=1e-4, atol=1e-5)      # and so the output
    mask = pz.step_mask()
    torch.testing.assert_close((pz.m**2 - pz.w**2).detach()[mask], torch.ones(int(mask.sum())), rtol=1e-5, atol=1e-5)
    names = opt.buffer_names
    for p in (pz.m, pz.w):
        st, st0 = opt.state[p], state0[id(p)]
        if policy == "keep":
            for n in names:
                assert torch.equal(st[n], st0[n])
        elif policy == "zero":
            for n in names:
                assert not st[n].any()
            assert float(st["step"]) == 0
        else:
            assert float(st["step"]) == float(st0["step"])
    if policy == "transform" and opt_name == "sgd":
        b_m, b_w = opt.state[pz.m]["momentum_buffer"], opt.state[pz.w]["momentum_buffer"]
        v_old = w0 * state0[id(pz.m)]["momentum_buffer"] + m0 * state0[id(pz.w)]["momentum_buffer"]
        v_new = pz.w.detach() * b_m + pz.m.detach() * b_w
        torch.testing.assert_close(v_new, v_old, rtol=1e-5, atol=1e-7)  # θ-velocity kept


def test_transform_momentum_math_fp64():
    m_old = torch.rand(50, dtype=torch.float64) + 0.01
    w_old = torch.randn(50, dtype=torch.float64)
    b_m, b_w = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    m_new = torch.rand(50, dtype=torch.float64) + 0.5
    w_new = torch.randn(50, dtype=torch.float64)
    mask = torch.rand(50) < 0.7
    nb_m, nb_w = transform_momentum(b_m, b_w, m_old, w_old, m_new, w_new, mask)
    g = (w_old * b_m + m_old * b_w) / (m_new**2 + w_new**2)
    torch.testing.assert_close(nb_m[mask], (g * w_new)[mask], rtol=1e-14, atol=0)
    torch.testing.assert_close(nb_w[mask], (g * m_new)[mask], rtol=1e-14, atol=0)
    assert not nb_m[~mask].any() and not nb_w[~mask].any()


def test_transform_adam_recovers_consistent_moments_fp64():
    """When the moments have the factored form (a_m = Ĝw, a_w = Ĝm, s_m = Ŝw², s_w = Ŝm²), the
    transform gives exactly the same form in the new coordinates."""
    n = 40
    m_old, w_old = torch.rand(n, dtype=torch.float64) + 0.1, torch.randn(n, dtype=torch.float64)
    m_new, w_new = torch.rand(n, dtype=torch.float64) + 0.5, torch.randn(n, dtype=torch.float64)
    G, S = torch.randn(n, dtype=torch.float64), torch.rand(n, dtype=torch.float64)
    a_m, a_w, s_m, s_w = G * w_old, G * m_old, S * w_old**2, S * m_old**2
    na_m, na_w, ns_m, ns_w = transform_adam(a_m, a_w, s_m, s_w, m_old, w_old, m_new, w_new)
    for got, want in ((na_m, G * w_new), (na_w, G * m_new), (ns_m, S * w_new**2), (ns_w, S * m_new**2)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    # degenerate old coordinates (m = w = 0): nothing accumulated, state 0, no NaN
    z = torch.zeros(3, dtype=torch.float64)
    out = transform_adam(z, z, z, z, z, z, torch.ones(3, dtype=torch.float64), z)
    assert all(torch.equal(t, z) for t in out)


# ------------------------------------------------------------------------------- step-in-backward


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_attached_gives_same_parameters_after_10_steps(opt_name):
    torch.manual_seed(torch.initial_seed() % 2**31)
    model_a = make_model("signin", density=0.5)
    model_b = copy.deepcopy(model_a)
    make = (lambda m: SGD(m, lr=0.05, momentum=0.9, weight_decay=1e-3, alpha=1e-3)) if opt_name == "sgd" \
        else (lambda m: AdamW(m, lr=1e-2, alpha=1e-3))
    opt_a, opt_b = make(model_a), make(model_b).attach()
    for i in range(10):
        x, y = batch(torch.float32)
        for m, o in ((model_a, opt_a), (model_b, opt_b)):
            o.zero_grad()
            loss_fn(m, x, y).backward()
            o.step()
            if i == 4:
                o.signin_reset()
    assert_same_state(model_a, model_b, "between ordinary and step-in-backward")
    assert all(p.grad is None for p in model_b.parameters())
    assert opt_a.num_steps == opt_b.num_steps == 10
    opt_b.detach()
    assert not opt_b.attached


def test_attached_peak_holds_no_full_set_of_gradients():
    """Observe, at every gradient accumulation, the bytes of gradients alive: attached, never more than
    one tensor's; ordinary, the whole set at the end of backward."""
    torch.manual_seed(torch.initial_seed() % 2**31)

    def build():
        return nn.Sequential(*[PLinear(64, 64, "signin") for _ in range(6)])

    def peak_grad_bytes(model, attach):
        params = list(model.parameters())
        peak = [0]

        def observe(_):
            alive = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
            peak[0] = max(peak[0], alive)

        opt = SGD(model, lr=0.01, momentum=0.9)
        # observers first: they run before the optimizer's hook frees the gradient
        handles = [p.register_post_accumulate_grad_hook(observe) for p in params]
        if attach:
            opt.attach()
        model(torch.randn(8, 64)).square().mean().backward()
        opt.step()
        for h in handles:
            h.remove()
        return peak[0], sum(p.numel() * p.element_size() for p in params)

    peak_plain, total = peak_grad_bytes(build(), attach=False)
    peak_attached, _ = peak_grad_bytes(build(), attach=True)
    largest = 64 * 64 * 4
    assert peak_plain == total
    assert peak_attached <= largest < total / 4


@pytest.mark.gpu
def test_attached_cuda_peak_memory_is_lower():
    torch.manual_seed(0)
    dev = torch.device("cuda")

    def run(attach):
        model = nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(8)]).to(dev)
        opt = SGD(model, lr=0.01)
        if attach:
            opt.attach()
        x = torch.randn(16, 2048, device=dev)
        model(x).sum().backward()  # warm-up allocations
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(x).sum().backward()
        opt.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    grads = 8 * 2048 * 2048 * 4
    plain, attached = run(False), run(True)
    assert plain >= grads
    assert attached < plain - grads / 2


def test_attached_hooks_follow_groups_replaced_by_load_state_dict():
    model_a = make_model("signin", density=0.5)
    model_b = copy.deepcopy(model_a)
    opt_a = SGD(model_a, lr=0.05, momentum=0.9, weight_decay=0.0)
    opt_b = SGD(model_b, lr=0.05, momentum=0.9, weight_decay=0.0).attach()
    opt_a.param_groups[0]["weight_decay"] = 0.3  # what a schedule does
    opt_b.load_state_dict(opt_a.state_dict())    # replaces opt_b's group dicts
    for _ in range(3):
        x, y = batch(torch.float32)
        for m, o in ((model_a, opt_a), (model_b, opt_b)):
            o.zero_grad()
            loss_fn(m, x, y).backward()
            o.step()
    assert_same_state(model_a, model_b, "after load_state_dict in attached mode")


@pytest.mark.parametrize("attached", [False, True], ids=["step", "attached"])
@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_channels_last_model_trains_as_the_contiguous_one(opt_name, attached):
    # model.to(memory_format=torch.channels_last) is how conv nets train fastest on CPU (torch's batch norm
    # and oneDNN convs); its conv weights, grads and buffers are dense in another dim order, and the steps
    # must match the contiguous model's (they once raised "param must be contiguous").
    torch.manual_seed(0)
    # (no batch norm: it makes the conv bias's gradient rounding noise, which AdamW scales up to full steps)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5))
    twin = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert not twin[0].weight.is_contiguous()
    make = (lambda m: SGD(m, lr=0.05, momentum=0.9, weight_decay=1e-3)) if opt_name == "sgd" \
        else (lambda m: AdamW(m, lr=1e-2))
    opt, opt_cl = make(model), make(twin)
    if attached:
        opt.attach(), opt_cl.attach()
    for _ in range(4):
        x, y = torch.randn(6, 3, 6, 6), torch.randint(0, 5, (6,))
        for m, o, xb in ((model, opt, x), (twin, opt_cl, x.contiguous(memory_format=torch.channels_last))):
            o.zero_grad()
            F.cross_entropy(m(xb), y).backward()
            o.step()
    assert twin[0].weight.is_contiguous(memory_format=torch.channels_last)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=lambda s, name=name: f"{name}: {s}")


def test_state_of_a_contiguous_model_loads_into_a_channels_last_one():
    # the buffers are updated in place through param's memory order, so loaded ones take param's strides
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    opt = SGD(model, lr=0.05, momentum=0.9)
    x, y = torch.randn(5, 3, 6, 6), torch.randint(0, 3, (5,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    twin = copy.deepcopy(model).to(memory_format=torch.channels_last)
    opt_cl = SGD(twin, lr=0.05, momentum=0.9)
    opt_cl.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a checkpoint: no shared tensors
    for m, o, xb in ((model, opt, x), (twin, opt_cl, x.contiguous(memory_format=torch.channels_last))):
        o.zero_grad()
        F.cross_entropy(m(xb), y).backward()
        o.step()
    buf = opt_cl.state[twin[0].weight]["momentum_buffer"]
    assert buf.stride() == twin[0].weight.stride()
    torch.testing.assert_close(buf, opt.state[model[0].weight]["momentum_buffer"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(twin[0].weight, model[0].weight, rtol=1e-5, atol=1e-6)
