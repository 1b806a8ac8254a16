"""Compact files of extracted sparse models: :func:`save` and :func:`load`.

File layout (all integers little-endian)::

    magic            8 bytes   b"SPENGv1\\n"
    header_len       8 bytes   u64
    header           header_len bytes of UTF-8 JSON (see below)
    padding          zeros up to a multiple of 64 bytes
    data             data_nbytes bytes: raw tensors, each starting at a multiple of 64
    checksum         32 bytes  SHA-256 of every byte before it

The header holds ``library_version``, ``torch_version``, ``model_class``, ``layers`` (one entry per
replaced layer: its path, the :meth:`InferModule.file_spec` architecture, the storage kind and its
tensors), ``state`` (every other entry of the model's ``state_dict``), ``aliases`` (state keys that share
a tensor with another, e.g. tied embeddings), ``architecture`` (a description of the whole model from
which :func:`load` rebuilds it without code, or null with ``architecture_note`` saying why not) and the
user's ``metadata``. A tensor entry is ``{"dtype", "shape", "offset", "nbytes"}``; column indices of
narrow matrices are stored as ``uint16`` (2 bytes a nonzero), every other index as int32.

Safety: loading never unpickles and never imports a name taken from the file. Module classes come from a
fixed table of torch.nn classes, the sparse_engine inference layers and :func:`register` -ed classes;
Hugging Face models only from ``transformers`` classes derived from ``PreTrainedModel``. Every check
(magic, sizes, checksum, dtypes, shapes, index structure, compatibility with a given ``model``) runs
before anything is built or changed, so a bad file raises :class:`SparseFileError` and never leaves a
half-loaded model.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import __version__
from ..param import sparse_layers
from .infer import LAYER_TYPES, InferModule

__all__ = ["MAGIC", "SparseFileError", "load", "read_header", "register", "save"]

MAGIC = b"SPENGv1\n"
FORMAT_VERSION = 1
_ALIGN = 64
_HASH_BYTES = 32
_MAX_HEADER = 1 << 30


class SparseFileError(ValueError):
    """A file that is not a valid sparse_engine file (foreign, truncated, corrupt, or incompatible)."""


# --------------------------------------------------------------------------------------------------
# tensors <-> bytes
# --------------------------------------------------------------------------------------------------

_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _NAMES:
        raise ValueError(f"cannot store a tensor of dtype {dtype} (supported: {sorted(_DTYPES)})")
    return _NAMES[dtype]


def _raw(t: Tensor, encoding: str | None) -> np.ndarray:
    """Bytes of ``t`` as a uint8 numpy array (little-endian)."""
    t = t.detach().to("cpu").contiguous()
    if encoding == "uint16":
        return t.numpy().astype("<u2").view(np.uint8).reshape(-1)
    return t.reshape(-1).view(torch.uint8).numpy()


def _decode(buf: memoryview, entry: Any, data_start: int, data_nbytes: int, where: str) -> Tensor:
    if not isinstance(entry, dict):
        raise SparseFileError(f"{where}: tensor entry must be an object, got {type(entry).__name__}")
    try:
        dtype_name, shape, offset, nbytes = entry["dtype"], entry["shape"], entry["offset"], entry["nbytes"]
    except KeyError as e:
        raise SparseFileError(f"{where}: tensor entry lacks {e}") from None
    encoding = entry.get("encoding")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise SparseFileError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
    if not all(isinstance(v, int) and v >= 0 for v in (offset, nbytes)):
        raise SparseFileError(f"{where}: offset and nbytes must be non-negative ints")
    numel = math.prod(shape)
    if encoding == "uint16":
        if dtype_name != "int32":
            raise SparseFileError(f"{where}: uint16 encoding is only for int32 tensors, got {dtype_name!r}")
        itemsize = 2
    elif encoding is None:
        if dtype_name not in _DTYPES:
            raise SparseFileError(f"{where}: unknown dtype {dtype_name!r}")
        itemsize = torch.empty((), dtype=_DTYPES[dtype_name]).element_size()
    else:
        raise SparseFileError(f"{where}: unknown encoding {encoding!r}")
    if nbytes != numel * itemsize:
        raise SparseFileError(f"{where}: nbytes {nbytes} does not match shape {shape} of {dtype_name}")
    if offset + nbytes > data_nbytes:
        raise SparseFileError(f"{where}: bytes [{offset}, {offset + nbytes}) lie outside the data section")
    raw = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=data_start + offset)
    if encoding == "uint16":
        return torch.from_numpy(raw.view("<u2").astype(np.int32)).reshape(shape)
    out = torch.empty(numel, dtype=_DTYPES[dtype_name])
    if nbytes:
        out.view(torch.uint8).copy_(torch.from_numpy(raw.copy()))
    return out.reshape(shape)


# --------------------------------------------------------------------------------------------------
# architecture descriptions (rebuild without code)
# --------------------------------------------------------------------------------------------------


def _has(attr: str) -> Callable[[nn.Module], bool]:
    return lambda m: getattr(m, attr) is not None


_BIAS = ("bias", _has("bias"))
_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", _BIAS,
         "padding_mode")
_POOL_MAX = ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")

#: class -> constructor arguments, each an attribute of the same name or (name, getter).
_TABLE: dict[type, tuple] = {
    nn.Linear: ("in_features", "out_features", _BIAS),
    nn.Conv1d: _CONV, nn.Conv2d: _CONV, nn.Conv3d: _CONV,
    nn.BatchNorm1d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.BatchNorm2d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.LayerNorm: ("normalized_shape", "eps", "elementwise_affine", _BIAS),
    nn.GroupNorm: ("num_groups", "num_channels", "eps", "affine"),
    nn.Embedding: ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                   "scale_grad_by_freq", "sparse"),
    nn.Dropout: ("p", "inplace"), nn.Dropout1d: ("p", "inplace"), nn.Dropout2d: ("p", "inplace"),
    nn.ReLU: ("inplace",), nn.ReLU6: ("inplace",), nn.SiLU: ("inplace",), nn.Mish: ("inplace",),
    nn.Hardswish: ("inplace",), nn.ELU: ("alpha", "inplace"), nn.LeakyReLU: ("negative_slope", "inplace"),
    nn.GELU: ("approximate",), nn.Tanh: (), nn.Sigmoid: (), nn.Identity: (),
    nn.Softplus: ("beta", "threshold"), nn.Softmax: ("dim",), nn.LogSoftmax: ("dim",),
    nn.Flatten: ("start_dim", "end_dim"), nn.Unflatten: ("dim", "unflattened_size"),
    nn.MaxPool1d: _POOL_MAX, nn.MaxPool2d: _POOL_MAX,
    nn.AvgPool1d: ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
    nn.AvgPool2d: ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    nn.AdaptiveAvgPool1d: ("output_size",), nn.AdaptiveAvgPool2d: ("output_size",),
    nn.AdaptiveMaxPool1d: ("output_size", "return_indices"), nn.AdaptiveMaxPool2d: ("output_size", "return_indices"),
}
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

#: qualified name -> (class, to_config(module) -> dict, from_config(dict) -> module); see register()
_REGISTRY: dict[str, tuple[type, Callable, Callable]] = {}


def register(cls: type, to_config: Callable[[nn.Module], dict], from_config: Callable[[dict], nn.Module]) -> None:
    """Let :func:`load` rebuild ``cls`` without a model: ``to_config`` gives a JSON-able dict of its
    constructor arguments, ``from_config`` builds a fresh instance (children included) from it.

    Only registered classes, never names read from a file, are instantiated.
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"cls must be an nn.Module subclass, got {cls!r}")
    _REGISTRY[f"{cls.__module__}.{cls.__qualname__}"] = (cls, to_config, from_config)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _jsonable(v: Any, where: str) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            return {"float": repr(v)}
        return v
    if isinstance(v, (tuple, list, torch.Size)):
        return [_jsonable(e, where) for e in v]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v) and "float" not in v:
        return {k: _jsonable(e, where) for k, e in v.items()}
    raise _NotDescribable(f"{where} has an argument of type {type(v).__name__} that cannot be written")


