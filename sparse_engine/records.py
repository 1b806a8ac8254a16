"""Layer records: the structure of a sparse layer as one small int64 tensor in its ``state_dict``.

A sparse layer's ``state_dict`` must hold tensors only, so that safetensors (``save_pretrained``, sharded or
not), ``torch.save``/``torch.load(weights_only=True)`` and ``torch.distributed.checkpoint`` can store it.
Each sparse module therefore returns its structure (kind, layout, block shape, weight shape, ...) from
``get_extra_state`` as a record: a 1-D int64 tensor

    [MAGIC, VERSION, schema, field, field, ...]

Strings are codes into :data:`NAMES` (0: None), floats are stored as the bits of a float64 (exact; NaN:
None), ints as themselves. The length of a record depends only on its schema (and, for a weight shape, on
its number of dimensions), never on values, so a DCP load into a model of the same architecture finds
tensors of the sizes it saved. int64 is never cast by ``model.to(dtype)`` or a loader's dtype choice.

Schemas (append only: a code never changes meaning):

* ``SparseModule``: type, layout, resolved layout, block shape, mask seed, β at construction, PILoT's
  target density.
* ``Parameterization``: kind, storage, block shape, weight shape (the rest of the tensor).
* ``InferModule``: type, format, storage of the state dict, block shape, N:M.
"""
from __future__ import annotations

import math
import struct
from typing import Any

import torch
from torch import Tensor

MAGIC = 0x53504E47  # "SPNG"
VERSION = 1

#: every string a record can hold; a string's code is its index + 1 (append only)
NAMES = (
    "SparseLinear", "SparseConv1d", "SparseConv2d", "InferLinear", "InferConv1d", "InferConv2d",
    "masked", "signin", "pilot",
    "dense", "block", "csr", "bsr", "auto", "nm",
)

#: schema name -> (field, type) in order; a "shape" field takes the rest of the tensor
SCHEMAS: dict[str, tuple[tuple[str, str], ...]] = {
    "SparseModule": (("type", "str"), ("layout", "str"), ("resolved", "str"), ("block_n", "int"),
                     ("block_k", "int"), ("seed", "int"), ("beta", "float"), ("target_density", "float")),
    "Parameterization": (("kind", "str"), ("storage", "str"), ("block_n", "int"), ("block_k", "int"),
                         ("shape", "shape")),
    "InferModule": (("type", "str"), ("format", "str"), ("storage", "str"), ("block_n", "int"), ("block_k", "int"),
                    ("nm_n", "int"), ("nm_m", "int")),
}
_SCHEMA_CODES = tuple(SCHEMAS)


def _float_bits(x: float | None) -> int:
    return struct.unpack("<q", struct.pack("<d", math.nan if x is None else float(x)))[0]


def _bits_float(v: int) -> float | None:
    x = struct.unpack("<d", struct.pack("<q", v))[0]
    return None if math.isnan(x) else x


def encode(schema: str, **fields: Any) -> Tensor:
    """The record of ``schema`` with ``fields`` (every field of the schema, by name)."""
    spec = SCHEMAS[schema]
    if set(fields) != {name for name, _ in spec}:
        raise ValueError(f"{schema} record needs fields {[n for n, _ in spec]}, got {sorted(fields)}")
    out = [MAGIC, VERSION, _SCHEMA_CODES.index(schema)]
    for name, typ in spec:
        v = fields[name]
        if typ == "str":
            if v is not None and v not in NAMES:
                raise ValueError(f"{schema} record: {name}={v!r} is not a known name")
            out.append(0 if v is None else NAMES.index(v) + 1)
        elif typ == "float":
            out.append(_float_bits(v))
        elif typ == "int":
            out.append(int(v))
        else:
            out.extend(int(d) for d in v)
    return torch.tensor(out, dtype=torch.int64)


def decode(record: Any, schema: str | None = None) -> tuple[str, dict[str, Any]]:
    """(schema, fields) of a record; ``schema`` given: it must be that one. Raises ValueError if malformed."""
    if not isinstance(record, Tensor) or record.dtype != torch.int64 or record.dim() != 1 or record.numel() < 3:
        got = f"{record.dtype} tensor of shape {tuple(record.shape)}" if isinstance(record, Tensor) \
            else type(record).__name__
        raise ValueError(f"a sparse_engine layer record is a 1-D int64 tensor, got a {got}")
    values = [int(v) for v in record.tolist()]
    if values[0] != MAGIC:
        raise ValueError("not a sparse_engine layer record (wrong magic number)")
    if values[1] > VERSION:
        raise ValueError(f"layer record version {values[1]} is newer than this sparse_engine reads ({VERSION}): "
                         "upgrade sparse_engine")
    if not 0 <= values[2] < len(_SCHEMA_CODES):
        raise ValueError(f"unknown layer record schema {values[2]}")
    name = _SCHEMA_CODES[values[2]]
    if schema is not None and name != schema:
        raise ValueError(f"expected a {schema} record, got a {name} record")
    spec = SCHEMAS[name]
    body = values[3:]
    fixed = sum(1 for _, typ in spec if typ != "shape")
    if len(body) < fixed or (all(typ != "shape" for _, typ in spec) and len(body) != fixed):
        raise ValueError(f"{name} record has {len(body)} fields, expected {fixed}")
    out: dict[str, Any] = {}
    for i, (field, typ) in enumerate(spec):
        if typ == "shape":
            out[field] = tuple(body[i:])
        elif typ == "str":
            if not 0 <= body[i] <= len(NAMES):
                raise ValueError(f"{name} record: {field} has unknown code {body[i]}")
            out[field] = None if body[i] == 0 else NAMES[body[i] - 1]
        elif typ == "float":
            out[field] = _bits_float(body[i])
        else:
            out[field] = body[i]
    return name, out


def is_record(value: Any) -> bool:
    """Whether ``value`` looks like a layer record (an int64 1-D tensor starting with the magic number)."""
    return (isinstance(value, Tensor) and value.dtype == torch.int64 and value.dim() == 1 and value.numel() >= 3
            and int(value[0]) == MAGIC)
