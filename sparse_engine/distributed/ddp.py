"""Step-in-backward under DistributedDataParallel: step each bucket right after its all-reduce.

The optimizer's ordinary step-in-backward hooks fire when a parameter's *local* gradient is accumulated,
before DDP has averaged it over the ranks: the replicas would drift apart. Under DDP the update is done
in a communication hook instead: the bucket is all-reduced (averaged, as DDP does by default) and then
each of its parameters is stepped with the reduced gradient, inside ``backward()``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from .collectives import is_ddp


class _Attachment:
    """Stands among the optimizer's hook handles: ``remove()`` turns the stepping off (DDP keeps its
    communication hook for good, it then only all-reduces)."""

    def __init__(self) -> None:
        self.on = True

    def remove(self) -> None:
        self.on = False


def attach_ddp(optimizer: Any, model: nn.Module) -> _Attachment:
    """Register on ``model`` (a DistributedDataParallel) the hook that steps ``optimizer`` per bucket.

    ``optimizer`` provides ``_group_index(p)`` and ``_update_attached(group_index, p, grad)``
    (a sparse_engine optimizer). Returns the handle that :meth:`SparseOptimizer.detach` removes.
    """
    if not is_ddp(model):
        raise TypeError(f"model must be a DistributedDataParallel, got {type(model).__name__}")
    if getattr(model, "_sparse_engine_attached", False):
        raise RuntimeError("model: an optimizer is already attached to this DDP model (DDP accepts one "
                           "communication hook); detach() cannot be followed by a second attach()")
    attachment = _Attachment()

    def hook(process_group, bucket):
        fut = default_hooks.allreduce_hook(process_group, bucket)
        if not attachment.on:
            return fut

        def step(fut):
            fut.value()  # re-raises a failed all-reduce
            # runs on the communication thread: grad mode is per thread
            with torch.no_grad():
                for p, grad in zip(bucket.parameters(), bucket.gradients()):
                    index = optimizer._group_index(p)
                    if index is not None:
                        optimizer._update_attached(index, p, grad)
            return bucket.buffer()

        return fut.then(step)

    model.register_comm_hook(model.process_group, hook)
    model._sparse_engine_attached = True
    return attachment
