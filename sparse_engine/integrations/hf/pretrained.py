"""``from_pretrained``: rebuild a sparsified or extracted Hugging Face model from its ``save_pretrained`` folder.

``model.save_pretrained(dir)`` of a model holding sparse_engine layers writes them like any module: their
``state_dict`` is tensors only, each layer with an int64 record of its structure
(:mod:`sparse_engine.records`). This module reads those records back:

1. the state (``model.safetensors``, sharded ``model-0000x-of-0000n.safetensors`` with their index, or the
   ``pytorch_model.bin`` variants, read with ``weights_only``);
2. the model class named by ``config.architectures`` (a ``transformers`` class; or ``model_class``) is
   built from ``config.json``;
3. every module with a record is replaced, at the same path, by an empty layer of the recorded type,
   kind and layout (SparseLinear / SparseConv*, or an inference layer of an extracted model);
4. ``load_state_dict`` fills them: masks or indices, m, w, β, values, any number of active weights.

The result equals the saved model tensor for tensor (same dtypes), in eval mode. Tied weights that
``save_pretrained`` leaves out (an LM head tied to the embedding) are tied again by construction.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import Tensor, nn

from ... import records
from ...export.infer import InferModule
from ...nn.conv import SparseConv1d, SparseConv2d
from ...nn.linear import SparseLinear, SparseModule

__all__ = ["from_pretrained", "read_state"]

_SPARSE = {"SparseLinear": SparseLinear, "SparseConv1d": SparseConv1d, "SparseConv2d": SparseConv2d}
_DENSE_KIND = ((nn.Conv2d, "conv2d"), (nn.Conv1d, "conv1d"), (nn.Linear, "linear"))
_INFER_KIND = {"InferLinear": "linear", "InferConv1d": "conv1d", "InferConv2d": "conv2d"}
_WEIGHT_FILES = (("model.safetensors", "model.safetensors.index.json"),
                 ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def read_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of a ``save_pretrained`` folder (sharded or not; safetensors or weights-only torch
    files), on the CPU."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"path must be a folder written by save_pretrained, got {path!r}")
    for single, index in _WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, single)):
            files = [single]
        elif os.path.isfile(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            continue
        state: dict[str, Tensor] = {}
        for name in files:
            state.update(_read_file(os.path.join(path, name)))
        return state
    raise ValueError(f"{path} holds no model weights (none of {[f for pair in _WEIGHT_FILES for f in pair]})")


def _read_file(file: str) -> dict[str, Tensor]:
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(file, device="cpu")
    return torch.load(file, map_location="cpu", weights_only=True)


def layer_records(state: dict[str, Tensor]) -> dict[str, tuple[str, dict[str, Any]]]:
    """{module path: (schema, fields)} of the sparse and inference layers in ``state``."""
    out = {}
    for key, value in state.items():
        if not key.endswith("_extra_state") or not records.is_record(value):
            continue
        schema, fields = records.decode(value)
        if schema in ("SparseModule", "InferModule"):
            out[key[: -len("_extra_state")].rstrip(".")] = (schema, fields)
    return out


def from_pretrained(path: str | os.PathLike, model_class: type | None = None, *, model: nn.Module | None = None,
                    device: str | torch.device | None = None) -> nn.Module:
    """The model saved in ``path`` by ``save_pretrained`` (a sparsified or an extracted one), exactly.

    Args:
        path: the folder (``config.json`` and the weights; a Trainer checkpoint folder too).
        model_class: the ``transformers`` model class to build (default: ``config.architectures[0]``).
        model: load into this model instead of building one; its layers at the recorded paths must be
            the recorded kinds of layer (a dense layer where the checkpoint has a sparse one is an error).
        device: where the model goes (default: CPU).
    Returns:
        the model, in eval mode.
    """
    state = read_state(path)
    layers = layer_records(state)
    if not layers:
        raise ValueError(f"{os.fspath(path)} holds a dense model (no sparse_engine layer in its weights): load it "
                         "with transformers (e.g. AutoModel.from_pretrained) and sparsify it")
    built = model is None
    if built:
        model = _build(path, model_class)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, (schema, rec) in layers.items():
        _place(model, name, schema, rec, state, replace=built)
    if built:
        from ...export.io import match_dtypes

        match_dtypes(model, state)
    result = model.load_state_dict(state, strict=False)
    _check_load(model, state, result.missing_keys, result.unexpected_keys, os.fspath(path))
    if device is not None:
        model.to(device)
    return model.eval()


def _build(path: str | os.PathLike, model_class: type | None) -> nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    if model_class is None:
        names = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, names[0], None) if names else None
        if model_class is None:
            raise ValueError(f"{os.fspath(path)}/config.json names no transformers model class "
                             f"(architectures={names!r}): pass model_class=")
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise TypeError(f"model_class must be a transformers PreTrainedModel class, got {model_class!r}")
    return model_class(config)


def _place(model: nn.Module, name: str, schema: str, rec: dict, state: dict[str, Tensor], replace: bool) -> None:
    """Make ``model.<name>`` a layer that the recorded state loads into (replace a dense skeleton layer)."""
    try:
        target = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the checkpoint has a {rec['type']} at {name!r}, the model has no such module; is it "
                         "the same architecture?") from None
    if type(target).__name__ == rec["type"]:
        return  # already that kind of layer: load_state_dict adopts the stored structure
    kind = next((k for cls, k in _DENSE_KIND if isinstance(target, cls)), None)
    if not replace or kind is None:
        what = (f"kind={_param_kind(state, name)}, layout={rec['layout']}" if schema == "SparseModule"
                else f"format={rec['format']}")
        raise ValueError(f"{name}: the checkpoint holds a sparse {rec['type']} ({what}) but the model has a "
                         f"{type(target).__name__} there: build the model with sparse_engine.from_pretrained(path) "
                         "(without model=), or sparsify it the same way first")
    new = _sparse_layer(target, rec, state, name) if schema == "SparseModule" else _infer_layer(target, kind, rec,
                                                                                                state, name)
    model.set_submodule(name, new)


def _param_kind(state: dict[str, Tensor], name: str) -> str:
    return records.decode(state[name + ".param._extra_state"], "Parameterization")[1]["kind"]


def _sparse_layer(dense: nn.Module, rec: dict, state: dict[str, Tensor], name: str) -> SparseModule:
    """An empty sparse layer of the recorded type, kind and layout (dense storage, no mask: loading the
    state adopts the stored mask or compact pattern)."""
    cls = _SPARSE[rec["type"]]
    new = cls.from_dense(dense, kind=_param_kind(state, name), beta=rec["beta"], block_shape=(rec["block_n"],
                         rec["block_k"]), seed=rec["seed"])
    new.declare_layout(rec["layout"])
    return new


def _infer_layer(dense: nn.Module, kind: str, rec: dict, state: dict[str, Tensor], name: str) -> InferModule:
    """An inference layer of the recorded type and format holding nothing yet (loading fills it)."""
    from ...export.extract import build_layer, conv_args

    if _INFER_KIND[rec["type"]] != kind:
        raise ValueError(f"{name}: the checkpoint holds an {rec['type']}, the model has a {type(dense).__name__}")
    stored = state.get(f"{name}.values", state.get(f"{name}.weight"))
    dtype = stored.dtype if isinstance(stored, Tensor) else dense.weight.dtype
    shape = tuple(dense.weight.shape)
    zeros = torch.zeros(shape, dtype=dtype)
    bias = torch.zeros(shape[0], dtype=dtype) if f"{name}.bias" in state else None
    block = (rec["block_n"], rec["block_k"]) if rec["block_n"] else (1, 1)
    nm = (rec["nm_n"], rec["nm_m"]) if rec["nm_m"] else (2, 4)
    return build_layer(kind, zeros, torch.zeros(shape, dtype=torch.bool), bias, rec["format"],
                       conv_args(dense) if kind != "linear" else None, block, nm)


def _check_load(model: nn.Module, state: dict[str, Tensor], missing: list[str], unexpected: list[str],
                path: str) -> None:
    # save_pretrained leaves out the second name of a tied tensor: missing is fine when its tensor is
    # shared with a loaded key.
    own = model.state_dict(keep_vars=True)
    loaded = {id(own[k]) for k in state if k in own}
    untied = [k for k in missing if id(own.get(k)) not in loaded]
    if untied or unexpected:
        raise ValueError(f"{path} does not match the model: missing from the checkpoint {untied[:5]}, unknown to "
                         f"the model {unexpected[:5]}")
