"""Export: a trained sparse model collapsed into compact inference layers, and their file format.

    import sparse_engine.export as E
    inference = E.extract(model, "auto")          # InferLinear / InferConv* layers, θ only
    E.save(inference, "model.sparse"); E.load("model.sparse")

``extract`` / ``reformat`` (extract.py) build the inference layers (infer.py); ``save`` / ``load`` (io.py)
are the one writer and reader of inference files. Nothing here imports the application (sparse_engine.app).
"""
from .extract import extract, extract_dense, reformat, report, sparse_layers
from .infer import FORMATS, InferConv1d, InferConv2d, InferLinear, InferModule
from .io import SparseFileError, load, read_header, register, save

__all__ = [
    "FORMATS",
    "InferConv1d",
    "InferConv2d",
    "InferLinear",
    "InferModule",
    "SparseFileError",
    "extract",
    "extract_dense",
    "load",
    "read_header",
    "reformat",
    "register",
    "report",
    "save",
    "sparse_layers",
]
