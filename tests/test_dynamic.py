"""Dynamic masks (RigL / SET on static and signin): exact density, θ = 0 and zero state at pruned
coordinates after every update, RigL's choice of grown weights, csr == dense, resume, DDP."""

import math

import pytest
import torch
from torch import nn

from sparse_engine.methods import make_method
from sparse_engine.optim import parameterizations
from sparse_engine.param import sparse_layers


def _model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)


def _data(steps, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 12, generator=g, dtype=dtype), torch.randint(0, 4, (8,), generator=g))
            for _ in range(steps)]


def _setup(name="signin", layout="dense", dynamic="rigl", steps=50, update_every=15, optimizer="sgd", **kw):
    model = _model()
    if layout in ("block", "bsr"):  # small blocks (4 x 4), which make_method has no option for
        from sparse_engine.nn import sparsify

        sparsify(model, "signin" if name == "signin" else "static", density=0.3, distribution="uniform",
                 layout=layout, block_shape=(4, 4))
    method = make_method(name, density=0.3, distribution="uniform", layout=layout, dynamic=dynamic,
                         update_every=update_every, stop_at=1.0, drop_fraction=0.5, **kw)
    if layout not in ("block", "bsr"):
        method.prepare(model)
    extra = dict(momentum=0.9) if optimizer == "sgd" else {}
    opt = method.make_optimizer(model, optimizer, lr=0.05, weight_decay=1e-3, **extra)
    method.apply(model, opt, epochs=1, steps_per_epoch=steps)
    return model, method, opt


def _step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _masks(model):
    return {n: m.dense_mask().clone() for n, m in sparse_layers(model)}


def _check_pruned(model, opt):
    """θ = 0 (m = √β, w = 0 for m ⊙ w) and zero optimizer state at every inactive coordinate."""
    for _, pz in parameterizations(model):
        if pz.layout != "dense":
            continue  # compact storage holds no inactive coordinate
        off = ~pz.mask
        assert bool((pz.w[off] == 0).all())
        if pz.m is not None:
            assert torch.allclose(pz.m[off], torch.full_like(pz.m[off], math.sqrt(float(pz.beta))))
        for _, p, _ in pz.step_targets():
            for name in opt.buffer_names:
                buf = opt.state.get(p, {}).get(name)
                if buf is not None:
                    assert bool((buf[off] == 0).all()), name


@pytest.mark.parametrize("layout", ["dense", "csr", "block", "bsr"])
@pytest.mark.parametrize("dynamic", ["rigl", "set"])
@pytest.mark.parametrize("name,optimizer", [("signin", "sgd"), ("static", "adamw")])
def test_updates_keep_density_exactly_and_clear_pruned_coordinates(layout, dynamic, name, optimizer):
    model, method, opt = _setup(name, layout, dynamic, optimizer=optimizer)
    nnz0 = {n: m.nnz() for n, m in sparse_layers(model)}
    masks0 = _masks(model)
    for i, (x, y) in enumerate(_data(50), start=1):
        _step(model, opt, x, y)
        assert {n: m.nnz() for n, m in sparse_layers(model)} == nnz0
        if i % 15 == 0:
            _check_pruned(model, opt)
    assert method.updater.updates == 3
    assert method.updater.regrown > 0
    assert any(not torch.equal(masks0[n], m) for n, m in _masks(model).items())


def test_grown_weights_start_at_zero_with_zero_state():
    model, method, opt = _setup("signin", "dense", "rigl", update_every=5)
    data = _data(5)
    for x, y in data[:4]:
        _step(model, opt, x, y)
    before = _masks(model)
    _step(model, opt, *data[4])
    for (n, layer), (_, pz) in zip(sparse_layers(model), parameterizations(model)):
        grown = (layer.dense_mask() & ~before[n]).reshape(pz.shape2d)
        assert int(grown.sum()) > 0
        assert bool((pz.w[grown] == 0).all())
        assert torch.allclose(pz.m[grown], torch.full_like(pz.m[grown], math.sqrt(float(pz.beta))))
        assert bool((opt.state[pz.m]["momentum_buffer"][grown] == 0).all())