def _unjson(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_unjson(e) for e in v)
    if isinstance(v, dict) and set(v) == {"float"}:
        return float(v["float"])
    return v


class _NotDescribable(Exception):
    pass


def _describe(module: nn.Module, path: str, layers: set[str], seen: set[int]) -> dict:
    where = f"module {path or '<root>'} ({type(module).__name__})"
    if id(module) in seen:
        raise _NotDescribable(f"{where} appears twice in the model (shared module)")
    seen.add(id(module))
    if path in layers:
        return {"layer": path}
    cls = type(module)
    if module._forward_hooks or module._forward_pre_hooks:
        raise _NotDescribable(f"{where} has forward hooks (code that a file cannot hold)")
    name = _qualname(cls)
    if name in _REGISTRY:
        return {"registered": name, "config": _jsonable(_REGISTRY[name][1](module), where)}
    if cls in _CONTAINERS:
        children = {n: _describe(c, f"{path}.{n}" if path else n, layers, seen) for n, c in module.named_children()}
        return {"container": cls.__name__, "children": children}
    if cls not in _TABLE:
        raise _NotDescribable(
            f"{where}: {name} is not a torch.nn building block that can be described without code; "
            "pass model=<a freshly built instance> to load(), or sparse_engine.export.io.register() the class")
    if any(True for _ in module.children()):
        raise _NotDescribable(f"{where} has children")
    args = {}
    for a in _TABLE[cls]:
        key, get = (a, lambda m, a=a: getattr(m, a)) if isinstance(a, str) else a
        args[key] = _jsonable(get(module), where)
    return {"module": cls.__name__, "args": args}


