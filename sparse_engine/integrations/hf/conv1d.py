"""transformers' ``Conv1D`` (GPT-2, GPT): a linear layer whose weight is stored (in, out).

:func:`linears_from_conv1d` replaces each one by the equivalent ``nn.Linear`` (weight transposed, same
bias, same device, dtype and mode), so that ``sparsify`` replaces it like any other linear layer. It is
called by ``sparsify`` itself, only when transformers is already imported (nothing imports it here).
"""
from __future__ import annotations

import sys

import torch
from torch import nn


def _conv1d_class():
    utils = sys.modules.get("transformers.pytorch_utils")
    return None if utils is None else getattr(utils, "Conv1D", None)


@torch.no_grad()
def linear_from_conv1d(module: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` computing what a transformers ``Conv1D`` computes (y = x W + b, W of shape (in, out))."""
    weight = module.weight
    n_in, n_out = weight.shape
    linear = nn.Linear(n_in, n_out, bias=module.bias is not None, device=weight.device, dtype=weight.dtype)
    linear.weight.copy_(weight.t())
    if module.bias is not None:
        linear.bias.copy_(module.bias)
    linear.weight.requires_grad_(weight.requires_grad)
    linear.train(module.training)
    return linear


def linears_from_conv1d(model: nn.Module) -> list[str]:
    """Replace (in place) every transformers ``Conv1D`` inside ``model`` by its ``nn.Linear``; their names."""
    conv1d = _conv1d_class()
    if conv1d is None:
        return []
    names = [name for name, m in model.named_modules() if isinstance(m, conv1d) and name]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, linear_from_conv1d(getattr(parent, child)))
    return names
