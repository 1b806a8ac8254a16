"""Mask makers: random (uniform / ER / ERK), magnitude (per layer or global), block and N:M, and the
data-driven scores of pruning at initialisation (SNIP, SynFlow) with the masks they give.

All makers are deterministic. Random masks are drawn on the CPU with a seeded ``torch.Generator`` and
then moved, so the same seed gives the same mask on every device. Magnitude masks break ties by
position (lower flat index first; for a global threshold, the earlier layer in dict order first) and
find the threshold with ``torch.kthvalue`` rather than a full sort.

The number of kept entries is always ``round(density * numel)`` with Python's ``round`` (half to even);
:func:`num_active` is that rule, for callers that need to predict counts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .layout import block_grid, expand_block_mask, matrix_shape, to_blocks

__all__ = [
    "DISTRIBUTIONS",
    "SCOPES",
    "check_density",
    "num_active",
    "random_mask",
    "layer_densities",
    "layer_counts",
    "random_masks",
    "magnitude_masks",
    "block_mask",
    "magnitude_block_mask",
    "nm_mask",
    "SOURCES",
    "check_mask_dict",
    "score_masks",
    "snip_scores",
    "synflow_scores",
]

DISTRIBUTIONS = ("uniform", "er", "erk")
SCOPES = ("layer", "global")
#: where the masks of ``sparsify(mask=...)`` come from (a dict name -> bool tensor is also accepted)
SOURCES = ("random", "magnitude", "snip", "synflow")


# --------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------


def check_density(density, *, zero_ok: bool = False) -> float:
    """``density`` as a float in (0, 1] (a network with no weight left is an input error), or in [0, 1]
    with ``zero_ok`` (the mask makers: 0 gives an all-False mask)."""
    interval = "[0, 1]" if zero_ok else "(0, 1]"
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise ValueError(f"density must be a number in {interval}, got {density!r}")
    density = float(density)
    if not ((0.0 <= density if zero_ok else 0.0 < density) and density <= 1.0):  # also rejects NaN
        raise ValueError(f"density must be in {interval}, got {density}")
    return density


def num_active(density: float, numel: int) -> int:
    """Number of active entries for ``density`` over ``numel`` entries: ``round(density * numel)``."""
    return min(int(numel), max(0, round(check_density(density, zero_ok=True) * int(numel))))


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return seed


def _check_shape(name: str, shape, min_ndim: int = 1) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(f"{name} must be a tuple of ints, got {shape!r}") from None
    if len(dims) < min_ndim or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in dims):
        raise ValueError(f"{name} must be a tuple of at least {min_ndim} non-negative ints, got {shape!r}")
    return dims


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(_check_seed(seed))
    return g


def _random_flat(numel: int, k: int, gen: torch.Generator) -> Tensor:
    """bool (numel,) with exactly k True, drawn on the CPU."""
    out = torch.zeros(numel, dtype=torch.bool)
    out[torch.randperm(numel, generator=gen)[:k]] = True
    return out


def _scores(t: Tensor, name: str) -> Tensor:
    """|t| in a dtype where kthvalue/sort are exact and supported (fp16/bf16 upcast losslessly)."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_complex():
        raise ValueError(f"{name} must be real, got {t.dtype}")
    s = t.detach()
    if not s.is_floating_point():
        s = s.to(torch.float64)  # before abs: abs(int_min) overflows
    elif s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()
    s = s.abs()
    if bool(torch.isnan(s).any()):
        raise ValueError(f"{name} contains NaN; magnitudes cannot be ranked")
    return s


def _topk_mask(score: Tensor, k: int) -> Tensor:
    """bool like ``score`` (1-D) with exactly the k largest True; ties go to lower indices.

    kthvalue finds the threshold t; everything above t is kept, and among the entries equal to t the
    first ``k - #above`` in index order. No full sort and no reliance on topk's tie order.
    """
    n = score.numel()
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(score, dtype=torch.bool)
    t = torch.kthvalue(score, n - k + 1).values
    above = score > t
    need = k - int(torch.count_nonzero(above))  # count_nonzero: a bool sum is several times slower on CPU
    eq = score == t
    if int(torch.count_nonzero(eq)) == need:  # no tie to break at the threshold (the usual case)
        return above | eq
    return above | (eq & (torch.cumsum(eq, dim=0) <= need))


# --------------------------------------------------------------------------------------------------
# random masks
# --------------------------------------------------------------------------------------------------


def random_mask(shape, density: float, seed: int = 0, device=None) -> Tensor:
    """bool ``shape`` with exactly ``round(density * numel)`` True, uniformly at random."""
    dims = _check_shape("shape", shape)
    numel = math.prod(dims)
    k = num_active(density, numel)
    return _random_flat(numel, k, _generator(seed)).reshape(dims).to(device)


