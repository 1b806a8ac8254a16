"""Reductions over the ranks of a ``torch.distributed`` job, as no-ops in a single process."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel


def world_size() -> int:
    """Number of processes of the default group (1 when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def is_ddp(model: object) -> bool:
    """Whether ``model`` is wrapped in DistributedDataParallel."""
    return isinstance(model, DistributedDataParallel)


def local(t: Tensor) -> Tensor:
    """The part of ``t`` this rank holds: a DTensor's local shard (FSDP2), else ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor split over ranks (FSDP2's parameters), not replicated."""
    placements = getattr(t, "placements", None)
    return placements is not None and any(p.is_shard() for p in placements)


def _device() -> torch.device:
    # gloo reduces CPU tensors, NCCL CUDA tensors
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(values: list[float] | Tensor) -> Tensor:
    """Element-wise sum over the ranks (float64, on the CPU); the values themselves in one process."""
    t = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if world_size() == 1:
        return t
    t = t.to(_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def mean_over_ranks(value: float) -> float:
    """The mean of a per-rank number over the ranks (the global value when every rank saw as many samples).

    Every rank must call it (it is a collective)."""
    n = world_size()
    if n == 1:
        return float(value)
    return float(sum_over_ranks([float(value)])[0]) / n


def min_max_over_ranks(values: Tensor) -> tuple[Tensor, Tensor]:
    """Element-wise min and max of an int64 vector over the ranks (two all-reduces)."""
    lo, hi = values.clone().to(_device()), values.clone().to(_device())
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return lo.cpu(), hi.cpu()


def local_rows(t: Tensor | None, like: Tensor) -> Tensor | None:
    """The rows of a full (replicated) tensor ``t`` that match ``like``'s local shard (FSDP2 shards
    parameters on dim 0 in ``torch.chunk`` pieces; a mask buffer stays whole on every rank)."""
    if t is None or not is_sharded(like):
        return t
    placements, mesh = like.placements, like.device_mesh
    if len(placements) != 1 or not placements[0].is_shard(0):
        raise ValueError(f"like: only a 1-D mesh sharded on dim 0 is supported (FSDP2), got {placements}")
    chunks = torch.chunk(t, mesh.size(), dim=0)
    rank = mesh.get_local_rank()
    rows = chunks[rank] if rank < len(chunks) else t[:0]
    if tuple(rows.shape) != tuple(like.to_local().shape):
        raise ValueError(f"like: its local shard {tuple(like.to_local().shape)} is not chunk {rank} of a "
                         f"{tuple(t.shape)} tensor")
    return rows


def all_ranks(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (one all-reduce; the flag itself in one process)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
