"""The k largest scores of tensors whose rows are split over the ranks (FSDP2), without gathering them.

One process keeps exactly the k largest |θ| of all layers together, ties going to the earlier layer and
then the lower flat index (``masks._topk_mask``). Sharded, each rank holds a block of rows of every layer,
so the global order of a coordinate is (layer, rank, local flat index). :func:`topk_masks` finds the same
coordinates: the k-th largest score by a radix selection on the scores' bit patterns (a non-negative
float orders like its bits read as an integer), 8 bits per round, each round one all-reduce of a 256-bin
histogram (4 rounds for float32, 8 for float64); then the ties at the threshold are handed out in the
global order from one all-reduce of the per-(layer, rank) tie counts. Exact: the same mask as one
process on the gathered scores, for any data, with memory of one local copy of the scores' keys.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .collectives import _device, is_sharded, sum_over_ranks, world_size

_BITS = {torch.float32: 32, torch.float64: 64}


def _keys(scores: list[Tensor], dtype: torch.dtype, active: list[Tensor | None] | None) -> list[Tensor]:
    int_type = torch.int32 if dtype == torch.float32 else torch.int64
    keys = []
    for i, s in enumerate(scores):
        s = s.detach().reshape(-1).to(dtype)
        if bool((s < 0).any()) or bool(s.isnan().any()):
            raise ValueError(f"scores[{i}] must be non-negative and not NaN (magnitudes)")
        key = (s + 0.0).view(int_type).to(torch.int64)  # + 0.0: -0.0 becomes +0.0
        if active is not None:  # inactive: key 0, below every active one (≥ 1); None: all active
            a = active[i]
            key = key + 1 if a is None else torch.where(a.reshape(-1).to(key.device), key + 1, torch.zeros_like(key))
        keys.append(key)
    return keys


def _kth_largest(keys: list[Tensor], k: int, bits: int) -> tuple[int, int]:
    """(T, need): T the k-th largest key over all ranks, need how many keys equal to T are kept."""
    candidates = keys
    prefix, need = 0, k
    for shift in range(bits - 8, -1, -8):
        hist = torch.zeros(256, dtype=torch.float64)
        digits = [(c >> shift) & 255 for c in candidates]
        for d in digits:
            hist += torch.bincount(d, minlength=256).to(torch.float64)
        hist = sum_over_ranks(hist)  # counts below 2^53 are exact in float64
        above = 0
        for digit in range(255, -1, -1):
            if above + int(hist[digit]) >= need:
                break
            above += int(hist[digit])
        need -= above
        prefix = (prefix << 8) | digit
        candidates = [c[d == digit] for c, d in zip(candidates, digits)]
    return prefix, need


def topk_masks(scores: list[Tensor], k: int, active: list[Tensor | None] | None = None) -> list[Tensor]:
    """This rank's part of the mask that keeps the ``k`` largest of all ranks' ``scores`` together.

    ``scores``: this rank's rows of each tensor (non-negative, float32 or float64; all float64 if any
    is), in the same order on every rank. The order of the ranks is the order of the rows. ``active``
    (bool like each score, or None): coordinates outside it rank below every active one (a score of −1
    in one process). A collective. Returns bool tensors shaped like ``scores``.
    """
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in scores) else torch.float32
    keys = _keys(scores, dtype, active)
    total = int(sum_over_ranks([sum(key.numel() for key in keys)])[0])
    if k <= 0 or k >= total:
        return [torch.full(s.shape, k > 0, dtype=torch.bool, device=s.device) for s in scores]
    threshold, need = _kth_largest([key.cpu() for key in keys], k, _BITS[dtype])
    # ties at the threshold: the first `need` in the order (tensor, rank, index)
    ties = torch.zeros(len(scores), world_size(), dtype=torch.float64)
    rank = torch.distributed.get_rank() if world_size() > 1 else 0
    ties[:, rank] = torch.tensor([float(int((key == threshold).sum())) for key in keys], dtype=torch.float64)
    ties = sum_over_ranks(ties).reshape(len(scores), world_size())
    before = torch.cumsum(ties.reshape(-1), 0) - ties.reshape(-1)  # ties earlier in the global order
    allowed = (need - before).clamp(min=0).reshape(len(scores), world_size())[:, rank]
    out = []
    for s, key, allow in zip(scores, keys, allowed.tolist()):
        key = key.to(s.device)
        eq = key == threshold
        keep = (key > threshold) | (eq & (torch.cumsum(eq, 0) <= int(allow)))
        out.append(keep.reshape(s.shape))
    return out


def whole_from_rows(rows: Tensor, like: Tensor) -> Tensor:
    """The whole bool tensor whose rows this rank holds as ``rows`` (the rows of ``like``'s local shard,
    as :func:`collectives.local_rows` cuts them): the inverse of that cut, on every rank (a collective)."""
    if not is_sharded(like):
        return rows
    n = like.shape[0]
    sizes = [len(c) for c in torch.chunk(torch.empty(n, device="meta"), like.device_mesh.size())]
    rank = like.device_mesh.get_local_rank()
    start = sum(sizes[:rank])
    whole = torch.zeros((n, *rows.shape[1:]), dtype=torch.uint8)
    whole[start:start + rows.shape[0]] = rows.to(device="cpu", dtype=torch.uint8)
    whole = whole.to(_device())
    torch.distributed.all_reduce(whole, op=torch.distributed.ReduceOp.MAX)  # the ranks' rows are disjoint
    return whole.to(device=rows.device, dtype=torch.bool)