def _build(desc: Any, layers: dict[str, InferModule], where: str = "architecture") -> nn.Module:
    if not isinstance(desc, dict):
        raise SparseFileError(f"{where} must be an object")
    if "layer" in desc:
        if desc["layer"] not in layers:
            raise SparseFileError(f"{where} names layer {desc['layer']!r} that the file does not hold")
        return layers[desc["layer"]]
    if "registered" in desc:
        entry = _REGISTRY.get(desc["registered"])
        if entry is None:
            raise SparseFileError(f"{where}: class {desc['registered']!r} is not registered in this process; "
                                  "import the module that registers it, or pass model=")
        return entry[2](desc.get("config", {}))
    if "container" in desc:
        kinds = {c.__name__: c for c in _CONTAINERS}
        if desc["container"] not in kinds or not isinstance(desc.get("children"), dict):
            raise SparseFileError(f"{where}: bad container {desc.get('container')!r}")
        children = {n: _build(c, layers, f"{where}.{n}") for n, c in desc["children"].items()}
        cls = kinds[desc["container"]]
        if cls is nn.ModuleList:
            return nn.ModuleList(list(children.values()))
        if cls is nn.ModuleDict:
            return nn.ModuleDict(children)
        seq = nn.Sequential()
        for n, c in children.items():
            seq.add_module(n, c)
        return seq
    if "module" in desc:
        kinds = {c.__name__: c for c in _TABLE}
        cls = kinds.get(desc["module"])
        if cls is None:
            raise SparseFileError(f"{where}: unknown module type {desc['module']!r}")
        args = desc.get("args", {})
        if not isinstance(args, dict) or set(args) - {a if isinstance(a, str) else a[0] for a in _TABLE[cls]}:
            raise SparseFileError(f"{where}: bad arguments for {desc['module']}")
        try:
            return cls(**{k: _unjson(v) for k, v in args.items()})
        except (TypeError, ValueError) as e:
            raise SparseFileError(f"{where}: cannot build {desc['module']}: {e}") from None
    raise SparseFileError(f"{where}: unknown description {sorted(desc)}")


