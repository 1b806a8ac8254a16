"""Masks from weights and data: magnitude, SNIP, SynFlow and user masks, against hand-computed cases, and
their use through sparsify(mask=...) and make_method(mask=...)."""

import pytest
import torch
from torch import nn

from sparse_engine import masks as M
from sparse_engine.methods import make_method
from sparse_engine.nn import sparsify


def B(rows):
    return torch.tensor(rows, dtype=torch.bool)


def _two_layers():
    model = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [-3.0, 0.25, 1.0]]))
        model[1].weight.copy_(torch.tensor([[-2.0, 0.5]]))
    return model


def test_score_masks_per_layer_and_global_by_hand():
    s = {"a": torch.tensor([[0.1, 0.9], [0.5, 0.3]]), "b": torch.tensor([[0.2, 0.8, 0.7, 0.05]])}
    per_layer = M.score_masks(s, 0.5, "layer", "uniform")
    assert torch.equal(per_layer["a"], B([[False, True], [True, False]]))
    assert torch.equal(per_layer["b"], B([[False, True, True, False]]))
    glob = M.score_masks(s, 0.5, "global")  # 4 of 8: 0.9, 0.8, 0.7, 0.5
    assert torch.equal(glob["a"], B([[False, True], [True, False]]))
    assert torch.equal(glob["b"], B([[False, True, True, False]]))
    glob = M.score_masks(s, 0.25, "global")  # 0.9, 0.8
    assert torch.equal(glob["a"], B([[False, True], [False, False]]))
    assert torch.equal(glob["b"], B([[False, True, False, False]]))


def test_snip_scores_by_hand():
    """L = sum(W2 W1 x) over a batch: ∂L/∂W1[i, j] = W2[i] Σ_b x[b, j], ∂L/∂W2[i] = Σ_b (W1 x_b)[i]."""
    model = _two_layers()
    x = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]], dtype=torch.float64)
    scores = M.snip_scores(model, ["0", "1"], (x, torch.zeros(2)), loss_fn=lambda out, y: out.sum())
    w1, w2 = model[0].weight.detach(), model[1].weight.detach()
    xs = x.sum(0)
    g1 = w2.reshape(2, 1) * xs.reshape(1, 3)
    g2 = (w1 @ xs).reshape(1, 2)
    torch.testing.assert_close(scores["0"], (g1 * w1).abs())
    torch.testing.assert_close(scores["1"], (g2 * w2).abs())
    assert model[0].weight.grad is None  # the model itself is untouched


def test_synflow_scores_by_hand():
    """R = |W2| |W1| 1: score(W1[i, j]) = |W2[i]| |W1[i, j]|, score(W2[i]) = |W2[i]| Σ_j |W1[i, j]|."""
    model = _two_layers()
    w1, w2 = model[0].weight.detach().abs(), model[1].weight.detach().abs()
    scores = M.synflow_scores(model, ["0", "1"], (3,))
    torch.testing.assert_close(scores["0"], w2.reshape(2, 1) * w1)
    torch.testing.assert_close(scores["1"], w2 * w1.sum(1).reshape(1, 2))
    assert bool((model[0].weight < 0).any())  # signs of the model are kept


def test_synflow_iterative_prunes_to_the_density_and_rescores():
    """Three rounds at densities 0.5^(1/3), 0.5^(2/3), 0.5, each scoring the network pruned by the last
    (the closed form of the test above, with pruned weights at 0)."""
    model = _two_layers()
    scores = M.synflow_scores(model, ["0", "1"], (3,), density=0.5, iterations=3)
    a1, a2 = model[0].weight.detach().abs(), model[1].weight.detach().abs()
    k1, k2 = torch.ones_like(a1, dtype=torch.bool), torch.ones_like(a2, dtype=torch.bool)
    for k in (1, 2, 3):
        w1, w2 = a1 * k1, a2 * k2
        s1, s2 = w2.reshape(2, 1) * w1, w2 * w1.sum(1).reshape(1, 2)
        flat = torch.cat([s1.flatten(), s2.flatten()])
        keep = torch.zeros(8, dtype=torch.bool)
        keep[flat.argsort(descending=True, stable=True)[: round(0.5 ** (k / 3) * 8)]] = True
        k1, k2 = keep[:6].reshape(2, 3), keep[6:].reshape(1, 2)
    torch.testing.assert_close(scores["0"], s1 * k1)
    torch.testing.assert_close(scores["1"], s2 * k2)
    assert int(k1.sum() + k2.sum()) == 4


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))


