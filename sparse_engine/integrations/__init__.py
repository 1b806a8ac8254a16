"""Integrations with other libraries. Each subpackage imports its library when it is imported itself:

* :mod:`sparse_engine.integrations.hf`: Hugging Face transformers (``from_pretrained`` of sparse and
  extracted models, a ``TrainerCallback`` that runs a method's schedule inside ``Trainer``).
"""
