"""sparsify() on an MLP, a small ResNet-style CNN and a transformer layer; diagnostics."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_engine.nn import diagnostics
from sparse_engine.app.models import BasicBlock as Block  # conv-bn-relu, conv-bn, (projected) residual, relu
from sparse_engine.nn import SparseConv2d, SparseLinear, SparsifyReport, sparsify
from sparse_engine.nn.linear import SparseModule, is_block_aligned


def mlp():
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 7))


class SmallResNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = Block(8, 8, 1)
        self.layer2 = Block(8, 16, 2)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def weight_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d))}


MODELS = {
    "mlp": (mlp, lambda: torch.randn(5, 20)),
    "resnet": (SmallResNet, lambda: torch.randn(2, 3, 12, 12)),
}


# --------------------------------------------------------------------------------- identity at 1.0


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", ["static", "dense", "signin", "pilot"])
def test_density_one_gives_the_original_outputs(name, method):
    build, data = MODELS[name]
    model = build().eval()
    x = data()
    y0 = model(x)
    layers = weight_layers(model)
    report = sparsify(model, method=method, density=1.0)
    assert len(report) == len(layers)
    assert all(isinstance(m, SparseModule) for n, m in model.named_modules() if n in layers)
    y = model(x)
    if method in ("static", "dense"):
        assert torch.equal(y, y0)  # θ = w exactly
    else:  # θ = m ⊙ w: equal up to the rounding of one product
        torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-6)
    assert report.density == 1.0


# ------------------------------------------------------------------------------ exact densities


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
@pytest.mark.parametrize("density", [0.05, 0.3])
def test_exact_overall_density_and_report(name, distribution, density):
    build, data = MODELS[name]
    model = build()
    layers = weight_layers(model)
    shapes = {n: tuple(m.weight.shape) for n, m in layers.items()}
    total = sum(m.weight.numel() for m in layers.values())
    report = sparsify(model, method="signin", density=density, distribution=distribution, seed=3)
    assert isinstance(report, SparsifyReport)
    nnz = sum(m.nnz() for m in model.modules() if isinstance(m, SparseModule))
    assert nnz == report.nnz == round(density * total)
    assert report.numel == total
    assert [r.name for r in report] == list(layers)
    for r in report:
        mod = model.get_submodule(r.name)
        assert r.shape == shapes[r.name] == tuple(mod.weight_shape)
        assert r.type == type(layers[r.name]).__name__
        assert r.nnz == mod.nnz() and r.density == pytest.approx(mod.density())
        assert mod.kind == "signin"
    text = str(report)
    for r in report:
        assert r.name in text
    assert "total" in text and f"{report.density:.4f}" in text
    if distribution == "uniform":
        for r in report:
            assert abs(r.nnz - density * r.numel) <= len(report)  # rounding spread over layers
    y = model(data())
    y.sum().backward()


def test_masks_are_deterministic_per_seed():
    def masks(seed):
        model = mlp()
        sparsify(model, method="static", density=0.2, seed=seed)
        return [m.dense_mask() for m in model.modules() if isinstance(m, SparseModule)]

    a, b, c = masks(1), masks(1), masks(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_resnet_leaves_norms_alone_and_keeps_weights():
    model = SmallResNet()
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    original = {n: m.weight.detach().clone() for n, m in weight_layers(model).items()}
    sparsify(model, method="static", density=0.3, distribution="erk")
    for n, m in bns.items():
        assert model.get_submodule(n) is m
    for n, w in original.items():
        mod = model.get_submodule(n)
        mask = mod.dense_mask()  # None: ERK made this small layer dense
        expect = w if mask is None else torch.where(mask, w, torch.zeros_like(w))
        assert torch.equal(mod.weight.detach(), expect)
    assert isinstance(model.layer2.shortcut[0], SparseConv2d)
    assert isinstance(model.head, SparseLinear)


@pytest.mark.parametrize("method", ["pilot", "dense"])
def test_methods_without_mask(method):
    model = SmallResNet()
    report = sparsify(model, method=method, density=0.1)
    for mod in model.modules():
        if isinstance(mod, SparseModule):
            assert mod.dense_mask() is None
            assert mod.kind == ("pilot" if method == "pilot" else "masked")
            assert mod.target_density == (0.1 if method == "pilot" else None)
    assert report.density == 1.0
    assert all(r.target_density == (0.1 if method == "pilot" else None) for r in report)
    if method == "pilot":
        assert "pruning target 0.1" in str(report)


def test_layouts_share_masks_and_outputs():
    x = torch.randn(4, 20)
    ref = mlp()
    outs = {}
    for layout in ("dense", "csr", "auto"):
        model = copy.deepcopy(ref)
        sparsify(model, method="signin", density=0.25, layout=layout, seed=9)
        outs[layout] = (model(x), [m.dense_mask() for m in model.modules() if isinstance(m, SparseModule)])
    for layout in ("csr", "auto"):
        torch.testing.assert_close(outs[layout][0], outs["dense"][0])
        assert all(torch.equal(a, b) for a, b in zip(outs[layout][1], outs["dense"][1]))


@pytest.mark.parametrize("layout", ["block", "bsr"])
def test_block_layouts_get_block_masks(layout):
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64))
    report = sparsify(model, method="static", density=0.25, layout=layout, block_shape=(16, 16))
    for mod in model.modules():
        if isinstance(mod, SparseModule):
            assert is_block_aligned(mod.mask2d(), (16, 16))
            assert mod.storage == ("bsr" if layout == "bsr" else "dense")
    assert abs(report.density - 0.25) < 0.1  # whole blocks: the nearest density blocks allow
    model(torch.randn(3, 64)).sum().backward()


def test_filter_and_dense_first_last():
    model = SmallResNet()
    report = sparsify(model, density=0.3, filter=lambda name, m: isinstance(m, nn.Conv2d))
    assert isinstance(model.head, nn.Linear) and not isinstance(model.head, SparseModule)
    assert ("head", "excluded by filter") in report.skipped
    model = SmallResNet()
    report = sparsify(model, density=0.3, dense_first_last=True)
    assert type(model.stem[0]) is nn.Conv2d and type(model.head) is nn.Linear
    assert {n for n, why in report.skipped if why == "dense_first_last"} == {"stem.0", "head"}
    assert "stem.0" not in [r.name for r in report]
    assert report.nnz == round(0.3 * report.numel)
    assert "left dense" in str(report)


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.proj(self.emb(ids))))


def test_tied_weights_and_embeddings_are_left_alone():
    model = TiedLM()
    report = sparsify(model, density=0.5)
    assert [r.name for r in report] == ["proj"]
    assert type(model.head) is nn.Linear and model.head.weight is model.emb.weight
    assert ("head", "weight tied with emb.weight") in report.skipped
    model(torch.randint(0, 50, (2, 5))).sum().backward()


def test_transformer_layer_skips_attention_internals():
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    x = torch.randn(2, 5, 16)
    y0 = layer(x)
    report = sparsify(layer, method="static", density=1.0)
    assert sorted(r.name for r in report) == ["linear1", "linear2"]
    assert any(n == "self_attn.out_proj" for n, _ in report.skipped)
    assert torch.equal(layer(x), y0)
    report = sparsify(nn.Sequential(layer), method="signin", density=0.5)  # already sparse: nothing new
    assert len(report) == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="method must be one of"):
        sparsify(mlp(), method="rigl")
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\], got 0.0"):
        sparsify(mlp(), density=0.0)
    with pytest.raises(ValueError, match="distribution must be one of"):
        sparsify(mlp(), distribution="gaussian")
    with pytest.raises(ValueError, match="layout must be one of"):
        sparsify(mlp(), layout="coo")
    with pytest.raises(ValueError, match="method='pilot' trains dense"):
        sparsify(mlp(), method="pilot", layout="csr")
    with pytest.raises(ValueError, match="model itself is a Linear"):
        sparsify(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sparsify("model")
    with pytest.raises(TypeError, match="filter must be callable"):
        sparsify(mlp(), filter="Linear")


# --------------------------------------------------------------------------------- copies, files


@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_whole_model_deepcopy_pickle_state_dict(layout):
    model = SmallResNet()
    sparsify(model, method="signin", density=0.2, layout=layout, seed=1)
    model(torch.randn(4, 3, 12, 12))  # move BN statistics
    model.eval()
    x = torch.randn(2, 3, 12, 12)
    y = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone(x), y)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = SmallResNet()  # other initial weights, other mask seed
    sparsify(fresh, method="signin", density=0.2, layout=layout, seed=2)
    fresh.load_state_dict(torch.load(buf))
    fresh.eval()
    assert torch.equal(fresh(x), y)
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(fresh.state_dict()[k], v), k


# ----------------------------------------------------------------------------------- diagnostics


def test_layer_stats_counts_sign_flips_beta_and_l1():
    model = mlp()
    sparsify(model, method="signin", density=0.3, beta=0.5)
    stats = diagnostics.layer_stats(model)
    assert [s["name"] for s in stats] == ["0", "2", "4"]
    for s in stats:
        mod = model.get_submodule(s["name"])
        assert s["sign_flips"] == 0  # first call: nothing to compare with
        assert s["density"] == pytest.approx(mod.density()) and s["nnz"] == mod.nnz()
        assert s["beta_mean"] == pytest.approx(0.5, abs=1e-5)
        assert s["beta_min"] == pytest.approx(0.5, abs=1e-5) and s["beta_max"] == pytest.approx(0.5, abs=1e-5)
        assert s["l1"] == pytest.approx(float(mod.weight.detach().abs().sum()), rel=1e-6)
        assert s["kind"] == "signin" and s["shape"] == tuple(mod.weight_shape)
    # flip the sign of k active coordinates of the first layer: exactly k flips there, none elsewhere
    first = model.get_submodule("0")
    active = first.dense_mask().reshape(-1).nonzero().flatten()
    k = 7
    with torch.no_grad():
        first.param.w.view(-1)[active[:k]] *= -1
    stats = diagnostics.layer_stats(model)
    assert [s["sign_flips"] for s in stats] == [k, 0, 0]
    assert [s["sign_flips"] for s in diagnostics.layer_stats(model)] == [0, 0, 0]
    # β erodes: shrink both factors
    with torch.no_grad():
        first.param.m.mul_(0.5)
        first.param.w.mul_(0.5)
    s0 = diagnostics.layer_stats(model)[0]
    assert s0["beta_max"] < 0.5 * 0.5**2 + 1e-6
    total = diagnostics.summary(stats)
    assert total["layers"] == 3 and total["nnz"] == sum(s["nnz"] for s in stats)
    assert total["sign_flips"] == k and total["l1"] == pytest.approx(sum(s["l1"] for s in stats))
    assert total["density"] == pytest.approx(0.3, abs=1e-3)
    table = diagnostics.format_table(stats)
    assert "sign_flips" in table and "total" in table and all(s["name"] in table for s in stats)


def test_diagnostics_masked_and_compact():
    model = mlp()
    sparsify(model, method="static", density=0.2, layout="csr")
    stats = diagnostics.layer_stats(model)
    assert all(s["beta_mean"] is None for s in stats)
    assert diagnostics.summary(model)["beta_mean"] is None
    assert diagnostics.summary(model)["nnz"] == round(0.2 * sum(s["numel"] for s in stats))
    assert diagnostics.layer_stats(nn.Linear(3, 3)) == []
    assert "name" in diagnostics.format_table([])


def test_conv1d_model_keeps_dtype_and_mode():
    model = (
        nn.Sequential(
            nn.Conv1d(3, 8, 5, padding=2),
            nn.ReLU(),
            nn.Conv1d(8, 8, 3, groups=2),
            nn.Flatten(),
            nn.Linear(8 * 14, 4),
        )
        .double()
        .eval()
    )
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    y0 = model(x)
    report = sparsify(model, method="static", density=1.0)
    assert [r.type for r in report] == ["Conv1d", "Conv1d", "Linear"]
    assert torch.equal(model(x), y0)
    assert all(not m.training for m in model.modules())
    model = nn.Sequential(nn.Conv1d(3, 8, 5, padding=2), nn.ReLU(), nn.Conv1d(8, 8, 3, groups=2)).double()
    report = sparsify(model, method="signin", density=0.4, distribution="uniform")
    assert report.nnz == round(0.4 * report.numel)
    assert all(m.param.w.dtype == torch.float64 for m in model.modules() if isinstance(m, SparseModule))
    model(x).sum().backward()