@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_sparsify_magnitude_per_layer_keeps_the_largest_weights(layout):
    model = _mlp()
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in ("0", "2", "4")}
    report = sparsify(model, method="static", mask="magnitude", density=0.5, distribution="uniform", layout=layout)
    for name, w in weights.items():
        k = round(0.5 * w.numel())
        expect = torch.zeros(w.numel(), dtype=torch.bool)
        expect[w.abs().flatten().argsort(descending=True)[:k]] = True
        assert torch.equal(model.get_submodule(name).dense_mask().flatten(), expect), name
        torch.testing.assert_close(model.get_submodule(name).theta(), w * expect.reshape(w.shape))
    assert report.nnz == sum(round(0.5 * w.numel()) for w in weights.values())


def test_sparsify_magnitude_global_uses_one_threshold():
    model = _mlp()
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in ("0", "2", "4")}
    sparsify(model, method="signin", mask="magnitude", mask_scope="global", density=0.3)
    flat = torch.cat([w.abs().flatten() for w in weights.values()])
    t = flat.sort(descending=True).values[round(0.3 * flat.numel()) - 1]
    for name, w in weights.items():
        assert torch.equal(model.get_submodule(name).dense_mask(), w.abs() >= t), name


def test_sparsify_snip_and_synflow_need_their_inputs():
    with pytest.raises(ValueError, match="batch"):
        sparsify(_mlp(), method="static", mask="snip", density=0.5)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    with pytest.raises(ValueError, match="input_shape"):
        sparsify(conv, method="static", mask="synflow", density=0.5)
    report = sparsify(conv, method="static", mask="synflow", density=0.5, input_shape=(1, 6, 6))
    assert report.nnz == round(0.5 * report.numel)


def test_sparsify_synflow_mask_is_the_iterative_one():
    """sparsify's SynFlow mask comes from the scores rescored while the mask tightens to the density (100
    rounds), not from one round of scores."""
    model = _mlp()
    scores = M.synflow_scores(model, ["0", "2", "4"], (6,), density=0.2)
    expect = M.magnitude_masks(scores, 0.2, scope="global")
    one_round = M.magnitude_masks(M.synflow_scores(model, ["0", "2", "4"], (6,)), 0.2, scope="global")
    assert any(not torch.equal(expect[n], one_round[n]) for n in expect)  # the case tells the two apart
    sparsify(model, method="static", mask="synflow", density=0.2)
    for name, m in expect.items():
        assert torch.equal(model.get_submodule(name).dense_mask(), m), name


def test_sparsify_block_layouts_refuse_a_global_mask_scope():
    with pytest.raises(ValueError, match="mask_scope='global'.*layout='bsr'"):
        sparsify(_mlp(), method="static", mask="magnitude", mask_scope="global", density=0.5, layout="bsr",
                 block_shape=(2, 2))


def test_sparsify_snip_mask_equals_the_top_scores():
    model = _mlp()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    scores = M.snip_scores(model, ["0", "2", "4"], (x, y))
    expect = M.magnitude_masks(scores, 0.4, scope="global")
    report = sparsify(model, method="signin", mask="snip", density=0.4, batch=(x, y))
    for name, m in expect.items():
        assert torch.equal(model.get_submodule(name).dense_mask(), m), name
    assert report.nnz == round(0.4 * report.numel)


