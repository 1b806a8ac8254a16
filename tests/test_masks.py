"""Tests of sparse_engine.masks: exact counts, ties, determinism, ER/ERK densities worked by hand."""

import math

import pytest
import torch

from sparse_engine import masks as M
from sparse_engine.layout import BSRIndex, NMIndex


def B(rows):
    return torch.tensor(rows, dtype=torch.bool)


# ------------------------------------------------------------------------------------ density checks


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.5", True, None])
def test_bad_density_names_density(bad):
    for call in (
        lambda: M.random_mask((3, 4), bad),
        lambda: M.random_masks({"a": (3, 4)}, bad),
        lambda: M.layer_densities({"a": (3, 4)}, bad, "erk"),
        lambda: M.magnitude_masks({"a": torch.randn(3, 4)}, bad),
        lambda: M.block_mask((4, 4), (2, 2), bad),
        lambda: M.magnitude_block_mask(torch.randn(4, 4), (2, 2), bad),
    ):
        with pytest.raises(ValueError, match="density"):
            call()


def test_bad_names_list_valid_ones():
    with pytest.raises(ValueError, match=r"distribution.*uniform.*er.*erk"):
        M.layer_densities({"a": (3, 4)}, 0.5, "kaiming")
    with pytest.raises(ValueError, match=r"scope.*layer.*global"):
        M.magnitude_masks({"a": torch.randn(3)}, 0.5, scope="model")


# ------------------------------------------------------------------------------------------------ random_mask


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 4), (7, 9), (4, 3, 3, 3)])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_random_mask_exact_count(shape, density):
    m = M.random_mask(shape, density, seed=1)
    assert m.dtype == torch.bool and m.shape == shape
    assert int(m.sum()) == round(density * math.prod(shape))


def test_random_mask_counts_by_hand():
    assert int(M.random_mask((3, 4), 0.25).sum()) == 3
    assert int(M.random_mask((10,), 0.25).sum()) == 2  # round(2.5) = 2 (half to even)
    assert int(M.random_mask((10,), 0.35).sum()) == 4  # round(3.5) = 4
    assert M.num_active(0.25, 10) == 2
    assert not M.random_mask((5, 5), 0.0).any()
    assert M.random_mask((5, 5), 1.0).all()


