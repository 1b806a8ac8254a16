"""Sparse layers and model conversion.

``SparseLinear``, ``SparseConv2d``, ``SparseConv1d``: drop-in layers whose weight θ = M ⊙ m ⊙ w is a
:class:`~sparse_engine.param.Parameterization`; ``sparsify(model, ...)`` swaps every Linear / Conv of a
model in place; ``autolayout.tune(model, example_input)`` picks each ``layout="auto"`` layer's layout.
"""

from ..layout import LAYOUTS
from . import autolayout
from .conv import SparseConv1d, SparseConv2d
from .linear import SparseLinear, SparseModule
from .sparsify import SPARSIFY_METHODS, SparsifyReport, sparsify

__all__ = [
    "LAYOUTS",
    "SPARSIFY_METHODS",
    "SparseConv1d",
    "SparseConv2d",
    "SparseLinear",
    "SparseModule",
    "SparsifyReport",
    "autolayout",
    "sparsify",
]