def test_user_masks_are_checked_and_reported():
    model = _mlp()
    masks = {"0": torch.rand(8, 6) < 0.5, "4": torch.ones(3, 5, dtype=torch.bool)}
    masks["4"][0] = False
    report = sparsify(model, method="static", mask=masks, layout="csr")
    assert torch.equal(model[0].dense_mask(), masks["0"])
    assert torch.equal(model[4].dense_mask(), masks["4"])
    assert ("2", "no mask given") in report.skipped
    assert report["4"].nnz == 10 and report.nnz == int(masks["0"].sum()) + 10
    for bad, match in (({"0": torch.ones(8, 5, dtype=torch.bool)}, r"mask\['0'\].*shape"),
                       ({"0": torch.ones(8, 6)}, r"mask\['0'\].*dtype"),
                       ({"9": torch.ones(8, 6, dtype=torch.bool)}, "not sparsified"),
                       ({}, "non-empty")):
        with pytest.raises(ValueError, match=match):
            sparsify(_mlp(), method="static", mask=bad)
    with pytest.raises(ValueError, match="mask"):
        sparsify(_mlp(), method="pilot", mask="magnitude")
    with pytest.raises(ValueError, match="mask must be one of"):
        sparsify(_mlp(), method="static", mask="weights")


def test_make_method_mask_options_and_file(tmp_path):
    model = _mlp()
    w = model[2].weight.detach().clone()
    method = make_method("static", density=0.5, distribution="uniform", mask="magnitude")
    method.prepare(model)
    assert int(model[2].dense_mask().sum()) == 20
    assert bool((model[2].dense_mask() == (w.abs() >= w.abs().flatten().sort().values[20])).all())
    path = tmp_path / "masks.pt"
    mask = torch.rand(5, 8) < 0.3
    torch.save({"2": mask}, path)
    model = _mlp()
    make_method("signin", mask=str(path)).prepare(model)
    assert torch.equal(model[2].dense_mask(), mask)
    with pytest.raises(ValueError, match="mask must be one of"):
        make_method("signin", mask=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="mask_scope"):
        make_method("signin", mask="magnitude", mask_scope="model")


def test_magnitude_half_of_a_pretrained_bert_equals_hand_pruned_weights():
    transformers = pytest.importorskip("transformers", reason="needs transformers (the hf extra)")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    linears = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    ids = torch.randint(0, 50, (2, 8))
    report = sparsify(model, method="static", mask="magnitude", density=0.5, distribution="uniform")
    assert {r.name for r in report} == set(linears)
    for name, w in linears.items():
        flat = w.abs().flatten()
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.argsort(descending=True, stable=True)[: round(0.5 * flat.numel())]] = True
        torch.testing.assert_close(model.get_submodule(name).theta(), w * keep.reshape(w.shape), rtol=0, atol=0)
    torch.manual_seed(0)
    hand = transformers.BertModel(config).eval()
    with torch.no_grad():
        for name, w in linears.items():
            t = w.abs().flatten().sort(descending=True).values[round(0.5 * w.numel()) - 1]
            hand.get_submodule(name).weight.copy_(torch.where(w.abs() >= t, w, torch.zeros_like(w)))
    torch.testing.assert_close(model(ids).last_hidden_state, hand(ids).last_hidden_state)


def test_block_layouts_keep_the_blocks_of_largest_scores():
    model = _mlp()
    w = model[2].weight.detach().clone()
    sparsify(model, method="static", mask="magnitude", density=0.5, distribution="uniform", layout="bsr",
             block_shape=(2, 2))
    # the 5 x 8 weight in 2 x 2 blocks: a 3 x 4 grid (the last row of blocks half outside); keep 6 blocks
    norms = torch.zeros(3, 4)
    for i in range(3):
        for j in range(4):
            norms[i, j] = w[2 * i:2 * i + 2, 2 * j:2 * j + 2].abs().sum()
    keep = torch.zeros(12, dtype=torch.bool)
    keep[norms.flatten().argsort(descending=True, stable=True)[:6]] = True
    expect = keep.reshape(3, 4).repeat_interleave(2, 0).repeat_interleave(2, 1)[:5, :8]
    assert torch.equal(model[2].dense_mask(), expect)


def test_drop_fraction_schedule_by_hand():
    from sparse_engine.methods.dynamic import _drop_fraction

    assert _drop_fraction(0, 0.3, "cosine", 100) == pytest.approx(0.3)
    assert _drop_fraction(50, 0.3, "cosine", 100) == pytest.approx(0.15)
    assert _drop_fraction(100, 0.3, "cosine", 100) == pytest.approx(0.0)
    assert _drop_fraction(70, 0.3, "constant", 100) == 0.3
