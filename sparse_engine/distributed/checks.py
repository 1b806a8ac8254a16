"""The masks of a model are the same on every rank: one checksum all-reduce, one clear error if not.

DDP broadcasts rank 0's buffers when it wraps a model, so a dense-layout mask that differs on a rank is
silently replaced, and a compact layout (csr, bsr) with another number of active weights fails inside
DDP; FSDP2 broadcasts nothing. Checking before wrapping (and at the first optimizer step) turns all of
these into one line that names the layer.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .collectives import min_max_over_ranks, world_size

_PRIME = 1_000_003  # keeps the sum of squared indices far inside int64


class MaskMismatchError(RuntimeError):
    """The masks (or the set of sparse layers) differ between the ranks of a distributed job."""


def _signature(mask: Tensor | None, numel: int) -> list[int]:
    """numel, nnz, Σ index, Σ index² mod p of the active coordinates (nnz -1: no mask, all active)."""
    if mask is None:
        return [numel, -1, 0, 0]
    idx = mask.reshape(-1).nonzero().reshape(-1).to(device="cpu", dtype=torch.int64)
    return [numel, int(idx.numel()), int(idx.sum()), int(((idx * idx) % _PRIME).sum())]


@torch.no_grad()
def check_masks(model: nn.Module | Iterable[tuple[str, nn.Module]]) -> None:
    """Raise :class:`MaskMismatchError` unless every rank holds the same sparse layers and masks.

    ``model``: a model (wrapped or not) or its (name, Parameterization) pairs. A collective: every rank
    calls it. A no-op in a single process.
    """
    if world_size() == 1:
        return
    if isinstance(model, nn.Module):
        from ..param import Parameterization  # late: param imports the ops

        layers = [(name, pz) for name, pz in model.named_modules() if isinstance(pz, Parameterization)]
    else:
        layers = list(model)
    count = torch.tensor([len(layers)], dtype=torch.int64)
    lo, hi = min_max_over_ranks(count)
    if int(lo[0]) != int(hi[0]):
        raise MaskMismatchError(f"model: the ranks hold different numbers of sparse layers ({int(lo[0])} to "
                                f"{int(hi[0])}); build the same model on every rank")
    if not layers:
        return
    sig = torch.tensor([_signature(pz.dense_mask(), pz.shape2d[0] * pz.shape2d[1]) for _, pz in layers],
                       dtype=torch.int64)
    lo, hi = min_max_over_ranks(sig.reshape(-1))
    differ = (lo != hi).reshape(sig.shape).any(dim=1)
    if bool(differ.any()):
        i = int(differ.nonzero()[0])
        name = layers[i][0] or "(the model)"
        nnz = f"{int(lo.reshape(sig.shape)[i, 1])} to {int(hi.reshape(sig.shape)[i, 1])} active weights"
        raise MaskMismatchError(f"model: the mask of layer {name!r} differs between ranks ({nnz}); build the "
                                "masks from the same seed on every rank, or broadcast rank 0's")