def _check_shapes(shapes) -> dict[str, tuple[int, ...]]:
    if not isinstance(shapes, dict) or not shapes:
        raise ValueError(f"shapes must be a non-empty dict name -> shape, got {type(shapes).__name__}")
    out = {}
    for name, shape in shapes.items():
        dims = _check_shape(f"shapes[{name!r}]", shape, min_ndim=2)
        if any(d == 0 for d in dims):
            raise ValueError(f"shapes[{name!r}] must have no zero dims, got {dims}")
        out[name] = dims
    return out


def _raw_scale(dims: tuple[int, ...], distribution: str) -> float:
    # Torch weights are (out, in, *kernel).
    if distribution == "er":
        # Erdos-Renyi (Mocanu et al., SET): (n_in + n_out) / (n_in * n_out); kernel dims do not count.
        n_out, n_in = dims[0], dims[1]
        return (n_in + n_out) / (n_in * n_out)
    # ERK (Evci et al., RigL): sum of all dims over their product, kernel dims included.
    return sum(dims) / math.prod(dims)


def layer_densities(shapes: dict, density: float, distribution: str = "erk") -> dict[str, float]:
    """Per-layer densities whose parameter-weighted mean is ``density``.

    uniform: every layer gets ``density``. er / erk: layer l gets eps * s_l with s_l its raw scale
    (see ``_raw_scale``) and eps chosen so that sum_l d_l * n_l = density * sum_l n_l. A layer whose
    d_l would exceed 1 is made dense and eps recomputed over the rest; this repeats until no layer
    exceeds 1. All layers that exceed at a given eps are capped together: capping only frees budget,
    so eps can only grow and they would exceed again.
    """
    density = check_density(density, zero_ok=True)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    dims = _check_shapes(shapes)
    if distribution == "uniform":
        return {name: density for name in dims}
    numel = {name: math.prod(d) for name, d in dims.items()}
    raw = {name: _raw_scale(d, distribution) for name, d in dims.items()}
    budget_total = density * sum(numel.values())
    dense: set[str] = set()
    eps = 0.0
    while True:
        rest = [name for name in dims if name not in dense]
        if not rest:
            break
        budget = budget_total - sum(numel[name] for name in dense)
        eps = max(0.0, budget) / sum(raw[name] * numel[name] for name in rest)
        over = [name for name in rest if eps * raw[name] > 1.0]
        if not over:
            break
        dense.update(over)
    return {name: 1.0 if name in dense else min(1.0, eps * raw[name]) for name in dims}


def layer_counts(shapes: dict, density: float, distribution: str = "erk") -> dict[str, int]:
    """Integer active counts per layer summing to exactly ``round(density * total_params)``.

    Floors of the ideal counts d_l * n_l, then the remainder one by one to the layers with the largest
    fractional parts (ties: earlier in dict order), never beyond a layer's size.
    """
    dens = layer_densities(shapes, density, distribution)
    dims = _check_shapes(shapes)
    numel = {name: math.prod(d) for name, d in dims.items()}
    target = num_active(density, sum(numel.values()))
    ideal = {name: dens[name] * numel[name] for name in dims}
    counts = {name: min(numel[name], math.floor(ideal[name])) for name in dims}
    listed = list(dims)
    order = sorted(range(len(listed)), key=lambda i: (-(ideal[listed[i]] - math.floor(ideal[listed[i]])), i))
    names = [listed[i] for i in order]
    remainder = target - sum(counts.values())
    # Float error can make the floors overshoot or undershoot by a few; cycle until exact.
    while remainder > 0:
        for name in names:
            if remainder and counts[name] < numel[name]:
                counts[name] += 1
                remainder -= 1
    while remainder < 0:
        for name in reversed(names):
            if remainder and counts[name] > 0:
                counts[name] -= 1
                remainder += 1
    return counts


def random_masks(
    shapes: dict, density: float, distribution: str = "erk", seed: int = 0, device=None
) -> dict[str, Tensor]:
    """Random masks per layer with densities from :func:`layer_densities` and counts from
    :func:`layer_counts` (their sum is exactly ``round(density * total_params)``).

    One CPU generator seeded with ``seed`` draws the layers in dict order.
    """
    counts = layer_counts(shapes, density, distribution)
    gen = _generator(seed)
    out = {}
    for name, shape in _check_shapes(shapes).items():
        out[name] = _random_flat(math.prod(shape), counts[name], gen).reshape(shape).to(device)
    return out


# --------------------------------------------------------------------------------------------------
# magnitude masks
# --------------------------------------------------------------------------------------------------


