"""extract() and the inference modules: same outputs as the trained model, every format, PILoT pruning,
the measured "auto" rule, no_grad / inference_mode / torch.compile / device and dtype moves, Hugging Face.

Reference for every inference layer: F.linear / F.conv with θ = where(M, θ, 0) computed in float64.
"""
from __future__ import annotations

import copy
import importlib
import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from _tolerances import assert_close
from torch import nn

from sparse_engine.export.extract import extract, report
from sparse_engine.export.infer import InferConv1d, InferConv2d, InferLinear, InferModule
from sparse_engine.app.models import build_model
from sparse_engine.nn import SparseConv2d, SparseLinear, sparsify

extract_mod = importlib.import_module("sparse_engine.export.extract")
FORMATS = ("dense", "csr", "bsr")
DTYPES = (torch.float32, torch.float64, torch.float16)


@pytest.fixture(autouse=True)
def _short_auto_timing(monkeypatch):
    # These tests check the decision logic, not timing precision: short measurements keep them fast.
    monkeypatch.setattr(extract_mod, "ROUNDS", 4)
    monkeypatch.setattr(extract_mod, "BURST_S", 0.001)


def nm_mask(shape, seed=0):
    """A random 2:4 pattern along the last dim (exactly 2 of every 4)."""
    g = torch.Generator().manual_seed(seed)
    n, k = shape
    scores = torch.rand(n, k // 4, 4, generator=g)
    keep = scores.argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool)
    mask.scatter_(2, keep, True)
    return mask.reshape(n, k)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------------------ inference modules


@pytest.mark.parametrize("fmt", FORMATS + ("nm",))
@pytest.mark.parametrize("shape", [(1, 4), (7, 12), (129, 36)])
@pytest.mark.parametrize("density", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_infer_linear_matches_reference(fmt, shape, density, dtype):
    n, k = shape
    theta = randn(n, k, dtype=dtype)
    if fmt == "nm":  # density 1 here means the full 2:4 pattern (half of the weights)
        mask = nm_mask(shape) & (torch.rand(shape) < density * 2)
    else:
        mask = torch.rand(shape) < density
    bias = randn(n, dtype=dtype)
    mod = InferLinear(theta, bias, fmt, mask, block_shape=(4, 8))
    x = randn(5, 3, k, dtype=dtype)
    expected = F.linear(x.double(), torch.where(mask, theta, 0).double(), bias.double())
    assert_close(mod(x), expected, dtype, f"InferLinear {fmt} {shape} d={density}")
    assert torch.equal(mod.dense_weight(), torch.where(mask, theta, torch.zeros((), dtype=dtype)))
    assert mod.nnz == int((torch.where(mask, theta, 0) != 0).sum())


@pytest.mark.parametrize("fmt", ("csr", "bsr"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "grad"])
def test_infer_linear_eager_inference_shapes(fmt, dtype, mode):
    """The eager path (no gradient wanted: the backend's lean entry) for every input shape it special-cases:
    (1, K) and (B, K) contiguous as they are, 1-D, 3-D and non-contiguous x reshaped; with grad on and x
    requiring grad, the op with autograd instead."""
    n, k = 45, 33
    theta, mask = randn(n, k, dtype=dtype), torch.rand(n, k) < 0.2
    mod = InferLinear(theta, randn(n, dtype=dtype), fmt, mask, block_shape=(4, 8))
    ref_w = torch.where(mask, theta, 0).double()
    xs = [randn(1, k, dtype=dtype), randn(6, k, dtype=dtype), randn(k, dtype=dtype), randn(2, 3, k, dtype=dtype),
          randn(k, 4, dtype=dtype).t()]
    for x in xs:
        ctx = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}.get(mode)
        if ctx is None:
            x = x.detach().requires_grad_()
            y = mod(x)
            y.sum().backward()
            assert_close(x.grad, torch.ones(*x.shape[:-1], n, dtype=torch.float64) @ ref_w, dtype, "dx")
        else:
            with ctx():
                y = mod(x)
        assert y.shape == (*x.shape[:-1], n)
        assert_close(y, F.linear(x.detach().double(), ref_w, mod.bias.double()), dtype, f"{fmt} {tuple(x.shape)}")
    if mode == "grad":  # a bias that wants a gradient gets one, through the op, with x not requiring one
        mod.bias.requires_grad_()
        mod(xs[0]).sum().backward()
        assert_close(mod.bias.grad, torch.ones(n, dtype=torch.float64), dtype, "bias grad")


