"""Hugging Face transformers, end to end (importing this imports transformers).

* :func:`from_pretrained`: a directory written by ``save_pretrained`` (or a Trainer checkpoint) of a
  sparsified or extracted model -> the same model, exactly (masks, layouts, m, w, β; compact inference
  layers). ``save_pretrained`` itself needs nothing from us: the sparse layers' state is tensors only.
* :class:`SparseTrainerCallback`: runs a method's life (resets, α controller, switch-off, prune) inside
  ``transformers.Trainer``, logs its figures, and checkpoints the method with the optimizer.
"""
from .pretrained import from_pretrained, read_state
from .trainer import SparseTrainerCallback

__all__ = ["SparseTrainerCallback", "from_pretrained", "read_state"]
