"""Save and resume a distributed run with ``torch.distributed.checkpoint`` (DCP).

One checkpoint holds the model, the optimizer (buffers, step counts, learning rates, the fused
optimizer's counters), the method's state (Sign-In's reset schedule, PILoT's α controller, ...), the
learning-rate scheduler's state if one is given, and the number of processes that wrote it. Replicated tensors (DDP) are written once, sharded ones (FSDP2) by the
rank that holds each shard; each rank loads its own part in place. Resuming continues exactly where the
run stopped: bit-identical to a run that was never interrupted, given the same data order.

Resuming on another number of processes is refused (the data would be split otherwise, and the run would
not be the one that was saved).
"""
from __future__ import annotations

import os
import warnings
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from .collectives import world_size


def _dcp(call, state: dict[str, Any], path: str) -> None:
    """``dcp.save`` / ``dcp.load``; without a process group in this process alone (DCP then warns that it
    assumes so, even when told: the warning is dropped, the assumption is right)."""
    single = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():
        if single:
            warnings.filterwarnings("ignore", message=r"torch\.distributed is .*uninitialized")
        call(state, checkpoint_id=path, no_dist=single)


def _state(model: nn.Module, optimizer, method, scheduler) -> dict[str, Any]:
    # DCP loads in place: every optimizer buffer must exist before a load (fresh zeros change nothing:
    # a step count of 0 makes the first step start its buffers anew)
    optimizer.materialize_state()
    state: dict[str, Any] = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "meta": {"world_size": world_size()}}
    if method is not None:
        state["method"] = method.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    return state


def save(path: str | os.PathLike, model: nn.Module, optimizer, method=None, scheduler=None) -> None:
    """Write the checkpoint directory ``path`` (a collective: every rank calls it). ``scheduler``: a
    ``torch.optim.lr_scheduler`` of ``optimizer``, saved with it."""
    _dcp(dcp.save, _state(model, optimizer, method, scheduler), os.fspath(path))


def load(path: str | os.PathLike, model: nn.Module, optimizer, method=None, scheduler=None) -> None:
    """Resume from ``path`` into the same model, optimizer, method and scheduler (after ``method.apply``,
    as in the run that saved it). A collective: every rank calls it."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path: no distributed checkpoint at {path!r}")
    meta = {"meta": {"world_size": -1}}
    _dcp(dcp.load, meta, path)
    saved = int(meta["meta"]["world_size"])
    if saved != world_size():
        raise ValueError(f"path: the checkpoint was written by {saved} processes, this job has {world_size()}; "
                         f"resume with {saved}")
    state = _state(model, optimizer, method, scheduler)
    _dcp(dcp.load, state, path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if method is not None:
        method.load_state_dict(state["method"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"].fill_(float(lr))  # the scheduler's constructor stepped the lr back to its start