def test_random_mask_deterministic_and_seed_dependent():
    a = M.random_mask((64, 64), 0.3, seed=5)
    b = M.random_mask((64, 64), 0.3, seed=5)
    c = M.random_mask((64, 64), 0.3, seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the global RNG does not matter: drawn from its own generator
    torch.manual_seed(123)
    assert torch.equal(M.random_mask((64, 64), 0.3, seed=5), a)
    assert M.random_mask((64, 64), 0.3, seed=5, device="cpu").device.type == "cpu"


# ------------------------------------------------------------------------------------------------ ER / ERK


def test_er_two_tiny_layers_by_hand():
    # a: (out 4, in 2) -> scale (2+4)/(2*4) = 0.75, 8 params; b: (2, 2) -> scale 1, 4 params.
    # density 0.5 of 12 params = 6 = eps * (0.75*8 + 1*4) -> eps = 0.6 -> 0.45 and 0.6.
    d = M.layer_densities({"a": (4, 2), "b": (2, 2)}, 0.5, "er")
    assert d["a"] == pytest.approx(0.45)
    assert d["b"] == pytest.approx(0.6)
    # counts: ideal 3.6 and 2.4 -> floors 3, 2, remainder 1 to the larger fraction (a)
    assert M.layer_counts({"a": (4, 2), "b": (2, 2)}, 0.5, "er") == {"a": 4, "b": 2}
    masks = M.random_masks({"a": (4, 2), "b": (2, 2)}, 0.5, "er", seed=0)
    assert int(masks["a"].sum()) == 4 and int(masks["b"].sum()) == 2


def test_erk_conv_by_hand_and_er_ignores_kernel():
    # conv (4, 2, 3, 3): ERK scale (4+2+3+3)/72 = 1/6, 72 params; lin (2, 4): 6/8 = 0.75, 8 params.
    # density 0.25 of 80 = 20 = eps * (12 + 6) -> eps = 10/9 -> conv 5/27, lin 5/6.
    shapes = {"conv": (4, 2, 3, 3), "lin": (2, 4)}
    d = M.layer_densities(shapes, 0.25, "erk")
    assert d["conv"] == pytest.approx(5 / 27)
    assert d["lin"] == pytest.approx(5 / 6)
    # ER uses only (out, in): both scales are (4+2)/8 = 0.75 = (2+4)/8, so ER is uniform here.
    d_er = M.layer_densities(shapes, 0.25, "er")
    assert d_er["conv"] == pytest.approx(0.25) and d_er["lin"] == pytest.approx(0.25)
    # ideal counts 13.33 and 6.67 -> floors 13, 6; remainder 1 goes to lin (fraction .67 > .33)
    assert M.layer_counts(shapes, 0.25, "erk") == {"conv": 13, "lin": 7}


def test_capping_by_hand():
    # big (10, 10): ER scale 0.2, 100 params; tiny (1, 2): scale 1.5, 2 params. density 0.5 -> 51.
    # eps = 51/23 -> tiny would get 3.3 > 1: capped at 1; then eps = 49/20, big gets 0.49.
    shapes = {"big": (10, 10), "tiny": (1, 2)}
    d = M.layer_densities(shapes, 0.5, "er")
    assert d["tiny"] == 1.0
    assert d["big"] == pytest.approx(0.49)
    masks = M.random_masks(shapes, 0.5, "er")
    assert masks["tiny"].all()
    assert int(masks["big"].sum()) == 49


def test_capping_iterates():
    # Capping some layers frees budget, which pushes another layer over 1 on the next pass.
    # ten (1,1) layers: ERK scale 2, 1 param each; b (2,2): scale 1, 4 params; c (10,10): 0.2, 100.
    # density 39/114 -> budget 39. Pass 1: eps = 39/(20+4+20) = 0.886: the (1,1) layers exceed (1.77),
    # b does not (0.886). Pass 2: eps = (39-10)/(4+20) = 1.21: b exceeds. Pass 3: eps = 25/20, c = 0.25.
    shapes = {f"t{i}": (1, 1) for i in range(10)}
    shapes.update({"b": (2, 2), "c": (10, 10)})
    d = M.layer_densities(shapes, 39 / 114, "erk")
    assert all(d[f"t{i}"] == 1.0 for i in range(10))
    assert d["b"] == 1.0
    assert d["c"] == pytest.approx(0.25)
    masks = M.random_masks(shapes, 39 / 114, "erk")
    assert masks["b"].all() and int(masks["c"].sum()) == 25


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.1, 0.5, 0.9, 1.0])
def test_random_masks_total_exact(distribution, density):
    shapes = {"conv1": (16, 3, 3, 3), "conv2": (32, 16, 3, 3), "fc": (10, 288), "head": (1, 7)}
    masks = M.random_masks(shapes, density, distribution, seed=2)
    total = sum(math.prod(s) for s in shapes.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(density * total)
    for name, s in shapes.items():
        assert masks[name].shape == s and masks[name].dtype == torch.bool
    d = M.layer_densities(shapes, density, distribution)
    for name, s in shapes.items():
        # each layer's count is its ideal count rounded up or down
        assert abs(int(masks[name].sum()) - d[name] * math.prod(s)) < 1 + 1e-9
        assert 0.0 <= d[name] <= 1.0
    if density == 1.0:
        assert all(m.all() for m in masks.values())
    if density == 0.0:
        assert not any(m.any() for m in masks.values())


def test_random_masks_deterministic():
    shapes = {"a": (32, 16), "b": (16, 8, 3, 3)}
    a = M.random_masks(shapes, 0.2, "erk", seed=3)
    b = M.random_masks(shapes, 0.2, "erk", seed=3)
    c = M.random_masks(shapes, 0.2, "erk", seed=4)
    assert all(torch.equal(a[k], b[k]) for k in shapes)
    assert any(not torch.equal(a[k], c[k]) for k in shapes)


def test_bad_shapes():
    with pytest.raises(ValueError, match="shapes"):
        M.layer_densities({"bias": (5,)}, 0.5, "erk")
    with pytest.raises(ValueError, match="shapes"):
        M.layer_densities({}, 0.5, "erk")
    with pytest.raises(ValueError, match="shapes"):
        M.layer_densities({"a": (0, 3)}, 0.5, "erk")


# ------------------------------------------------------------------------------------------------ magnitude


def test_magnitude_layer_ties_by_hand():
    # |v| = 3 1 2 / 3 .5 2 ; keep 3: both 3s, then the 2 at flat index 2 beats the one at index 5
    t = torch.tensor([[3.0, -1.0, 2.0], [-3.0, 0.5, 2.0]])
    m = M.magnitude_masks({"w": t}, 0.5)["w"]
    assert torch.equal(m, B([[1, 0, 1], [1, 0, 0]]))


def test_magnitude_all_ties():
    t = torch.full((2, 5), -1.5)
    m = M.magnitude_masks({"w": t}, 0.3)["w"]  # k = 3: the first three flat positions
    assert torch.equal(m, B([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]))


def test_magnitude_all_zero_tensor_and_rows():
    z = torch.zeros(3, 4)
    m = M.magnitude_masks({"w": z}, 0.25)["w"]
    assert torch.equal(m, B([[1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    t = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]])  # zero row loses to any nonzero
    assert torch.equal(M.magnitude_masks({"w": t}, 0.5)["w"], B([[0, 0, 0], [1, 1, 1]]))
    assert torch.equal(M.magnitude_masks({"w": t}, 4 / 6)["w"], B([[1, 0, 0], [1, 1, 1]]))


def test_magnitude_global_ties_by_hand():
    # a = 1 5 2 ; b = 5 2 0 2 ; k = round(4/7 * 7) = 4: the two 5s, then 2s: a[2] (earlier layer), b[1]
    a = torch.tensor([1.0, 5.0, 2.0])
    b = torch.tensor([[5.0, -2.0], [0.0, 2.0]])
    m = M.magnitude_masks({"a": a, "b": b}, 4 / 7, scope="global")
    assert torch.equal(m["a"], B([0, 1, 1]))
    assert torch.equal(m["b"], B([[1, 1], [0, 0]]))
    # per layer instead: a keeps round(12/7)=2 -> 5, 2 ; b keeps round(16/7)=2 -> 5 and the first 2
    m = M.magnitude_masks({"a": a, "b": b}, 4 / 7, scope="layer")
    assert torch.equal(m["a"], B([0, 1, 1]))
    assert torch.equal(m["b"], B([[1, 1], [0, 0]]))
    # order of the dict decides global ties
    m = M.magnitude_masks({"b": b, "a": a}, 4 / 7, scope="global")
    assert torch.equal(m["b"], B([[1, 1], [0, 1]]))
    assert torch.equal(m["a"], B([0, 1, 0]))


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.37, 1.0])
def test_magnitude_exact_counts_and_largest(scope, density):
    ts = {"a": torch.randn(7, 9), "b": torch.randn(16, 3, 3, 3), "c": torch.randn(1, 129)}
    ms = M.magnitude_masks(ts, density, scope)
    if scope == "layer":
        for k, t in ts.items():
            assert int(ms[k].sum()) == round(density * t.numel())
    total = sum(t.numel() for t in ts.values())
    if scope == "global":
        assert sum(int(m.sum()) for m in ms.values()) == round(density * total)
    # nothing dropped is larger than anything kept (within the scope)
    groups = [[k] for k in ts] if scope == "layer" else [list(ts)]
    for g in groups:
        kept = torch.cat([ts[k].abs()[ms[k]] for k in g])
        dropped = torch.cat([ts[k].abs()[~ms[k]] for k in g])
        if kept.numel() and dropped.numel():
            assert kept.min() >= dropped.max()


