"""layout="auto": the decision rule, the memory/disk cache, storage switches, tune()."""

from __future__ import annotations

import copy
import json
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_engine.ops import backends
from sparse_engine.nn import SparseConv2d, SparseLinear, autolayout, sparsify
from sparse_engine.nn.linear import SparseModule


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test gets its own empty cache (memory and disk)."""
    monkeypatch.setenv("SPARSE_ENGINE_CACHE", str(tmp_path / "cache"))
    autolayout.clear_memory()
    yield tmp_path / "cache"
    autolayout.clear_memory()


def fake_timer(monkeypatch, times: dict[str, float], calls: list | None = None):
    """Replace the stopwatch: each runner still runs once (so it must work), its time comes from ``times``."""

    def measure(runners, device=None, **kw):
        for layout, fn in runners.items():
            assert fn.layout == layout
            fn()
            if calls is not None:
                calls.append(layout)
        return {layout: times[layout] for layout in runners}

    monkeypatch.setattr(autolayout, "measure", measure)


# ------------------------------------------------------------------------------------------- rule


def test_measure_times_every_runner_round_robin():
    order = []
    runners = {"dense": lambda: order.append("dense"), "csr": lambda: order.append("csr")}
    times = autolayout.measure(runners, warmup=1, rounds=4, budget_s=10.0)
    assert set(times) == {"dense", "csr"} and all(t >= 0 for t in times.values())
    assert order == ["dense", "csr"] * 5  # 1 warm-up + 4 rounds, interleaved


def test_decide_dense_wins_ties_within_five_percent():
    assert autolayout.decide({"dense": 1.0, "csr": 0.97}) == "dense"
    assert autolayout.decide({"dense": 1.0, "csr": 1.0 / 1.05 + 1e-9}) == "dense"
    assert autolayout.decide({"dense": 1.0, "csr": 0.90}) == "csr"
    assert autolayout.decide({"dense": 1.0, "csr": 0.5, "bsr": 0.4, "block": 0.45}) == "bsr"
    assert autolayout.decide({"dense": 1.0, "csr": 2.0}) == "dense"
    assert autolayout.decide({"dense": 1.0, "csr": float("nan")}) == "dense"
    assert autolayout.decide({"dense": 1.0}) == "dense"
    with pytest.raises(ValueError, match="must include the 'dense' baseline"):
        autolayout.decide({"csr": 1.0})


# ------------------------------------------------------------------------------------------ cache


def test_choose_caches_in_memory_and_on_disk(cache_dir):
    built = []

    def make_runners():
        built.append(1)
        return {"dense": lambda: None, "csr": lambda: None}

    key = autolayout.make_key(
        "linear", (8, 8), torch.rand(8, 8) < 0.5, torch.float32, "cpu", rows=10, kind="signin"
    )
    first = autolayout.choose(key, make_runners)
    assert first.source == "measured" and set(first.times) == {"dense", "csr"}
    assert first.layout == autolayout.decide(first.times)
    again = autolayout.choose(key, make_runners)
    assert again.source == "memory" and again.layout == first.layout and len(built) == 1
    data = json.loads((cache_dir / "autolayout.json").read_text())
    assert data["entries"][first.key]["layout"] == first.layout
    autolayout.clear_memory()  # a new process
    from_disk = autolayout.choose(key, make_runners)
    assert from_disk.source == "disk" and from_disk.times == first.times and len(built) == 1
    autolayout.choose(key, make_runners, retune=True)
    assert len(built) == 2


def test_key_tracks_what_changes_the_answer(monkeypatch):
    mask = torch.rand(16, 16) < 0.2
    base = dict(rows=100, kind="signin")
    k = autolayout.make_key("linear", (16, 16), mask, torch.float32, "cpu", **base)
    assert k == autolayout.make_key("linear", (16, 16), mask, torch.float32, "cpu", rows=128, kind="pilot")
    assert k["rows"] == 128 and k["kind"] == "factored"
    assert k != autolayout.make_key("linear", (16, 16), mask, torch.float32, "cpu", rows=129, kind="signin")
    assert k != autolayout.make_key("linear", (16, 16), mask, torch.float64, "cpu", **base)
    assert k != autolayout.make_key("linear", (16, 16), None, torch.float32, "cpu", **base)
    assert k != autolayout.make_key("linear", (16, 16), mask, torch.float32, "cpu", rows=100, kind="masked")
    real = backends.select

    def new_kernel(impl, device, *args, **kw):  # a new kernel lands: cached decisions must not apply
        return ("new-kernel", None) if impl.startswith("compact_linear") else real(impl, device, *args, **kw)

    monkeypatch.setattr(backends, "select", new_kernel)
    assert k != autolayout.make_key("linear", (16, 16), mask, torch.float32, "cpu", **base)


def test_key_tracks_the_build_of_the_kernels(monkeypatch):
    """The same backend rebuilt (new kernels, the same names): cached measurements must not apply."""
    from sparse_engine.ops import _cpp

    if backends.which("compact_linear_fwd", "cpu", torch.float32) != "cpp":
        pytest.skip("the C++ backend does not run compact_linear here (no build): no build id in the key")
    make = lambda: autolayout.make_key("linear", (16, 16), None, torch.float32, "cpu", rows=8, kind="signin")
    k = make()
    assert k["builds"] == [_cpp.build_id()] and k["builds"][0]
    monkeypatch.setattr(_cpp, "build_id", lambda: "rebuilt")
    backends.forget()  # the entry points are cached with the backend choice
    try:
        assert make()["builds"] == ["rebuilt"] and make() != k
    finally:
        monkeypatch.undo()
        backends.forget()


def test_bad_cache_files_are_ignored(cache_dir, caplog, tmp_path, monkeypatch):
    cache_dir.mkdir(parents=True)
    (cache_dir / "autolayout.json").write_text("{not json")
    runners = lambda: {"dense": lambda: None}  # noqa: E731
    key = {"op": "test"}
    with caplog.at_level(logging.WARNING, logger="sparse_engine"):
        assert autolayout.choose(key, runners).layout == "dense"
    assert "ignoring unreadable layout cache" in caplog.text
    assert json.loads((cache_dir / "autolayout.json").read_text())["format"] == 1  # rewritten
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("SPARSE_ENGINE_CACHE", str(blocker / "sub"))  # cannot be a directory
    autolayout.clear_memory()
    with caplog.at_level(logging.WARNING, logger="sparse_engine"):
        assert autolayout.choose(key, runners).layout == "dense"
    assert "could not write the layout cache" in caplog.text
    with pytest.raises(ValueError, match="'dense' runner"):
        autolayout.choose({"op": "other"}, lambda: {"csr": lambda: None})


# ------------------------------------------------------------------------------------------ modules


def test_auto_switches_storage_when_compact_is_faster(monkeypatch):
    calls = []
    fake_timer(monkeypatch, {"dense": 1.0, "csr": 0.5}, calls)
    mod = SparseLinear(24, 16, kind="signin", density=0.2, layout="auto", dtype=torch.float64)
    assert mod.resolved_layout is None and mod.storage == "dense"
    w_obj, m_obj = mod.param.w, mod.param.m
    opt = torch.optim.SGD(mod.parameters(), lr=0.1)  # created before the switch: must keep working
    theta = mod.weight.detach().clone()
    x = torch.randn(7, 24, dtype=torch.float64)
    y = mod(x)
    assert sorted(calls) == ["csr", "dense"]
    assert mod.resolved_layout == "csr" and mod.storage == "csr"
    assert mod.autolayout_decision.layout == "csr"
    assert mod.param.w is w_obj and mod.param.m is m_obj and w_obj.shape == (mod.nnz(),)
    torch.testing.assert_close(mod.weight.detach(), theta, rtol=0, atol=0)
    torch.testing.assert_close(y, F.linear(x, theta, mod.bias.detach()), rtol=1e-12, atol=1e-12)
    y.sum().backward()
    opt.step()
    assert w_obj.grad.shape == w_obj.shape
    # the same shape again: decided from the cache, nothing measured
    calls.clear()
    other = SparseLinear(24, 16, kind="signin", density=0.2, layout="auto", seed=4, dtype=torch.float64)
    other(x)
    assert calls == [] and other.resolved_layout == "csr" and other.autolayout_decision.source == "memory"


def test_auto_stays_dense_within_margin(monkeypatch):
    fake_timer(monkeypatch, {"dense": 1.0, "csr": 0.97})
    mod = SparseLinear(24, 16, density=0.2, layout="auto")
    mod(torch.randn(3, 24))
    assert mod.resolved_layout == "dense" and mod.storage == "dense"
    assert "auto(dense)" in repr(mod)


def test_auto_block_candidates_only_for_block_aligned_masks(monkeypatch):
    calls = []
    fake_timer(monkeypatch, {"dense": 1.0, "csr": 0.9, "block": 0.5, "bsr": 0.6}, calls)
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[:16, 16:] = True
    mod = SparseLinear(32, 32, mask=mask, layout="auto", block_shape=(16, 16), dtype=torch.float64)
    x = torch.randn(5, 32, dtype=torch.float64)
    theta = mod.weight.detach().clone()
    y = mod(x)
    assert sorted(calls) == ["block", "bsr", "csr", "dense"]
    assert mod.resolved_layout == "block" and mod.storage == "dense"
    torch.testing.assert_close(y, F.linear(x, theta, mod.bias.detach()), rtol=1e-12, atol=1e-12)
    calls.clear()
    autolayout.clear_memory()
    SparseLinear(32, 32, density=0.3, layout="auto", block_shape=(16, 16))(torch.randn(5, 32))
    assert sorted(calls) == ["csr", "dense"]  # random element mask: no whole-block layouts


def test_auto_without_mask_is_dense_without_measuring(monkeypatch):
    calls = []
    fake_timer(monkeypatch, {}, calls)
    for mod in (
        SparseLinear(8, 8, layout="auto"),
        SparseLinear(8, 8, kind="pilot", density=0.1, layout="auto"),
    ):
        mod(torch.randn(2, 8))
        assert mod.resolved_layout == "dense" and calls == []


def test_auto_measures_for_real_and_never_worse_than_rule():
    mod = SparseLinear(128, 96, kind="signin", density=0.05, layout="auto")
    x = torch.randn(64, 128)
    theta = mod.weight.detach().clone()
    y = mod(x)
    d = mod.autolayout_decision
    assert d.source == "measured" and set(d.times) == {"dense", "csr"}
    assert all(t > 0 for t in d.times.values())
    assert d.layout == autolayout.decide(d.times) == mod.resolved_layout
    torch.testing.assert_close(y, F.linear(x, theta, mod.bias.detach()), rtol=1e-5, atol=1e-5)
    entries = json.loads(open(autolayout.cache_path()).read())["entries"]
    assert entries[d.key]["layout"] == d.layout
    conv = SparseConv2d(4, 8, 3, padding=1, kind="masked", density=0.2, layout="auto")
    xc = torch.randn(2, 4, 8, 8)
    theta = conv.weight.detach().clone()
    yc = conv(xc)
    dc = conv.autolayout_decision
    assert set(dc.times) == {"dense", "csr"} and dc.layout == autolayout.decide(dc.times)
    torch.testing.assert_close(yc, F.conv2d(xc, theta, conv.bias.detach(), padding=1), rtol=1e-5, atol=1e-5)
    grouped = SparseConv2d(4, 8, 3, groups=2, density=0.2, layout="auto")
    grouped(xc)
    assert grouped.resolved_layout == "dense" and grouped.autolayout_decision.source == "only candidate"


def test_conv_auto_compact_path(monkeypatch):
    fake_timer(monkeypatch, {"dense": 1.0, "csr": 0.1})
    conv = SparseConv2d(4, 6, 3, stride=2, padding=1, padding_mode="circular", kind="signin", density=0.3,
                        layout="auto", dtype=torch.float64)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    theta = conv.weight.detach().clone()
    y = conv(x)
    assert conv.resolved_layout == "csr" and conv.storage == "csr"
    ref = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), theta, conv.bias.detach(), stride=2)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


def test_tune_whole_model(monkeypatch):
    fake_timer(monkeypatch, {"dense": 1.0, "csr": 0.5})
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 8))
    sparsify(model, method="signin", density=0.3, layout="auto")
    model.train()
    bn = model[1]
    stats = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    x = torch.randn(10, 16)
    y0 = copy.deepcopy(model).eval()(x)  # a copy: the first forward would make the choice
    assert set(autolayout.layouts(model).values()) == {None}
    decisions = autolayout.tune(model, x)
    assert set(decisions) == {"0", "3"} and all(d.layout == "csr" for d in decisions.values())
    assert model.training and bn.training  # modes restored
    assert torch.equal(bn.running_mean, stats[0]) and int(bn.num_batches_tracked) == stats[2]
    assert autolayout.layouts(model) == {"0": "csr", "3": "csr"}
    model.eval()
    torch.testing.assert_close(model(x), y0, rtol=1e-6, atol=1e-6)
    # retune measures again
    fake_timer(monkeypatch, {"dense": 1.0, "csr": 2.0})
    decisions = autolayout.tune(model, (x,), retune=True)
    assert all(d.layout == "dense" for d in decisions.values())
    assert all(m.storage == "dense" for m in model.modules() if isinstance(m, SparseModule))
    torch.testing.assert_close(model(x), y0, rtol=1e-6, atol=1e-6)


def test_auto_checkpoint_restores_the_storage(monkeypatch):
    fake_timer(monkeypatch, {"dense": 1.0, "csr": 0.5})
    src = SparseLinear(20, 12, kind="signin", density=0.25, layout="auto", seed=1)
    x = torch.randn(3, 20)
    y = src(x)
    assert src.storage == "csr"
    fresh = SparseLinear(20, 12, kind="signin", density=0.25, layout="auto", seed=2)
    fresh.load_state_dict(src.state_dict())
    assert fresh.storage == "csr" and fresh.resolved_layout == "csr"
    assert torch.equal(fresh(x), y)
    # and back: a dense checkpoint into a module that already switched to csr
    dense = SparseLinear(20, 12, kind="signin", density=0.25, layout="dense", seed=3)
    fresh.load_state_dict(dense.state_dict())
    assert fresh.storage == "dense" and torch.equal(fresh.dense_mask(), dense.dense_mask())
    assert fresh.resolved_layout is None  # a dense checkpoint says nothing about speed: decided on first use
    torch.testing.assert_close(fresh(x), dense(x))
    assert os.path.exists(autolayout.cache_path())


def test_first_auto_forward_under_inference_mode(monkeypatch):
    fake_timer(monkeypatch, {"dense": 1.0, "csr": 0.5})
    mod = SparseLinear(12, 10, kind="signin", density=0.3, layout="auto")
    x = torch.randn(3, 12)
    theta = mod.weight.detach().clone()
    with torch.inference_mode():
        y = mod(x)
    assert mod.resolved_layout == "csr"
    torch.testing.assert_close(y, F.linear(x, theta, mod.bias.detach()))
    mod(x).sum().backward()  # the parameters are ordinary tensors, training works afterwards
    assert mod.param.w.grad is not None


def test_auto_under_autocast_measures_the_compute_dtype(monkeypatch):
    calls = []
    fake_timer(monkeypatch, {"dense": 1.0, "csr": 0.5}, calls)
    mod = SparseLinear(12, 10, density=0.3, layout="auto")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mod(torch.randn(3, 12))
    assert y.dtype == torch.bfloat16 and sorted(calls) == ["csr", "dense"]
    assert mod.autolayout_decision.key and '"dtype":"bfloat16"' in mod.autolayout_decision.key
    assert mod.param.w.dtype == torch.float32
