"""Schedules: Sign-In reset timing, weight-decay switch-off (and its dose), PILoT's α controller and fixed α."""
from __future__ import annotations

import math

import pytest
import torch

from sparse_engine.optim import SGD, AlphaController, AlphaSchedule, ResetSchedule, WeightDecaySwitchOff


def fire_all(s: ResetSchedule, n: int) -> list[int]:
    out = []
    for k in range(1, n + 1):
        if s.due(k):
            s.fired(k)
            out.append(k)
    return out


def test_reset_schedule_period_and_until():
    assert fire_all(ResetSchedule(3, "epoch"), 10) == [3, 6, 9]
    assert fire_all(ResetSchedule(3, "epoch", until=0.5, total=10), 10) == [3]
    assert fire_all(ResetSchedule(1, "step", until=0.3, total=10), 10) == [1, 2, 3]
    s = ResetSchedule(2, "step")
    assert s.due(2)
    s.fired(2)
    assert not s.due(2) and s.count == 1  # a step fires once even if asked again (skipped steps)


def test_reset_schedule_state_dict_round_trip():
    s = ResetSchedule(4, "step", until=0.75, total=40)
    fire_all(s, 13)
    s2 = ResetSchedule(1)
    s2.load_state_dict(s.state_dict())
    assert s2.state_dict() == s.state_dict()
    assert [k for k in range(14, 41) if s2.due(k)] == [16, 20, 24, 28]


@pytest.mark.parametrize("kwargs, match", [
    (dict(every=0), "every"), (dict(every=2, unit="day"), "unit"),
    (dict(every=2, until=1.5), "until"), (dict(every=2, until=0.5), "total"),
])
def test_reset_schedule_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResetSchedule(**kwargs)


def _opt(wd=0.1):
    p = torch.nn.Parameter(torch.randn(5))
    q = torch.nn.Parameter(torch.randn(3))
    return SGD([{"params": [p]}, {"params": [q], "weight_decay": 0.0}], lr=0.1, weight_decay=wd), p


def test_wd_switchoff_dose_and_switch():
    opt, p = _opt()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (k + 1))
    wd = WeightDecaySwitchOff(at=0.4, total_steps=10)
    lrs = []
    for step in range(1, 11):
        p.grad = torch.randn_like(p)
        lrs.append(float(opt.param_groups[0]["lr"]))
        opt.step()
        wd.after_step(opt, step)
        sched.step()
        assert opt.param_groups[0]["weight_decay"] == (0.1 if step < 4 else 0.0)
    assert wd.switched and wd.switch_step == 4 and wd.saved == [0.1, 0.0]
    expected = sum(lr * 0.1 for lr in lrs[:4])  # Σ η_k λ_k over the steps that had decay
    assert wd.dose()[0] == pytest.approx(expected, rel=1e-12)
    assert wd.dose()[1] == 0.0
    wd2 = WeightDecaySwitchOff()
    wd2.load_state_dict(wd.state_dict())
    assert wd2.state_dict() == wd.state_dict()


def test_wd_switchoff_at_one_never_switches():
    opt, p = _opt()
    wd = WeightDecaySwitchOff(at=1.0, total_steps=5)
    for step in range(1, 6):
        p.grad = torch.randn_like(p)
        opt.step()
        wd.after_step(opt, step)
    assert not wd.switched and opt.param_groups[0]["weight_decay"] == 0.1
    assert wd.dose()[0] == pytest.approx(5 * 0.1 * 0.1)
    with pytest.raises(ValueError, match="at"):
        WeightDecaySwitchOff(at=-0.1, total_steps=5)


def test_alpha_controller_directions():
    c = AlphaController(alpha=1e-3, delta=2.0, target_l1=10.0, epochs=8)
    # epoch 1: first epoch, l1 above target, early: grow
    assert c.update(1, 0.50, 20.0) == pytest.approx(2e-3)
    # epoch 2: accuracy did not drop, still not sparse: grow
    assert c.update(2, 0.55, 15.0) == pytest.approx(4e-3)
    # epoch 3: accuracy dropped: decay
    assert c.update(3, 0.54, 15.0) == pytest.approx(2e-3)
    # epoch 4: sparse enough (l1 < K): decay
    assert c.update(4, 0.60, 9.0) == pytest.approx(1e-3)
    # epoch 5 > T/2: always decay, whatever the inputs, so ∫α stays finite
    for e in range(5, 9):
        before = c.alpha
        assert c.update(e, 0.99, 100.0) == pytest.approx(before / 2)
    assert c.history[0] == 1e-3 and len(c.history) == 9
    c2 = AlphaController(1.0)
    c2.load_state_dict(c.state_dict())
    assert c2.update(9, 0.5, 1.0) == c.update(9, 0.5, 1.0)
    with pytest.raises(ValueError, match="delta"):
        AlphaController(1e-3, delta=1.0)
    with pytest.raises(ValueError, match="finite"):
        c.update(10, float("nan"), 1.0)


@pytest.mark.parametrize("kind, f", [
    ("constant", lambda k: 1.0), ("harmonic", lambda k: 1.0 / (k + 1)),
    ("quadratic", lambda k: 1.0 / (k + 1) ** 2), ("geometric", lambda k: 0.95**k),
])
def test_fixed_alpha_schedules(kind, f):
    alpha0 = 3e-4
    s = AlphaSchedule(kind, alpha0)
    assert s.alpha == alpha0
    for k in range(1, 12):
        assert s.update(k, 0.5, 1.0) == pytest.approx(alpha0 * f(k), rel=1e-12)
    s2 = AlphaSchedule()
    s2.load_state_dict(s.state_dict())
    assert s2.state_dict() == s.state_dict()
    if kind != "constant":  # decaying schedules: finite ∫α for geometric / quadratic, slow for harmonic
        assert s.alpha < alpha0


def test_alpha_schedule_bad_kind():
    with pytest.raises(ValueError, match="kind"):
        AlphaSchedule("cosine", 1e-3)
    with pytest.raises(ValueError, match="rate"):
        AlphaSchedule("geometric", 1e-3, rate=1.5)
    assert math.isclose(AlphaSchedule("geometric", 1.0, rate=0.5).value(3), 0.125)


def test_wd_switchoff_at_zero_is_off_before_the_first_step():
    opt, p = _opt()
    wd = WeightDecaySwitchOff(at=0.0, total_steps=10)
    wd.begin(opt)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0] and wd.switch_step == 0
    p0 = p.detach().clone()
    p.grad = torch.randn_like(p)
    opt.step()
    wd.after_step(opt, 1)
    torch.testing.assert_close(p.detach(), p0 - 0.1 * p.grad, rtol=0, atol=0)  # plain SGD, no decay
    assert wd.dose() == [0.0, 0.0] and wd.saved == [0.1, 0.0]
    # begin() later in a run: off only once T_off steps are done
    opt2, _ = _opt()
    wd2 = WeightDecaySwitchOff(at=0.5, total_steps=10)
    wd2.begin(opt2, steps_done=4)
    assert not wd2.switched and opt2.param_groups[0]["weight_decay"] == 0.1
    wd2.begin(opt2, steps_done=5)
    assert wd2.switched and opt2.param_groups[0]["weight_decay"] == 0.0