def magnitude_masks(tensors: dict, density: float, scope: str = "layer") -> dict[str, Tensor]:
    """Keep exactly the k largest |value|.

    scope="layer": k = round(density * numel) in each tensor. scope="global": k = round(density * total)
    over all tensors together. Ties: lower flat index first; globally, earlier layer (dict order) first.
    Masks are returned on each tensor's device.
    """
    density = check_density(density, zero_ok=True)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not isinstance(tensors, dict) or not tensors:
        raise ValueError(f"tensors must be a non-empty dict name -> Tensor, got {type(tensors).__name__}")
    scores = {name: _scores(t, f"tensors[{name!r}]") for name, t in tensors.items()}
    if scope == "layer":
        return {
            name: _topk_mask(s.flatten(), num_active(density, s.numel())).reshape(tensors[name].shape)
            for name, s in scores.items()
        }
    first = next(iter(scores.values()))
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in scores.values()) else torch.float32
    flat = torch.cat([s.flatten().to(device=first.device, dtype=dtype) for s in scores.values()])
    keep = _topk_mask(flat, num_active(density, flat.numel()))
    out, start = {}, 0
    for name, t in tensors.items():
        out[name] = keep[start : start + t.numel()].reshape(t.shape).to(t.device)
        start += t.numel()
    return out


# --------------------------------------------------------------------------------------------------
# block masks
# --------------------------------------------------------------------------------------------------


def _block_args(shape, block_shape) -> tuple[tuple[int, int], tuple[int, int]]:
    dims = _check_shape("shape", shape, min_ndim=2)
    mat = matrix_shape(dims)
    grid = block_grid(mat, block_shape)  # validates block_shape
    return mat, grid


def block_mask(shape, block_shape, density: float, seed: int = 0, device=None) -> Tensor:
    """Element mask of ``shape`` made of exactly ``round(density * n_blocks)`` random blocks.

    Blocks tile the matrix view (out, prod(rest)) of ``shape``; edge blocks are partial. Get the block
    indices with ``layout.BSRIndex.from_mask(mask.reshape(shape[0], -1), block_shape)``.
    """
    mat, grid = _block_args(shape, block_shape)
    nb = grid[0] * grid[1]
    blocks = _random_flat(nb, num_active(density, nb), _generator(seed)).reshape(grid)
    return expand_block_mask(blocks, tuple(block_shape), mat).reshape(tuple(shape)).to(device)


def magnitude_block_mask(tensor: Tensor, block_shape, density: float) -> Tensor:
    """Element mask keeping the ``round(density * n_blocks)`` blocks of largest L1 norm.

    Edge blocks are partial (their norm is over the elements they have). Ties: lower block index in
    row-major block order first.
    """
    density = check_density(density, zero_ok=True)
    s = _scores(tensor, "tensor")
    mat, grid = _block_args(tuple(tensor.shape), block_shape)
    # Sum in float64 so that equal blocks give equal norms and near-ties are not decided by rounding.
    norms = to_blocks(s.reshape(mat).to(torch.float64), block_shape).sum(dim=(2, 3))
    nb = grid[0] * grid[1]
    keep = _topk_mask(norms.flatten(), num_active(density, nb)).reshape(grid)
    return expand_block_mask(keep, tuple(block_shape), mat).reshape(tensor.shape)


# --------------------------------------------------------------------------------------------------
# N:M
# --------------------------------------------------------------------------------------------------