def test_infer_linear_keeps_16_bit_columns_where_they_fit(tmp_path):
    """A CSR layer with in_features <= 65536 keeps its columns also in 16 bits (derived, never saved), and
    its eager CPU forward reads them; BSR layers and wider ones keep int32 only. The copy follows every
    way a layer is rebuilt or moved."""
    from sparse_engine.export.io import load, save
    from sparse_engine.ops import infer_entry

    n, k = 70, 150
    theta, mask = randn(n, k), torch.rand(n, k) < 0.3
    mod = InferLinear(theta, None, "csr", mask)
    assert mod.col16.dtype == torch.int16 and torch.equal(mod.col16.long() & 0xFFFF, mod.col.long())
    assert "col16" not in mod.state_dict()
    assert InferLinear(theta, None, "bsr", mask, block_shape=(4, 4)).col16 is None
    wide_mask = torch.rand(5, 65537) < 0.9
    assert InferLinear(randn(5, 65537), None, "csr", wide_mask).col16 is None
    widest = InferLinear(randn(5, 65536), None, "csr", wide_mask[:, :65536])
    assert widest.col16 is not None and torch.equal(widest.col16.long() & 0xFFFF, widest.col.long())
    path = tmp_path / "m.sparse"
    save(nn.Sequential(mod), path)
    again = load(path)[0]
    assert torch.equal(again.col16.long() & 0xFFFF, again.col.long())
    assert torch.equal(copy.deepcopy(mod).col16, mod.col16)
    assert torch.equal(pickle.loads(pickle.dumps(mod)).col16, mod.col16)
    assert torch.equal(mod.double().col16, mod.col16)
    mod.float()
    other = InferLinear(randn(n, k), None, "csr", torch.rand(n, k) < 0.3)
    mod.load_state_dict(other.state_dict())  # another pattern: the copy is rebuilt with it
    assert torch.equal(mod.col16.long() & 0xFFFF, other.col.long())
    for x in (randn(1, k), randn(3, k), randn(2, 1, k)):  # the batch-1 SpMV, the panel SpMM, 3-D input
        with torch.no_grad():
            good = mod(x)
            assert good.shape == (*x.shape[:-1], mod.out_features)
            assert_close(good, x.double() @ mod.dense_weight().double().t(), torch.float32, "16-bit columns")
            mod.col16[0] = k  # col is intact: only a forward that reads col16 sees the bad entry
            if infer_entry(torch.device("cpu"), torch.float32) is not None:
                with pytest.raises(ValueError, match="out of range"):  # the lean C++ forward reads col16
                    mod(x)
            else:  # no lean entry in this build: the op runs, on the int32 columns
                assert torch.equal(mod(x), good)
            mod.col16[0] = mod.col[0]
            assert torch.equal(mod(x), good)