def test_magnitude_half_precision_and_errors():
    t = torch.tensor([1.0, -4.0, 2.0, 3.0], dtype=torch.bfloat16)
    assert torch.equal(M.magnitude_masks({"w": t}, 0.5)["w"], B([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="tensors"):
        M.magnitude_masks({"w": torch.tensor([1.0, float("nan")])}, 0.5)
    with pytest.raises(ValueError, match="tensors"):
        M.magnitude_masks({}, 0.5)
    inf = torch.tensor([1.0, float("inf"), -float("inf"), 0.0])
    assert torch.equal(M.magnitude_masks({"w": inf}, 0.5)["w"], B([0, 1, 1, 0]))


# ------------------------------------------------------------------------------------------------ blocks


@pytest.mark.parametrize(
    "shape,block", [((7, 9), (4, 4)), ((8, 8), (2, 4)), ((1, 1), (16, 16)), ((33, 65), (16, 16))]
)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_block_mask_exact_blocks(shape, block, density):
    m = M.block_mask(shape, block, density, seed=1)
    assert m.shape == shape and m.dtype == torch.bool
    idx = BSRIndex.from_mask(m, block)
    nb = idx.grid[0] * idx.grid[1]
    assert idx.nnzb == round(density * nb)
    assert torch.equal(idx.to_mask(), m)  # whole blocks only
    assert torch.equal(M.block_mask(shape, block, density, seed=1), m)


def test_block_mask_seed_and_conv_shape():
    a = M.block_mask((64, 64), (8, 8), 0.25, seed=0)
    assert not torch.equal(a, M.block_mask((64, 64), (8, 8), 0.25, seed=1))
    c = M.block_mask((8, 4, 3, 3), (4, 6), 0.5)  # matrix view (8, 36): grid 2 x 6
    assert c.shape == (8, 4, 3, 3)
    assert BSRIndex.from_mask(c.reshape(8, -1), (4, 6)).nnzb == 6
    with pytest.raises(ValueError, match="block_shape"):
        M.block_mask((8, 8), (0, 2), 0.5)


def test_magnitude_block_mask_by_hand():
    # 3x5 with 2x2 blocks -> grid 2x3; L1 norms:
    #  block(0,0) |1|+|2|+|0|+|1| = 4   block(0,1) 3+0+0+1 = 4   block(0,2) edge 2x1: 5+1 = 6
    #  block(1,0) edge 1x2: 1+1 = 2     block(1,1) 1+1 = 2       block(1,2) edge 1x1: 4
    t = torch.tensor(
        [
            [1.0, -2.0, 3.0, 0.0, 5.0],
            [0.0, 1.0, 0.0, -1.0, 1.0],
            [1.0, 1.0, -1.0, 1.0, 4.0],
        ]
    )
    # keep round(0.5 * 6) = 3 blocks: (0,2)=6, then ties at 4: (0,0), (0,1) beat (1,2) by block index
    m = M.magnitude_block_mask(t, (2, 2), 0.5)
    expected = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(m, expected)
    # keep 4: adds (1,2)
    m = M.magnitude_block_mask(t, (2, 2), 4 / 6)
    expected[2, 4] = True
    assert torch.equal(m, expected)
    assert not M.magnitude_block_mask(t, (2, 2), 0.0).any()
    assert M.magnitude_block_mask(t, (2, 2), 1.0).all()
    # all-zero tensor: ties everywhere, lowest block indices win
    z = M.magnitude_block_mask(torch.zeros(4, 4), (2, 2), 0.5)
    assert torch.equal(z, B([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]))


# ------------------------------------------------------------------------------------------------ N:M


def test_nm_mask_by_hand_with_ties():
    t = torch.tensor(
        [
            [0.1, -3.0, 2.0, 0.5, 1.0, 1.0, 1.0, 1.0],  # group 2 all tied: first two win
            [0.0, 0.0, 0.0, 0.0, -2.0, 2.0, 2.0, 0.0],  # all-zero group: positions 0, 1
        ]
    )
    m = M.nm_mask(t, 2, 4)
    assert torch.equal(m, B([[0, 1, 1, 0, 1, 1, 0, 0], [1, 1, 0, 0, 1, 1, 0, 0]]))
    NMIndex.from_mask(m, 2, 4).validate()  # the result is a valid 2:4 pattern
    m = M.nm_mask(t, 1, 4)
    assert torch.equal(m, B([[0, 1, 0, 0, 1, 0, 0, 0], [1, 0, 0, 0, 1, 0, 0, 0]]))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (0, 4), (4, 4)])