def test_rigl_grows_the_inactive_weights_of_largest_gradient():
    """One layer, hand check: the grown coordinates are the top-n |∂L/∂θ| of the update step's batch among
    the coordinates inactive before it; the dropped ones the n smallest |θ| after the step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 6)).double()
    method = make_method("static", density=0.4, distribution="uniform", dynamic="rigl", update_every=1,
                         stop_at=1.0, drop_fraction=0.25, drop_schedule="constant")
    method.prepare(model)
    opt = method.make_optimizer(model, "sgd", lr=0.1)
    method.apply(model, opt, epochs=1, steps_per_epoch=2)
    layer = model[0]
    x, y = torch.randn(5, 10, dtype=torch.float64), torch.randint(0, 6, (5,))
    mask0 = layer.dense_mask().clone()
    theta = layer.theta().detach().clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(nn.functional.linear(x, theta, layer.bias.detach()), y)
    (grad,) = torch.autograd.grad(loss, theta)
    _step(model, opt, x, y)
    n = round(0.25 * 24)
    after_step = (theta.detach() - 0.1 * grad * mask0)  # the SGD step on active weights
    keep = mask0.clone()
    act = torch.where(mask0, after_step.abs(), torch.full_like(after_step, float("inf")))
    keep.view(-1)[act.view(-1).argsort()[:n]] = False
    inactive_grad = torch.where(mask0, torch.full_like(grad, -1.0), grad.abs())
    grow = torch.zeros_like(mask0)
    grow.view(-1)[inactive_grad.view(-1).argsort(descending=True)[:n]] = True
    assert torch.equal(layer.dense_mask(), keep | grow)


@pytest.mark.parametrize("name", ["signin", "static"])
@pytest.mark.parametrize("pair", [("dense", "csr"), ("block", "bsr")])
def test_compact_run_equals_dense_storage_run(name, pair):
    runs = {}
    for layout in pair:
        model, method, opt = _setup(name, layout, "rigl")
        for x, y in _data(50):
            _step(model, opt, x, y)
        assert method.updater.updates == 3
        runs[layout] = model
    for (n, a), (_, b) in zip(sparse_layers(runs[pair[0]]), sparse_layers(runs[pair[1]])):
        assert torch.equal(a.dense_mask(), b.dense_mask()), n
        torch.testing.assert_close(a.theta(), b.theta(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_resume_mid_run_is_bit_identical(layout):
    data = _data(40)
    model, method, opt = _setup("signin", layout, "rigl", steps=40, update_every=7)
    for x, y in data:
        _step(model, opt, x, y)
    full = {k: v.clone() for k, v in model.state_dict().items()}

    model, method, opt = _setup("signin", layout, "rigl", steps=40, update_every=7)
    for x, y in data[:20]:
        _step(model, opt, x, y)
    saved = (
        {k: v.clone() for k, v in model.state_dict().items()},
        _clone(opt.state_dict()),
        method.state_dict(),
    )
    model, method, opt = _setup("signin", layout, "rigl", steps=40, update_every=7)
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    method.load_state_dict(saved[2])
    for x, y in data[20:]:
        _step(model, opt, x, y)
    resumed = model.state_dict()
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def _clone(obj):
    import copy

    return copy.deepcopy(obj)


@pytest.mark.parametrize("bad,match", [
    (dict(dynamic="grow"), "dynamic"),
    (dict(dynamic="rigl", update_every=0), "update_every"),
    (dict(dynamic="rigl", drop_fraction=1.5), "drop_fraction"),
    (dict(dynamic="rigl", drop_schedule="linear"), "drop_schedule"),
    (dict(dynamic="rigl", stop_at=0), "stop_at"),
    (dict(dynamic="rigl", layout="auto"), "layout"),
])
def test_bad_options_name_the_argument(bad, match):
    with pytest.raises(ValueError, match=match):
        make_method("signin", **bad)


def test_step_in_backward_gives_the_same_dynamic_run():
    runs = []
    for attach in (False, True):
        model, method, opt = _setup("signin", "dense", "rigl", update_every=5, steps=20)
        if attach:
            opt.attach()
        for x, y in _data(20):
            if not attach:
                opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        assert method.updater.updates == 3
        runs.append(model.state_dict())
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], runs[1][k], rtol=0, atol=0)


def test_rigl_on_a_convolution_keeps_density_and_grows_by_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 5 * 5, 3)).double()
    method = make_method("signin", density=0.3, distribution="uniform", dynamic="rigl", update_every=3,
                         stop_at=1.0)
    method.prepare(model)
    opt = method.make_optimizer(model, "sgd", lr=0.05, momentum=0.9)
    method.apply(model, opt, epochs=1, steps_per_epoch=10)
    nnz = model[0].nnz()
    g = torch.Generator().manual_seed(0)
    for _ in range(9):
        x, y = torch.randn(4, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)
        _step(model, opt, x, y)
        assert model[0].nnz() == nnz
    assert method.updater.updates == 3 and method.updater.regrown > 0
    _check_pruned(model, opt)


_DDP_WORKER = r'''
import sys, torch, torch.distributed as dist
from torch import nn
sys.path.insert(0, sys.argv[3])
from sparse_engine.methods import make_method
from sparse_engine.param import sparse_layers

def run(rank, world, init, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 4)).double()
    method = make_method(sys.argv[4], density=0.3, distribution="uniform", dynamic=sys.argv[5], update_every=5,
                         stop_at=1.0)
    method.prepare(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = method.make_optimizer(model, "sgd", lr=0.05, momentum=0.9)
    method.apply(model, opt, epochs=1, steps_per_epoch=20)
    g = torch.Generator().manual_seed(100 + rank)  # every rank its own data: different local gradients
    for _ in range(20):
        x, y = torch.randn(8, 12, generator=g, dtype=torch.float64), torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    assert method.updater.updates == 3
    torch.save({n: m.dense_mask() for n, m in sparse_layers(model)} | {"theta": model[0].theta().detach()},
               f"{out}/rank{rank}.pt")
    dist.destroy_process_group()

if __name__ == "__main__":
    import torch.multiprocessing as mp
    mp.spawn(run, args=(2, "file://" + sys.argv[1] + "/init", sys.argv[1]), nprocs=2)
'''


@pytest.mark.parametrize("name,dynamic", [("signin", "rigl"), ("static", "set")])
def test_ddp_two_processes_keep_identical_masks(tmp_path, name, dynamic):
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    root = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), "x", root, name, dynamic],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_compiled_model_gives_the_same_run_with_a_bounded_number_of_graphs(layout):
    """torch.compile (dynamo, eager backend: the graphs are what is counted) after method.apply: the mask
    updates see the compiled model's gradients, and no graph is compiled after the first two updates."""
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    runs, counts = [], []
    for compiled in (False, True):
        model, method, opt = _setup("signin", layout, "rigl", update_every=5, steps=30)
        run = torch.compile(model, backend=backend) if compiled else model
        for i, (x, y) in enumerate(_data(30), start=1):
            _step(run, opt, x, y)
            if i == 10:
                counts.append(len(graphs))
        assert method.updater.updates == 5 and method.updater.regrown > 0
        runs.append(model)
    assert counts[-1] == len(graphs) and 0 < len(graphs) <= 8, len(graphs)
    for (n, a), (_, b) in zip(sparse_layers(runs[0]), sparse_layers(runs[1])):
        assert torch.equal(a.dense_mask(), b.dense_mask()), n
        torch.testing.assert_close(a.theta(), b.theta(), rtol=1e-9, atol=1e-12)


def test_rigl_forms_dense_gradients_only_in_update_steps_and_keeps_only_indices():
    model, method, opt = _setup("static", "dense", "rigl", update_every=5, steps=20)
    updater = method.updater
    calls = []
    real = updater._capture

    def capture(name, module, x, g):
        calls.append((opt.num_steps + 1, name))
        real(name, module, x, g)
        kept = updater._candidates[name]
        assert kept.dtype == torch.int64 and kept.dim() == 1 and kept.numel() == updater._planned[name]

    updater._capture = capture
    for x, y in _data(20):
        _step(model, opt, x, y)
    with torch.no_grad():  # forwards outside training capture nothing either
        model(_data(1)[0][0])
    layers = [n for n, _ in sparse_layers(model)]
    assert sorted(calls) == sorted((s, n) for s in (5, 10, 15) for n in layers)
