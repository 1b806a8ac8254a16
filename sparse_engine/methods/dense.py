"""dense: the unpruned baseline; the model stays as it is (ordinary nn.Linear / nn.Conv2d)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Method, MethodConfig


@dataclass
class DenseConfig(MethodConfig):
    density: float = 1.0


class Dense(Method):
    """No sparsity: the reference every sparse method is compared with."""

    name = "dense"
    config_class = DenseConfig
    sparsify_as = None