def test_nm_mask_counts(n, m):
    t = torch.randn(7, 3, 2 * m)
    mask = M.nm_mask(t, n, m)
    assert mask.shape == t.shape
    assert torch.all(mask.reshape(-1, m).sum(1) == n)
    groups = t.abs().reshape(-1, m)
    km = mask.reshape(-1, m)
    if 0 < n < m:
        kept_min = torch.where(km, groups, torch.inf).min(1).values
        drop_max = torch.where(~km, groups, -torch.inf).max(1).values
        assert torch.all(kept_min >= drop_max)


def test_nm_mask_errors():
    with pytest.raises(ValueError, match="m"):
        M.nm_mask(torch.randn(2, 6), 2, 4)
    with pytest.raises(ValueError, match="n"):
        M.nm_mask(torch.randn(2, 8), 5, 4)
    with pytest.raises(ValueError, match="tensor"):
        M.nm_mask(torch.tensor([1.0, float("nan"), 0.0, 1.0]), 2, 4)


@pytest.mark.gpu
def test_cuda_masks_match_cpu():
    # Same seed -> same mask on every device; magnitude ties resolved the same way on CUDA.
    on_gpu = M.random_mask((64, 33), 0.3, seed=4, device="cuda")
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), M.random_mask((64, 33), 0.3, seed=4))
    t = torch.randn(129, 64)
    t[0, :10] = 1.0  # ties
    ts = {"a": t, "b": torch.randn(16, 3, 3, 3)}
    for scope in ("layer", "global"):
        cpu = M.magnitude_masks(ts, 0.3, scope)
        gpu = M.magnitude_masks({k: v.cuda() for k, v in ts.items()}, 0.3, scope)
        for k in ts:
            assert gpu[k].is_cuda and torch.equal(gpu[k].cpu(), cpu[k]), (scope, k)
    assert torch.equal(M.nm_mask(t.cuda()).cpu(), M.nm_mask(t))
    gpu_blocks = M.magnitude_block_mask(t.cuda(), (16, 16), 0.4)
    assert torch.equal(gpu_blocks.cpu(), M.magnitude_block_mask(t, (16, 16), 0.4))