def _verify_description(model: nn.Module, arch: dict, layer_names: set[str]) -> None:
    """Rebuild the description on the meta device and compare it with the model, module by module.

    Catches what the table cannot see: a constructor argument that is not stored under its own name,
    a registered class whose to_config forgets something.
    """
    def under_layer(name: str) -> bool:
        return any(name == n or name.startswith(f"{n}.") for n in layer_names if n)

    with torch.device("meta"):
        try:
            rebuilt = _build(arch, {n: nn.Identity() for n in layer_names})  # type: ignore[dict-item]
        except (SparseFileError, TypeError, ValueError) as e:
            raise _NotDescribable(f"the description does not rebuild: {e}") from None

    def summary(m: nn.Module) -> tuple[list, dict]:
        mods = [(n, type(c), c.extra_repr()) for n, c in m.named_modules() if not under_layer(n)]
        sd = {k: (tuple(t.shape), t.dtype) for k, t in m.state_dict().items() if not under_layer(k.rsplit(".", 1)[0]
                                                                                             if "." in k else "")}
        return mods, sd

    mine_mods, mine_sd = summary(model)
    new_mods, new_sd = summary(rebuilt)
    if mine_mods != new_mods:
        diff = next(((a, b) for a, b in zip(mine_mods, new_mods) if a != b), None)
        raise _NotDescribable(f"the description rebuilds a different architecture (first difference: {diff})")
    if set(mine_sd) != set(new_sd) or any(mine_sd[k][0] != new_sd[k][0] for k in mine_sd):
        raise _NotDescribable("the description rebuilds a model with a different state_dict")


def _hf_description(model: nn.Module) -> dict | None:
    """Hugging Face models rebuild from (class name, config): both data, the code is the installed library."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    try:
        import transformers
    except ImportError:
        return None
    cls = type(model)
    if not isinstance(model, transformers.PreTrainedModel) or getattr(transformers, cls.__name__, None) is not cls:
        return None
    try:
        cfg = json.loads(config.to_json_string(use_diff=False))
    except (TypeError, ValueError):
        return None
    return {"hf_class": cls.__name__, "config": cfg}


def _build_hf(desc: dict) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise SparseFileError("this file holds a Hugging Face model: install transformers, or pass model=") from None
    cls = getattr(transformers, str(desc.get("hf_class")), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise SparseFileError(f"transformers has no model class {desc.get('hf_class')!r}")
    cfg = dict(desc.get("config") or {})
    model_type = cfg.pop("model_type", None)
    try:
        config = transformers.AutoConfig.for_model(model_type, **cfg)
    except (KeyError, ValueError, TypeError) as e:
        raise SparseFileError(f"cannot rebuild the {cls.__name__} config: {e}") from None
    return cls(config)


def _skeleton_compatible(target: nn.Module, spec: dict, path: str) -> None:
    """Raise SparseFileError unless the skeleton's module at ``path`` can take this layer."""
    shape = tuple(spec["weight_shape"])
    if isinstance(target, InferModule):
        got = target.weight_shape
    elif hasattr(target, "param") and hasattr(target.param, "weight_shape"):
        got = tuple(target.param.weight_shape)
    elif isinstance(getattr(target, "weight", None), Tensor):
        got = tuple(target.weight.shape)
    else:
        raise SparseFileError(f"model.{path} is a {type(target).__name__}, which has no weight to replace")
    if got != shape:
        raise SparseFileError(f"model.{path} has a weight of shape {got}, the file's layer has {shape}")
    kind = spec["type"]
    linear = isinstance(target, (nn.Linear, LAYER_TYPES["InferLinear"])) or "Linear" in type(target).__name__
    conv = isinstance(target, (nn.Conv1d, nn.Conv2d)) or "Conv" in type(target).__name__
    if (kind == "InferLinear" and not linear) or (kind != "InferLinear" and not conv):
        raise SparseFileError(f"model.{path} is a {type(target).__name__}; the file's layer is {kind}")
    if kind != "InferLinear":
        for a in ("stride", "dilation", "groups", "padding", "padding_mode"):
            mine = getattr(target, a, None)
            if mine is None:
                continue
            mine = list(mine) if isinstance(mine, tuple) else mine
            if mine != spec.get(a):
                raise SparseFileError(f"model.{path}.{a} is {mine!r}; the file's layer has {spec.get(a)!r}")


