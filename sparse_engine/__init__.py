"""sparse_engine: train sparse neural networks fast and ship them small.

The public API is re-exported here lazily (PEP 562): ``import sparse_engine`` imports torch and
nothing else; the first use of a name imports its module (and registers the ops with torch.library).
"""
# torch first: the optional compiled extension links against libc10 / libtorch.
import importlib

import torch  # noqa: F401

__version__ = "0.1.0"

_EXPORTS = {
    "SparseLinear": "sparse_engine.nn",
    "SparseConv2d": "sparse_engine.nn",
    "SparseConv1d": "sparse_engine.nn",
    "sparsify": "sparse_engine.nn",
    "SparsifyReport": "sparse_engine.nn",
    "Parameterization": "sparse_engine.param",
    "SGD": "sparse_engine.optim",
    "AdamW": "sparse_engine.optim",
    "extract": "sparse_engine.extract",
    "save": "sparse_engine.io",
    "load": "sparse_engine.io",
    "layer_stats": "sparse_engine.diagnostics",
    "from_pretrained": "sparse_engine.integrations.hf.pretrained",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sparse_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
