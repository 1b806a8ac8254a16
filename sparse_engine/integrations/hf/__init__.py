"""Hugging Face transformers, end to end.

* :func:`from_pretrained`: a directory written by ``save_pretrained`` (or a Trainer checkpoint) of a
  sparsified or extracted model -> the same model, exactly (masks, layouts, m, w, β; compact inference
  layers). ``save_pretrained`` itself needs nothing from us: the sparse layers' state is tensors only.
* :class:`SparseTrainerCallback`: runs a method's life (resets, α controller, switch-off, prune) inside
  ``transformers.Trainer``, logs its figures, and checkpoints the method with the optimizer.

Names are imported on first use (the callback module imports transformers).
"""
import importlib

_EXPORTS = {
    "from_pretrained": "sparse_engine.integrations.hf.pretrained",
    "read_state": "sparse_engine.integrations.hf.pretrained",
    "SparseTrainerCallback": "sparse_engine.integrations.hf.trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
