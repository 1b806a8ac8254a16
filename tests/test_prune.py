"""prune_threshold: the k-th largest score (magnitude pruning without a full sort), per layer or global.

A threshold is one of the scores, so every backend must match the reference exactly.
"""
from __future__ import annotations

import pytest
import torch
from _backends import DEVICE_DTYPES, over_backends, randn, require, run_on

from sparse_engine import ops
from sparse_engine.ops.reference import prune_threshold_ref

IMPL = ("prune_threshold",)


def _t(v, dtype=torch.float32):
    return torch.tensor(v, dtype=dtype)


# ------------------------------------------------------------------------------- hand-computed cases


@pytest.mark.parametrize("k,expected", [(1, 9.0), (3, 5.0), (4, 4.0), (8, 1.0), (0, float("inf"))])
def test_hand_threshold(k, expected):
    scores = _t([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0])
    thr = prune_threshold_ref(scores, k)
    assert thr.dim() == 0 and thr.item() == expected
    assert int((scores >= thr).sum()) == k  # no ties at these k


def test_hand_ties_keep_more():
    scores = _t([[1.0, 2.0, 2.0], [2.0, 3.0, 0.5]])
    thr = prune_threshold_ref(scores, 2)
    assert thr.item() == 2.0 and int((scores >= thr).sum()) == 4  # ties: more than k, never fewer


def test_global_threshold_over_layers():
    layers = [_t([[0.1, 0.9], [0.5, 0.2]]), _t([0.7, 0.3, 0.8])]
    thr = ops.prune_threshold(layers, 3)  # largest three overall: 0.9, 0.8, 0.7
    assert thr.item() == pytest.approx(0.7)
    assert sum(int((t >= thr).sum()) for t in layers) == 3


def test_k_out_of_range_in_reference():
    with pytest.raises(ValueError, match=r"k must be in \[0, 3\]"):
        prune_threshold_ref(_t([1.0, 2.0, 3.0]), 4)


# ------------------------------------------------------------------------------------ backend grid

SHAPES = [(1,), (7, 33), (129, 129), (5, 3, 3, 3)]


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("frac", [0.0, 0.1, 0.5, 1.0], ids=lambda f: f"k{f}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@over_backends
def test_matches_reference(backend, device, dtype, shape, frac, ties):
    require(backend, IMPL, device, dtype)
    scores = randn(*shape, device=device).abs()
    if ties:  # few distinct values, many ties at the threshold
        scores = torch.round(scores * 2) / 2
    scores = scores.to(dtype)
    n = scores.numel()
    k = max(0, min(n, round(frac * n))) if frac else 0
    with run_on(backend):
        thr = ops.prune_threshold(scores, k)
    ref = prune_threshold_ref(scores, k)
    assert thr.shape == () and thr.dtype == dtype
    assert torch.equal(thr.cpu(), ref.cpu()), f"threshold {thr.item()} != reference {ref.item()} (k={k})"
    assert int((scores >= thr).sum()) >= k


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@over_backends
def test_global_matches_reference(backend, device, dtype):
    require(backend, IMPL, device, dtype)
    layers = [randn(7, 9, device=device).abs().to(dtype), randn(33, device=device).abs().to(dtype)]
    with run_on(backend):
        thr = ops.prune_threshold(layers, 40)
    assert torch.equal(thr.cpu(), prune_threshold_ref(torch.cat([t.reshape(-1) for t in layers]), 40).cpu())


# ------------------------------------------------------------------------------------------- opcheck


@over_backends
def test_opcheck(backend):
    require(backend, IMPL, "cpu", torch.float32)
    with run_on(backend):
        torch.library.opcheck(torch.ops.sparse_engine.prune_threshold.default, (randn(7, 9).abs(), 10))


# --------------------------------------------------------------------------------- input validation


def test_bad_input_names_the_argument():
    s = randn(3, 4).abs()
    for k in (-1, 13):
        with pytest.raises(ValueError, match=r"k must be an int in \[0, 12\]"):
            ops.prune_threshold(s, k)
    with pytest.raises(ValueError, match=r"k must be an int in \[0, 12\]"):
        ops.prune_threshold(s, 2.5)
    with pytest.raises(ValueError, match="scores must be a floating-point tensor"):
        ops.prune_threshold(torch.ones(3, dtype=torch.int64), 1)
    with pytest.raises(TypeError, match="scores must be a tensor or a non-empty sequence"):
        ops.prune_threshold([], 0)
    with pytest.raises(TypeError, match="scores must be a tensor or a non-empty sequence"):
        ops.prune_threshold(3.0, 0)
    with pytest.raises(TypeError, match=r"scores\[1\] must be a torch.Tensor"):
        ops.prune_threshold([s, [1.0, 2.0]], 1)
    with pytest.raises(ValueError, match=r"scores\[1\] must be on cpu"):
        ops.prune_threshold([s, s.to("meta")], 1)


def test_non_contiguous_and_empty():
    s = randn(6, 5).abs().t()
    assert ops.prune_threshold(s, 7).item() == ops.prune_threshold(s.contiguous(), 7).item()
    assert ops.prune_threshold(torch.empty(0), 0).item() == float("inf")