def nm_mask(tensor: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Keep the n largest |value| in each group of m consecutive entries along the last dim.

    Ties: lower index first (stable sort over the m entries of a group).
    """
    if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
        raise ValueError(f"m must be a positive int, got {m!r}")
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= m:
        raise ValueError(f"n must be an int in [0, m] = [0, {m}], got {n!r}")
    s = _scores(tensor, "tensor")
    if s.ndim == 0 or s.shape[-1] % m:
        last = s.shape[-1] if s.ndim else None
        raise ValueError(
            f"m = {m} must divide the last dim of tensor, got shape {tuple(tensor.shape)} (last dim {last})"
        )
    groups = s.reshape(-1, m)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=groups.device)
    keep.scatter_(1, order, True)
    return keep.reshape(tensor.shape)


# --------------------------------------------------------------------------------------------------
# scores from data (SNIP, SynFlow), masks from scores, user masks
# --------------------------------------------------------------------------------------------------


def score_masks(scores: dict, density: float, scope: str = "layer", distribution: str = "erk") -> dict[str, Tensor]:
    """Keep the highest scores: one threshold over all layers (``scope="global"``) or, per layer, the
    counts of :func:`layer_counts` for ``distribution`` (their sum is exactly ``round(density * total)``).
    Ties as in :func:`magnitude_masks`. Scores are ranked by absolute value."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "global":
        return magnitude_masks(scores, density, scope="global")
    if not isinstance(scores, dict) or not scores:
        raise ValueError(f"scores must be a non-empty dict name -> Tensor, got {type(scores).__name__}")
    counts = layer_counts({name: tuple(t.shape) for name, t in scores.items()}, density, distribution)
    return {
        name: _topk_mask(_scores(t, f"scores[{name!r}]").flatten(), counts[name]).reshape(t.shape)
        for name, t in scores.items()
    }


def _copy_for_scoring(model, names, dtype=None):
    """A deep copy of ``model`` (scoring must not touch the model's weights or running statistics) and
    the weights named ``names`` in it."""
    import copy

    twin = copy.deepcopy(model)
    if dtype is not None:
        twin.to(dtype)
    for p in twin.parameters():
        p.requires_grad_(False)
    weights = {name: twin.get_submodule(name).weight for name in names}
    for w in weights.values():
        w.requires_grad_(True)
    return twin, weights


def _check_batch(batch, what: str):
    if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not all(isinstance(t, Tensor) for t in batch):
        raise ValueError(f"batch must be a pair (inputs, targets) of tensors for {what}, got {type(batch).__name__}")
    return batch


def snip_scores(model, names, batch, loss_fn=None) -> dict[str, Tensor]:
    """SNIP (Lee et al. 2019): the connection sensitivity |∂L/∂W ⊙ W| of the weights of the layers named
    ``names`` on one batch ``(x, y)``; ``loss_fn(output, y)`` defaults to cross-entropy. The model runs in
    its current mode on a copy, so its weights and running statistics are left as they were."""
    x, y = _check_batch(batch, "snip")
    loss_fn = torch.nn.functional.cross_entropy if loss_fn is None else loss_fn
    twin, weights = _copy_for_scoring(model, names)
    loss = loss_fn(twin(x.to(next(iter(weights.values())).device)), y.to(next(iter(weights.values())).device))
    grads = torch.autograd.grad(loss, list(weights.values()))
    return {name: (g * w).detach().abs() for (name, w), g in zip(weights.items(), grads)}


def synflow_scores(model, names, input_shape, density: float = 1.0, iterations: int = 100) -> dict[str, Tensor]:
    """SynFlow (Tanaka et al. 2020): with every parameter replaced by its absolute value (float64, eval
    mode), R = sum(model(ones(1, *input_shape))) and the score of a weight is |∂R/∂W ⊙ W|. With
    ``density`` < 1 the scores are recomputed ``iterations`` times while a global mask tightens
    exponentially (density^(k/iterations)) to ``density``; pruned weights score 0. Needs no data."""
    density = check_density(density)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    dims = _check_shape("input_shape", input_shape)
    twin, weights = _copy_for_scoring(model, names, torch.float64)
    twin.eval()
    with torch.no_grad():
        for p in twin.parameters():
            p.abs_()
        for b in twin.buffers():
            if b.is_floating_point():
                b.abs_()
    originals = {name: w.detach().clone() for name, w in weights.items()}
    x = torch.ones((1, *dims), dtype=torch.float64, device=next(iter(weights.values())).device)
    rounds = iterations if density < 1.0 else 1
    keep = None
    for k in range(1, rounds + 1):
        if keep is not None:
            with torch.no_grad():
                for name, w in weights.items():
                    w.copy_(originals[name] * keep[name])
        grads = torch.autograd.grad(twin(x).sum(), list(weights.values()))
        scores = {name: (g * w).detach().abs() for (name, w), g in zip(weights.items(), grads)}
        if density < 1.0:
            keep = magnitude_masks(scores, density ** (k / rounds), scope="global")
    if keep is not None:
        scores = {name: torch.where(keep[name], s, torch.zeros_like(s)) for name, s in scores.items()}
    return scores


def check_mask_dict(masks, shapes: dict) -> dict[str, Tensor]:
    """A user's masks ``layer name -> bool tensor``, checked against ``shapes`` (the layers that can take
    one): every name known, the weight's shape, dtype bool. Returns them (layers without one are absent)."""
    if not isinstance(masks, dict) or not masks:
        raise ValueError(f"mask must be a non-empty dict layer name -> bool tensor, got {type(masks).__name__}")
    unknown = sorted(set(masks) - set(shapes))
    if unknown:
        raise ValueError(f"mask names layers that are not sparsified here: {unknown[:5]}; known: {sorted(shapes)[:10]}")
    for name, m in masks.items():
        if not isinstance(m, Tensor):
            raise ValueError(f"mask[{name!r}] must be a torch.Tensor, got {type(m).__name__}")
        if m.dtype != torch.bool:
            raise ValueError(f"mask[{name!r}] must have dtype torch.bool, got {m.dtype} (convert with m != 0)")
        if tuple(m.shape) != tuple(shapes[name]):
            raise ValueError(f"mask[{name!r}] must have the weight's shape {tuple(shapes[name])}, got {tuple(m.shape)}")
    return dict(masks)
