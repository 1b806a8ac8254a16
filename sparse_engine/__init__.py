"""sparse_engine: train sparse neural networks fast and ship them small.

The library's wings are subpackages: ``ops`` (the ops and their backends), ``nn`` (sparse layers,
``sparsify``), ``optim`` (the fused optimizers), ``methods`` (the training recipes) and ``export``
(inference layers and their file format); ``app`` is the command line built on them.

Everything is reached lazily (PEP 562): ``import sparse_engine`` imports torch and nothing else; the
first use of ``sparse_engine.ops`` (or of a name below) imports its module, and importing the ops
registers them with torch.library.
"""
# torch first: the optional compiled extension links against libc10 / libtorch.
import importlib

import torch  # noqa: F401

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "SparseLinear": "sparse_engine.nn",
    "SparseConv2d": "sparse_engine.nn",
    "SparseConv1d": "sparse_engine.nn",
    "sparsify": "sparse_engine.nn",
    "SparsifyReport": "sparse_engine.nn",
    "Parameterization": "sparse_engine.param",
    "SGD": "sparse_engine.optim",
    "AdamW": "sparse_engine.optim",
    "extract": "sparse_engine.export",
    "save": "sparse_engine.export",
    "load": "sparse_engine.export",
    "layer_stats": "sparse_engine.nn.diagnostics",
    "from_pretrained": "sparse_engine.integrations.hf.pretrained",
}

#: the library's subpackages, imported on first attribute access
_SUBPACKAGES = ("ops", "nn", "optim", "methods", "export", "distributed")

__all__ = sorted(_EXPORTS) + sorted(_SUBPACKAGES) + ["__version__"]


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")  # the import binds it on this package
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sparse_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