# --------------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------------


def save(model: nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> int:
    """Write an extracted model (see :func:`sparse_engine.extract`) to ``path``; returns the file size.

    The file is written to a temporary file in the same directory and renamed over ``path``, so an
    interrupted save never leaves a partial file. ``metadata``: extra str -> str entries for the header.
    """
    layers = _saveable_layers(model, metadata)
    entries: list[tuple[dict, Tensor, str | None]] = []  # (entry dict to fill, tensor, encoding)

    def add(t: Tensor, encoding: str | None = None) -> dict:
        e = {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
        if encoding:
            e["encoding"] = encoding
        entries.append((e, t, encoding))
        return e

    layer_header, layer_keys = _layer_entries(layers, add)
    state, aliases, extra = _state_entries(model, layer_keys, add)
    architecture, note = _architecture(model, set(layers))
    offset = 0
    for e, t, enc in entries:
        nbytes = t.numel() * (2 if enc == "uint16" else t.element_size())
        e["offset"], e["nbytes"] = offset, nbytes
        offset += -(-nbytes // _ALIGN) * _ALIGN
    header = {
        "format": "sparse_engine", "format_version": FORMAT_VERSION, "library_version": __version__,
        "torch_version": torch.__version__, "model_class": _qualname(type(model)),
        "layers": layer_header, "state": state, "aliases": aliases, "extra_state": extra,
        "architecture": architecture, "architecture_note": note, "metadata": metadata or {},
        "data_nbytes": offset,
    }
    header_bytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    prefix_bytes = MAGIC + len(header_bytes).to_bytes(8, "little") + header_bytes
    prefix_bytes += b"\0" * (-len(prefix_bytes) % _ALIGN)
    path = os.fspath(path)
    _write_atomic(path, prefix_bytes, entries, offset)
    return os.path.getsize(path)


def _saveable_layers(model: nn.Module, metadata) -> dict[str, InferModule]:
    """The inference layers of a model that :func:`save` can write (else why not, naming it)."""
    if sys.byteorder != "little":
        raise NotImplementedError("sparse_engine files are little-endian; this machine is big-endian")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if metadata is not None and not (isinstance(metadata, dict) and
                                     all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise ValueError("metadata must be a dict of str -> str")
    training = [name for name, _ in sparse_layers(model)]
    if training:
        raise ValueError(
            f"model still holds training-time sparse layers ({', '.join(training[:3])}"
            f"{'...' if len(training) > 3 else ''}); call sparse_engine.extract(model) first and save its result")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, InferModule)}
    if not layers:
        raise ValueError(
            f"not a sparse_engine model: {type(model).__name__} holds no extracted sparse layer "
            "(InferLinear / InferConv*); sparsify, train and extract it first (use torch.save for dense models)")
    return layers


def _layer_entries(layers: dict[str, InferModule], add: Callable) -> tuple[dict[str, dict], set[str]]:
    """(the header's ``layers``, the state_dict keys they cover): each layer's storage tensors, column
    indices of narrow matrices as uint16."""
    layer_keys: set[str] = set()
    layer_header: dict[str, dict] = {}
    for name, mod in layers.items():
        prefix = f"{name}." if name else ""
        layer_keys.update(prefix + k for k in mod.state_dict())
        storage, tensors = mod.storage_tensors()
        ncols = mod.shape2d[1] if storage == "csr" else -(-mod.shape2d[1] // (mod.block_shape or (1, 1))[1])
        enc = {"col": "uint16"} if ncols <= 65536 else {}
        layer_header[name] = {
            "spec": mod.file_spec(), "storage": storage,
            "tensors": {k: add(t, enc.get(k)) for k, t in tensors.items()},
        }
    return layer_header, layer_keys


def _state_entries(model: nn.Module, layer_keys: set[str], add: Callable) -> tuple[dict, dict, dict]:
    """(state, aliases, extra state) of every state_dict entry outside the layers: a tensor shared with an
    earlier key (tied weights) is an alias of it; extra state must be plain JSON data."""
    state: dict[str, dict] = {}
    aliases: dict[str, str] = {}
    owners: dict[tuple, str] = {}
    extra: dict[str, Any] = {}
    for key, t in model.state_dict(keep_vars=False).items():
        if key in layer_keys:
            continue
        if not isinstance(t, Tensor):  # get_extra_state() of a module: kept if it is plain data
            try:
                extra[key] = json.loads(json.dumps(t, allow_nan=False))
            except (TypeError, ValueError):
                raise ValueError(f"state_dict entry {key!r} is a {type(t).__name__} that cannot be written "
                                 "as JSON (extra state must be plain data)") from None
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) \
            if t.numel() else None
        if ident is not None and ident in owners:
            aliases[key] = owners[ident]
            continue
        if ident is not None:
            owners[ident] = key
        state[key] = add(t)
    return state, aliases, extra


def _architecture(model: nn.Module, layers: set[str]) -> tuple[dict | None, str]:
    """(the description load rebuilds the model from, or None; the note saying why not)."""
    try:
        architecture = _describe(model, "", layers, set())
        _verify_description(model, architecture, layers)
        return architecture, ""
    except _NotDescribable as e:
        hf = _hf_description(model)
        return (hf, "") if hf is not None else (None, str(e))


def _write_atomic(path: str, prefix_bytes: bytes, entries: list, offset: int) -> None:
    """Header, then every tensor aligned, then the SHA-256 of all of it: into a temporary file in the same
    directory, flushed to disk, renamed over ``path`` (an interrupted save leaves no partial file)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            h = hashlib.sha256()

            def write(b) -> None:
                f.write(b)
                h.update(b)

            write(prefix_bytes)
            written = 0
            for e, t, enc in entries:
                raw = _raw(t, enc)
                if raw.nbytes != e["nbytes"]:
                    raise RuntimeError(f"internal error: tensor bytes {raw.nbytes} != {e['nbytes']}")
                write(raw.data)
                pad = -raw.nbytes % _ALIGN
                write(b"\0" * pad)
                written += raw.nbytes + pad
            if written != offset:
                raise RuntimeError(f"internal error: wrote {written} data bytes, header says {offset}")
            f.write(h.digest())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# --------------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------------


def _read(path: str | os.PathLike) -> tuple[dict, memoryview, int]:
    """(header, whole file, data start) after every structural check and the checksum."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        buf = f.read()
    size = len(buf)
    if size < len(MAGIC) or buf[: len(MAGIC)] != MAGIC:
        hint = ""
        if buf[:2] == b"PK":
            hint = " (it looks like a zip / torch.save file: load it with torch.load)"
        elif buf[:1] == b"\x80":
            hint = " (it looks like a pickle)"
        elif buf[:8] and int.from_bytes(buf[:8], "little") < size and buf[8:9] == b"{":
            hint = " (it looks like a safetensors file)"
        raise SparseFileError(f"{path} is not a sparse_engine file: bad magic bytes {buf[:8]!r}{hint}")
    if size < len(MAGIC) + 8:
        raise SparseFileError(f"{path} is truncated: {size} bytes, shorter than the fixed prefix")
    header_len = int.from_bytes(buf[8:16], "little")
    if header_len > _MAX_HEADER or 16 + header_len > size:
        raise SparseFileError(f"{path} is truncated or corrupt: header length {header_len} does not fit "
                              f"in a {size}-byte file")
    try:
        header = json.loads(buf[16: 16 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SparseFileError(f"{path} is corrupt: its header is not valid JSON ({e})") from None
    if not isinstance(header, dict) or header.get("format") != "sparse_engine":
        raise SparseFileError(f"{path} is corrupt: its header does not describe a sparse_engine model")
    if header.get("format_version") != FORMAT_VERSION:
        raise SparseFileError(f"{path} has file format version {header.get('format_version')!r}; this "
                              f"sparse_engine {__version__} reads version {FORMAT_VERSION}")
    data_nbytes = header.get("data_nbytes")
    if not isinstance(data_nbytes, int) or data_nbytes < 0:
        raise SparseFileError(f"{path} is corrupt: bad data_nbytes {data_nbytes!r}")
    data_start = 16 + header_len + (-(16 + header_len) % _ALIGN)
    expected = data_start + data_nbytes + _HASH_BYTES
    if size < expected:
        raise SparseFileError(f"{path} is truncated: {size} bytes, the header announces {expected}")
    if size > expected:
        raise SparseFileError(f"{path} is corrupt: {size - expected} unexpected bytes after the data")
    digest = hashlib.sha256(memoryview(buf)[: size - _HASH_BYTES]).digest()
    if digest != buf[size - _HASH_BYTES:]:
        raise SparseFileError(f"{path} is corrupt: SHA-256 checksum mismatch (the file was modified or damaged)")
    return header, memoryview(buf), data_start


def read_header(path: str | os.PathLike) -> dict:
    """The verified JSON header of a file (architecture, layers, versions, metadata)."""
    return _read(path)[0]


def load(path: str | os.PathLike, model: nn.Module | None = None, *, device: str | torch.device | None = None
         ) -> nn.Module:
    """Load a file written by :func:`save`.

    Without ``model`` the architecture is rebuilt from the header (models made of torch.nn containers
    and building blocks, registered classes, or Hugging Face models). With ``model`` (a freshly built
    instance of the saved architecture, e.g. the dense model or ``AutoModelForCausalLM.from_config``),
    the layers listed in the file replace the modules at the same paths and the rest of the state dict is
    loaded into it in place; it is returned. ``device``: where a rebuilt model goes (default CPU; with
    ``model`` each layer goes to the device of the module it replaces). The result is in eval mode.
    """
    header, buf, data_start = _read(path)
    data_nbytes = header["data_nbytes"]
    path = os.fspath(path)

    def tensors_of(table: Any, where: str) -> dict[str, Tensor]:
        if not isinstance(table, dict):
            raise SparseFileError(f"{path}: {where} must be an object")
        return {k: _decode(buf, e, data_start, data_nbytes, f"{path}: {where}[{k!r}]") for k, e in table.items()}

    layer_table = header.get("layers")
    if not isinstance(layer_table, dict) or not layer_table:
        raise SparseFileError(f"{path}: the file lists no sparse layer")
    layers: dict[str, InferModule] = {}
    specs: dict[str, dict] = {}
    for name, entry in layer_table.items():
        where = f"{path}: layer {name!r}"
        if not isinstance(entry, dict) or not isinstance(entry.get("spec"), dict):
            raise SparseFileError(f"{where} is malformed")
        spec = entry["spec"]
        cls = LAYER_TYPES.get(spec.get("type"))
        if cls is None:
            raise SparseFileError(f"{where} has unknown type {spec.get('type')!r}")
        tensors = tensors_of(entry.get("tensors"), f"layer {name!r}")
        try:
            mod = cls.from_file(spec, entry.get("storage"), tensors)
            dtype = mod.dtype_of()
            if spec.get("dtype") != str(dtype).replace("torch.", ""):
                raise ValueError(f"dtype {dtype} does not match the header's {spec.get('dtype')!r}")
        except (ValueError, KeyError, TypeError) as e:
            raise SparseFileError(f"{where} is invalid: {e}") from None
        layers[name] = mod
        specs[name] = spec
    state = tensors_of(header.get("state", {}), "state")
    aliases = header.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(v, str) and v in state for v in aliases.values()):
        raise SparseFileError(f"{path}: aliases must map state keys to stored keys")
    state.update({k: state[v] for k, v in aliases.items()})
    extra = header.get("extra_state", {})
    if not isinstance(extra, dict):
        raise SparseFileError(f"{path}: extra_state must be an object")
    state.update(extra)

    if model is None:
        arch = header.get("architecture")
        if arch is None:
            raise SparseFileError(
                f"{path} holds a {header.get('model_class')} that cannot be rebuilt without its code "
                f"({header.get('architecture_note') or 'no description'}); build the model and pass it: "
                "load(path, model=...)")
        if "" in layers:  # the whole model is one layer
            if state:
                raise SparseFileError(f"{path}: a single-layer model cannot have other state")
            model = layers[""]
        else:
            model = _build_hf(arch) if isinstance(arch, dict) and "hf_class" in arch else _build(arch, layers)
            match_dtypes(model, state)  # a rebuilt model starts in the default dtype
            _fill(model, layers, specs, state, path)
        if device is not None:
            model.to(device)
    else:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _fill(model, layers, specs, state, path)
    return model.eval()


def _fill(model: nn.Module, layers: dict[str, InferModule], specs: dict[str, dict], state: dict[str, Tensor],
          path: str) -> None:
    """Replace the listed layers of ``model`` and load ``state``; every check before any change."""
    targets = {}
    for name, spec in specs.items():
        try:
            target = model.get_submodule(name) if name else model
        except AttributeError:
            raise SparseFileError(f"{path}: the model has no module {name!r} (the file's layer); is it the "
                                  "same architecture?") from None
        _skeleton_compatible(target, spec, name)
        targets[name] = target
    if "" in layers:
        raise SparseFileError(f"{path}: the whole model is one layer; load it without model=")
    # The state the model will expect once the layers are replaced.
    expected = {}
    for key, t in model.state_dict().items():
        if any(key.startswith(f"{n}.") for n in layers):
            continue
        expected[key] = t
    _check_state(expected, state, path)
    for name, mod in layers.items():
        old = targets[name]
        ref = next(iter(old.parameters(recurse=False)), None)
        if ref is None:
            ref = next(iter(old.buffers(recurse=False)), None)
        if ref is not None:
            mod.to(ref.device)
        model.set_submodule(name, mod)
    _load_state(model, layers, state, path, strict_dtypes=False)


def match_dtypes(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Cast the floating tensors of a freshly built model to the dtypes stored in the file."""
    own = model.state_dict(keep_vars=True)
    for key, t in state.items():
        mine = own.get(key)
        if not isinstance(mine, Tensor) or not isinstance(t, Tensor) or mine.dtype == t.dtype or not (mine.is_floating_point() and t.is_floating_point()):
            continue
        mod_name, _, attr = key.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        if attr in mod._parameters and mod._parameters[attr] is not None:
            mod._parameters[attr].data = mod._parameters[attr].data.to(t.dtype)
        elif attr in mod._buffers and mod._buffers[attr] is not None:
            mod._buffers[attr] = mod._buffers[attr].to(t.dtype)


def _check_state(expected: dict[str, Tensor], state: dict[str, Tensor], path: str) -> None:
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise SparseFileError(f"{path} does not match the model: missing from the file {missing[:5]}, "
                              f"unknown to the model {extra[:5]}")
    for key, t in expected.items():
        s = state[key]
        if not isinstance(t, Tensor) or not isinstance(s, Tensor):
            if isinstance(t, Tensor) != isinstance(s, Tensor):
                raise SparseFileError(f"{path}: {key} is a tensor on one side and extra state on the other")
            continue
        if tuple(t.shape) != tuple(s.shape):
            raise SparseFileError(f"{path}: {key} has shape {tuple(s.shape)} in the file, {tuple(t.shape)} in the model")
        if t.dtype != s.dtype:
            raise SparseFileError(f"{path}: {key} is {s.dtype} in the file but {t.dtype} in the model; build the "
                                  f"model in {s.dtype} (e.g. .to({s.dtype})) before loading")


def _load_state(model: nn.Module, layers: dict[str, InferModule], state: dict[str, Tensor], path: str,
                strict_dtypes: bool) -> None:
    layer_keys = set()
    for name, mod in layers.items():
        layer_keys.update(f"{name}.{k}" if name else k for k in mod.state_dict())
    if strict_dtypes:
        expected = {k: t for k, t in model.state_dict().items() if k not in layer_keys}
        _check_state(expected, state, path)
    result = model.load_state_dict(state, strict=False)
    bad_missing = [k for k in result.missing_keys if k not in layer_keys]
    if bad_missing or result.unexpected_keys:
        raise SparseFileError(f"{path}: state does not match the model (missing {bad_missing[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]})")