CONV_OPTS = [
    {"stride": 1, "padding": 0},
    {"stride": 2, "padding": 1, "dilation": 1},
    {"stride": 1, "padding": "same", "dilation": 2},
    {"stride": (2, 1), "padding": (1, 2), "padding_mode": "reflect"},
    {"stride": 1, "padding": 1, "padding_mode": "circular"},
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("opts", CONV_OPTS)
@pytest.mark.parametrize("bias", [True, False])
def test_infer_conv2d_matches_functional(fmt, opts, bias):
    theta = randn(6, 3, 3, 3, dtype=torch.float64)
    mask = torch.rand(theta.shape) < 0.3
    b = randn(6, dtype=torch.float64) if bias else None
    mod = InferConv2d(theta, b, fmt, mask, block_shape=(2, 4), **opts)
    x = randn(2, 3, 9, 8, dtype=torch.float64)
    ref = nn.Conv2d(3, 6, 3, bias=bias, dtype=torch.float64, **opts)
    with torch.no_grad():
        ref.weight.copy_(torch.where(mask, theta, 0))
        if bias:
            ref.bias.copy_(b)
    assert_close(mod(x), ref(x), torch.float64, f"InferConv2d {fmt} {opts}")
    assert_close(mod(x[0]), ref(x[0]), torch.float64, "unbatched input")


@pytest.mark.parametrize("fmt", FORMATS)
def test_infer_conv1d_matches_functional(fmt):
    theta = randn(5, 4, 3, dtype=torch.float64)
    mask = torch.rand(theta.shape) < 0.4
    mod = InferConv1d(theta, None, fmt, mask, stride=2, padding=2, dilation=2, block_shape=(2, 2))
    x = randn(3, 4, 17, dtype=torch.float64)
    assert_close(mod(x), F.conv1d(x, torch.where(mask, theta, 0), None, 2, 2, 2), torch.float64, f"conv1d {fmt}")


def test_grouped_conv_only_dense():
    theta = randn(4, 2, 3, 3)
    with pytest.raises(ValueError, match="groups"):
        InferConv2d(theta, None, "csr", groups=2)
    mod = InferConv2d(theta, None, "dense", groups=2)
    x = randn(1, 4, 5, 5)
    assert_close(mod(x), F.conv2d(x.double(), theta.double(), groups=2), torch.float32, "grouped dense conv")


def test_bad_format_and_nm_pattern_errors():
    with pytest.raises(ValueError, match="format must be one of"):
        InferLinear(randn(3, 4), None, "coo")
    with pytest.raises(ValueError, match="2:4|not 2:4"):
        InferLinear(randn(3, 8), None, "nm", torch.ones(3, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="block_shape"):
        InferLinear(randn(3, 4), None, "bsr")


@pytest.mark.parametrize("fmt", FORMATS)
def test_state_dict_is_compact_and_reloads_another_pattern(fmt):
    theta = randn(20, 30)
    a = InferLinear(theta, randn(20), fmt, torch.rand(20, 30) < 0.1, block_shape=(4, 4))
    b = InferLinear(randn(20, 30), randn(20), fmt, torch.rand(20, 30) < 0.5, block_shape=(4, 4))
    sd = a.state_dict()
    if fmt in ("csr", "dense"):  # derived index fields are rebuilt, not stored; a sparse dense weight as CSR
        assert set(sd) == {"values", "crow", "col", "bias", "_extra_state"}
    assert all(isinstance(t, torch.Tensor) for t in sd.values())
    b.load_state_dict(sd)
    x = randn(4, 30)
    assert torch.equal(a(x), b(x))
    bad = dict(sd)
    if fmt != "dense":
        bad["col"] = sd["col"].flip(0)
        with pytest.raises(RuntimeError, match="invalid index|col"):
            b.load_state_dict(bad)


def test_deepcopy_pickle_and_dtype_moves():
    mod = InferLinear(randn(8, 12), randn(8), "csr", torch.rand(8, 12) < 0.3)
    x = randn(2, 12)
    for other in (copy.deepcopy(mod), pickle.loads(pickle.dumps(mod))):
        assert torch.equal(other(x), mod(x))
    d = copy.deepcopy(mod).double()
    assert d.values.dtype == torch.float64 and d.crow.dtype == torch.int32
    torch.testing.assert_close(d(x.double()).float(), mod(x), rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in mod.parameters())


# ----------------------------------------------------------------------------------- whole models


def _models():
    return [
        ("mlp", (784,), lambda b: torch.randn(b, 784)),
        ("cnn", (1, 28, 28), lambda b: torch.randn(b, 1, 28, 28)),
        ("transformer", (16,), lambda b: torch.randint(0, 50, (b, 16))),
    ]


def _train_a_little(model, x, steps=3):
    """A few SGD steps so that m, w (and β) differ from their initial values."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()
    return model.eval()


_CASES = [(name, method, fmt) for name in ("mlp", "cnn", "transformer") for method, fmt in
          (("signin", "auto"), ("static", "csr"), ("signin", "dense"))] + [("mlp", "static", "auto"),
                                                                          ("mlp", "signin", "csr")]


@pytest.mark.parametrize("name,method,fmt", _CASES)
def test_extract_same_outputs_as_trained(name, method, fmt):
    _, shape, make_x = next(m for m in _models() if m[0] == name)
    model = build_model(name, shape, 10, vocab_size=50)
    sparsify(model, method, 0.1)
    x = make_x(4)
    _train_a_little(model, x)
    with torch.no_grad():
        expected = model(x)
    before = copy.deepcopy(model.state_dict())
    out = extract(model, fmt, example_inputs=(x,), batch_sizes=(1, 4))
    # the trained model is untouched (extract works on a copy)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor))
    assert not out.training
    layers = [m for m in out.modules() if isinstance(m, InferModule)]
    assert layers and not any(hasattr(m, "param") for m in out.modules())
    assert not any(n.endswith((".m", ".w")) for n, _ in out.named_parameters())
    with torch.no_grad():
        assert_close(out(x), expected, torch.float32, f"{name} {method} {fmt}")
    with torch.inference_mode():
        assert_close(out(x), expected, torch.float32, "under inference_mode")
    if fmt != "auto":
        assert {m.format for m in layers} == {fmt}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_extract_other_dtypes(dtype):
    model = build_model("mlp", (784,), 10).to(dtype)
    sparsify(model, "signin", 0.1)
    x = torch.randn(3, 784, dtype=dtype)
    with torch.no_grad():
        expected = model.double()(x.double()) if dtype == torch.float16 else model(x)
    model.to(dtype)
    for fmt in ("dense", "csr"):
        out = extract(model, fmt)
        with torch.no_grad():
            y = out(x)
        assert y.dtype == dtype
        assert_close(y, expected, dtype, f"mlp {dtype} {fmt}")


def test_pilot_pruned_to_target_per_layer_and_global():
    model = build_model("mlp", (784,), 10)
    sparsify(model, "pilot", 0.1)
    for _, mod in extract_mod.sparse_layers(model):
        assert mod.dense_mask() is None and mod.target_density is not None
    x = torch.randn(4, 784)
    _train_a_little(model, x)
    targets = {n: m.target_density for n, m in extract_mod.sparse_layers(model)}
    thetas = {n: m.theta().detach() for n, m in extract_mod.sparse_layers(model)}

    per_layer = extract(model, "csr", scope="layer")
    for name, target in targets.items():
        mod = per_layer.get_submodule(name)
        numel = math.prod(mod.weight_shape)
        assert mod.index().nnz == round(target * numel), name
        # the kept weights are the largest |θ| of the layer
        kept = thetas[name].abs()[mod.mask()]
        dropped = thetas[name].abs()[~mod.mask()]
        assert kept.min() >= dropped.max()

    glob = extract(model, "csr", scope="global")
    total = sum(t.numel() for t in thetas.values())
    d = sum(targets[n] * thetas[n].numel() for n in thetas) / total
    assert sum(glob.get_submodule(n).index().nnz for n in thetas) == round(d * total)
    threshold = min(float(thetas[n].abs()[glob.get_submodule(n).mask()].min()) for n in thetas)
    assert all(float(thetas[n].abs()[~glob.get_submodule(n).mask()].max()) <= threshold for n in thetas)

    override = extract(model, "csr", density=0.05)
    for name in targets:
        mod = override.get_submodule(name)
        assert mod.index().nnz == round(0.05 * math.prod(mod.weight_shape))
    # the pruned extracted model computes with the pruned θ
    with torch.no_grad():
        ref = copy.deepcopy(model)
        for name, mod in extract_mod.sparse_layers(ref):
            mod.set_mask(per_layer.get_submodule(name).mask())
        assert_close(per_layer(x), ref(x), torch.float32, "pruned PILoT")


def test_auto_rule_with_injected_times(monkeypatch):
    """The decision rule: sparse only when > margin faster than dense at every batch size."""
    theta = randn(64, 64)
    mask = torch.rand(64, 64) < 0.1
    cases = [
        ({"dense": [1.0, 1.0], "csr": [0.5, 0.5]}, "csr"),
        ({"dense": [1.0, 1.0], "csr": [0.5, 1.2]}, "dense"),  # faster at batch 1, slower at 64
        ({"dense": [1.0, 1.0], "csr": [0.97, 0.97]}, "dense"),  # within the 5 % margin
        ({"dense": [1.0, 1.0], "csr": [0.6, 0.9], "bsr": [0.5, 0.8]}, "bsr"),
    ]
    for times, want in cases:
        shape_no = iter(range(2))

        def fake(fns, device, rounds, times=times, shape_no=shape_no):
            i = next(shape_no)
            for fn in fns.values():
                fn()  # the candidates really run
            return {fmt: [times[fmt][i]] * 3 for fmt in fns}  # three rounds alike

        monkeypatch.setattr(extract_mod, "_measure", fake)
        extract_mod._cache.clear()
        cands = {f: (lambda f=f: InferLinear(theta, None, "csr" if f != "dense" else "dense", mask)) for f in times}
        chosen, measured, reason = extract_mod._choose(cands, [(1, 64), (64, 64)], ("k", want, str(times)),
                                                        torch.device("cpu"), torch.float32, torch.float32, 0.05)
        assert chosen == want, (times, chosen, reason)
        for s in measured["dense"]:
            assert measured[chosen][s] <= measured["dense"][s]
    extract_mod._cache.clear()


def test_auto_within_noise_measures_again_then_keeps_dense(monkeypatch):
    """Rounds where the fastest calls say csr wins but the paired per-round ratios say it does not (load
    hit dense in its best round only): measured once more, and still within noise, dense is kept and the
    reason says so; a clear win in both estimates picks csr."""
    theta = randn(64, 64)
    mask = torch.rand(64, 64) < 0.1
    noisy = {"dense": [0.5, 1.0, 1.0, 1.0, 1.0], "csr": [0.45, 1.0, 1.0, 1.0, 1.0]}
    clear = {"dense": [1.0, 1.1, 3.0, 1.0, 1.2], "csr": [0.5, 0.6, 1.4, 0.5, 0.5]}
    r = extract_mod.ROUNDS
    for samples, want, calls_want in ((noisy, "dense", [r, 2 * r]), (clear, "csr", [r])):
        calls = []

        def fake(fns, device, rounds, samples=samples, calls=calls):
            calls.append(rounds)
            return {fmt: list(samples[fmt]) for fmt in fns}

        monkeypatch.setattr(extract_mod, "_measure", fake)
        extract_mod._cache.clear()
        cands = {f: (lambda f=f: InferLinear(theta, None, f, mask)) for f in ("dense", "csr")}
        chosen, _, reason = extract_mod._choose(cands, [(1, 64)], ("noise", want), torch.device("cpu"),
                                                torch.float32, torch.float32, 0.05)
        assert (chosen, calls) == (want, calls_want), (chosen, calls, reason)
        assert ("within the noise" in reason) == (want == "dense"), reason
        assert "csr" in reason and "paired median" in reason
    extract_mod._cache.clear()


def test_batch_size_is_where_auto_measures(monkeypatch):
    model = build_model("mlp", (784,), 10)
    sparsify(model, "static", 0.1)
    seen = []

    def fake(fns, device, rounds):
        for fn in fns.values():
            fn()
        return {fmt: [1.0, 1.0, 1.0] for fmt in fns}

    real = extract_mod._sample
    monkeypatch.setattr(extract_mod, "_measure", fake)
    monkeypatch.setattr(extract_mod, "_sample", lambda c, m, shape, *a: seen.append(shape) or real(c, m, shape, *a))
    extract_mod._cache.clear()
    extract(model, "auto", batch_size=32)
    assert {s[0] for s in seen} == {32}
    seen.clear()
    extract_mod._cache.clear()
    extract(model, "auto")  # default: batch 1
    assert {s[0] for s in seen} == {1}
    with pytest.raises(ValueError, match="batch_size or batch_sizes"):
        extract(model, "auto", batch_size=2, batch_sizes=(1, 2))
    with pytest.raises(ValueError, match="batch_size"):
        extract(model, "auto", batch_size=0)
    extract_mod._cache.clear()


def test_auto_never_slower_than_dense_on_measured_shapes():
    torch.manual_seed(0)
    model = build_model("mlp", (784,), 10)
    sparsify(model, "static", 0.05)
    out = extract(model, "auto", batch_sizes=(1, 16))
    rows = report(out)
    assert len(rows) == 3
    for row in rows:
        times = row["times"]
        assert set(times) >= {"dense", "csr"}
        for shape, t_dense in times["dense"].items():
            assert times[row["format"]][shape] <= t_dense, row
        assert row["reason"]


def test_auto_conv_without_example_stays_dense_and_says_why():
    model = build_model("cnn", (1, 28, 28), 10)
    sparsify(model, "static", 0.1)
    out = extract(model, "auto")
    convs = [r for r in report(out) if r["type"] == "InferConv2d"]
    assert convs and all(r["format"] == "dense" and "example_inputs" in r["reason"] for r in convs)


def test_format_dict_and_errors():
    model = build_model("mlp", (784,), 10)
    sparsify(model, "static", 0.1)
    out = extract(model, {"hidden.0": "csr", "hidden.1": "bsr", "out": "dense"})
    assert [m.format for m in out.modules() if isinstance(m, InferModule)] == ["csr", "bsr", "dense"]
    with pytest.raises(ValueError, match="not sparse layers"):
        extract(model, {"nope": "csr"})
    with pytest.raises(ValueError, match="format must be"):
        extract(model, "coo")
    with pytest.raises(ValueError, match="2:4"):
        extract(model, "nm")
    with pytest.raises(ValueError, match="scope"):
        extract(model, "csr", scope="row")
    with pytest.raises(ValueError, match="batch_sizes"):
        extract(model, "auto", batch_sizes=(0,))
    with pytest.raises(ValueError, match="no sparse_engine sparse layer"):
        extract(nn.Sequential(nn.Linear(3, 4)))


def test_non_finite_weights_and_bad_bias_are_refused():
    lin = SparseLinear(6, 4, density=1.0)
    with torch.no_grad():
        lin.param.w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        extract(nn.Sequential(lin), "dense")
    with pytest.raises(ValueError, match="bias must have shape"):
        InferLinear(randn(4, 6), randn(5), "csr")
    with pytest.raises(ValueError, match="bias must have the weight's dtype"):
        InferLinear(randn(4, 6), randn(4, dtype=torch.float64), "dense")


def test_nm_format_from_a_24_mask():
    lin = SparseLinear(16, 8, kind="masked", mask=nm_mask((8, 16)))
    model = nn.Sequential(lin)
    x = randn(3, 16)
    out = extract(model, "nm")
    assert out[0].format == "nm"
    with torch.no_grad():
        assert_close(out(x), model(x).double(), torch.float32, "nm extract")


def test_grouped_conv_extract():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU())
    sparsify(model, "static", 0.3)
    assert isinstance(model[0], SparseConv2d)
    x = randn(2, 4, 7, 7)
    with pytest.raises(ValueError, match="groups=1"):
        extract(model, "csr")
    out = extract(model, "auto", example_inputs=(x,))
    assert out[0].format == "dense" and "grouped" in out[0].extract_info["reason"]
    with torch.no_grad():
        assert_close(out(x), model(x).double(), torch.float32, "grouped conv")


def test_torch_compile_eager_backend():
    model = build_model("mlp", (784,), 10)
    sparsify(model, "static", 0.1)
    out = extract(model, {"hidden.0": "csr", "hidden.1": "bsr", "out": "dense"})
    x = torch.randn(5, 784)
    with torch.no_grad():
        expected = out(x)
        compiled = torch.compile(out, backend="aot_eager", fullgraph=True)
        assert_close(compiled(x), expected, torch.float32, "compiled (aot_eager)")


@pytest.mark.slow
def test_torch_compile_inductor():
    model = build_model("transformer", (16,), 10, vocab_size=50)
    sparsify(model, "signin", 0.1)
    out = extract(model, "csr")
    x = torch.randint(0, 50, (3, 16))
    with torch.inference_mode():
        expected = out(x)
        compiled = torch.compile(out, fullgraph=True)
        assert_close(compiled(x), expected, torch.float32, "compiled (inductor)")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["dense", "csr", "bsr"])
def test_moves_between_cpu_and_gpu(fmt):
    model = build_model("cnn", (1, 28, 28), 10)
    sparsify(model, "signin", 0.1)
    x = torch.randn(2, 1, 28, 28)
    out = extract(model, fmt, example_inputs=(x,))
    with torch.no_grad():
        expected = out(x)
        gpu = out.to("cuda")
        assert_close(gpu(x.cuda()), expected, torch.float32, "on GPU", device="cuda")
        back = gpu.to("cpu")
        assert_close(back(x), expected, torch.float32, "back on CPU")


@pytest.mark.gpu
def test_nm_semi_structured_on_gpu():
    from sparse_engine.export.infer import semi_structured_support

    n, k = 128, 128
    why = semi_structured_support("cuda", torch.float16, (n, k))
    if why:
        pytest.skip(why)
    mask = nm_mask((n, k))
    theta = randn(n, k, dtype=torch.float16)
    mod = InferLinear(theta, None, "nm", mask).cuda()
    assert mod._semi is not None
    x = randn(64, k, dtype=torch.float16).cuda()
    expected = F.linear(x.double(), torch.where(mask.cuda(), theta.cuda(), 0).double())
    assert_close(mod(x), expected, torch.float16, "semi-structured 2:4", device="cuda")
    cpu = mod.cpu()
    assert cpu._semi is None
    assert_close(cpu(x.cpu()), expected.cpu(), torch.float16, "2:4 back on CPU")


# -------------------------------------------------------------------------------------- Hugging Face


def _tiny_causal_lms():
    from _hf import import_transformers

    transformers = import_transformers()
    out = []
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    out.append((transformers.LlamaForCausalLM, cfg))
    cfg = transformers.OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=32)
    out.append((transformers.OPTForCausalLM, cfg))
    return out


@pytest.mark.parametrize("which", [0, 1], ids=["llama", "opt"])
def test_huggingface_forward_generate_and_reload(which, tmp_path):
    from sparse_engine.export import io

    cls, cfg = _tiny_causal_lms()[which]
    model = cls(cfg).eval()
    sparsify(model, "signin", 0.1)
    ids = torch.randint(0, 96, (1, 8))
    attn = torch.ones_like(ids)
    with torch.no_grad():
        logits = model(ids, attention_mask=attn).logits
        gen = model.generate(ids, attention_mask=attn, max_new_tokens=4, do_sample=False, pad_token_id=0)
    out = extract(model, "auto", example_inputs={"input_ids": ids, "attention_mask": attn})
    assert any(isinstance(m, InferLinear) for m in out.modules())
    with torch.no_grad():
        assert_close(out(ids, attention_mask=attn).logits, logits, torch.float32, f"{cls.__name__} logits")
        assert torch.equal(out.generate(ids, attention_mask=attn, max_new_tokens=4, do_sample=False,
                                        pad_token_id=0), gen)
    path = tmp_path / "lm.sparse"
    io.save(out, path)
    with torch.no_grad():
        expected = out(ids, attention_mask=attn).logits
        for loaded in (io.load(path, model=cls(cfg)), io.load(path)):
            assert type(loaded) is cls
            assert torch.equal(loaded(ids, attention_mask=attn).logits, expected)


def test_package_level_names():
    import sparse_engine

    model = nn.Sequential(SparseLinear(6, 4, density=0.5))
    importlib.import_module("sparse_engine.export.extract")  # binds the submodule on the package
    out = sparse_engine.extract(model, "csr")  # still callable
    assert isinstance(out[0], InferLinear)
    assert sparse_engine.save is importlib.import_module("sparse_engine.export.io").save


# ------------------------------------------------------------------------------ export / bench-infer


def test_export_and_bench_infer_commands(tmp_path, capsys):
    import json

    from sparse_engine.export import io
    from sparse_engine.app.cli import UserError
    from sparse_engine.app.extract_cli import bench_infer_main, export_main

    model = build_model("mlp", (784,), 10).eval()
    sparsify(model, "signin", 0.1)
    run = tmp_path / "run"
    run.mkdir()
    io.save(extract(model, "dense"), run / "model.sparse")  # an exported file, re-laid by export
    assert export_main([str(run), "--format", "csr", "--out", str(tmp_path / "m.sparse")]) == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "csr" in text
    loaded = io.load(tmp_path / "m.sparse")
    assert {m.format for m in loaded.modules() if isinstance(m, InferModule)} == {"csr"}
    assert json.loads(io.read_header(tmp_path / "m.sparse")["metadata"]["input_shape"]) == [784]
    x = torch.randn(2, 784)
    with torch.no_grad():
        assert_close(loaded(x), model(x).double(), torch.float32, "exported model")

    assert bench_infer_main([str(tmp_path / "m.sparse"), "--batch", "1,3", "--budget", "0.01", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    assert all(r["sparse_ms"] > 0 and r["dense_ms"] > 0 and r["speedup"] > 0 for r in rows)

    with pytest.raises(UserError, match="does not exist"):
        export_main([str(tmp_path / "missing")])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="neither a sparse_engine file"):
        export_main([str(tmp_path / "junk.pt")])
    with pytest.raises(UserError, match="--batch"):
        bench_infer_main([str(tmp_path / "m.sparse"), "--batch", "0"])


def test_bench_infer_reads_an_example_model_file_in_a_fresh_process(tmp_path):
    """A file of the CLI's MLP loads in a process that never imported the example models (they register
    themselves with io when the command reads the file)."""
    import subprocess
    import sys

    from sparse_engine.export import io

    model = build_model("mlp", (784,), 10).eval()
    sparsify(model, "static", 0.2)
    io.save(extract(model, "csr"), tmp_path / "m.sparse")
    code = ("import sys; from sparse_engine.app.extract_cli import main\n"
            f"sys.exit(main(['bench-infer', {str(tmp_path / 'm.sparse')!r}, '--batch', '1', '--budget', '0.01', "
            "'--input-shape', '784', '--json']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["rows"][0]["batch"] == 1
