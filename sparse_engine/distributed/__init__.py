"""What ``torch.distributed`` (DDP, FSDP2) needs from the engine; torch does all the communication.

* :mod:`.collectives`: the size of the job and the reductions the methods use to decide (a statistic
  that differs per rank, like the train accuracy, is averaged; a sum over sharded tensors is summed over
  the shards), so that every rank takes the same decision in a user's plain loop.
* :mod:`.checks`: the masks are equal on every rank (one checksum all-reduce), else one clear error.
* sharded parameters (FSDP2's DTensors): the optimizer, the Sign-In reset and the statistics work on
  each rank's local shard (:func:`local`, and :func:`local_rows` for the whole masks), elementwise.
* :mod:`.select`: the k largest scores over row shards (PILoT's prune under FSDP2), exact, without a gather.
* :mod:`.checkpoint`: save / resume with ``torch.distributed.checkpoint`` (model, optimizer, method).
* :mod:`.ddp`: step-in-backward under DDP: each bucket's parameters are stepped right after the bucket's
  all-reduce (a DDP communication hook), never on a local gradient.

Outside a distributed job (``torch.distributed`` not initialised, or one process) every function here
is a no-op that costs nothing, so the library calls them unconditionally.
"""
import importlib

from .checks import MaskMismatchError, check_masks
from .collectives import all_ranks, full_state_dict, is_ddp, is_sharded, local, local_rows, mean_over_ranks, sum_over_ranks, world_size

#: names whose modules import torch's DDP / DCP machinery: loaded on first use
_LAZY = {"attach_ddp": ".ddp", "save": ".checkpoint", "load": ".checkpoint"}

__all__ = ["MaskMismatchError", "all_ranks", "attach_ddp", "check_masks", "full_state_dict", "is_ddp", "is_sharded", "load", "local",
           "local_rows", "mean_over_ranks", "save", "sum_over_ranks", "world_size"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
