"""Inference modules: one weight θ = M ⊙ m ⊙ w collapsed into a single tensor, in one of four formats.

:func:`sparse_engine.extract` turns every SparseLinear / SparseConv* of a trained model into one of these;
:func:`sparse_engine.save` / :func:`sparse_engine.load` write and read them. They hold no m, w, β or
optimizer state, only θ (and the bias).

Formats (``module.format``):

* ``"dense"``  θ as an ordinary dense weight: ``F.linear`` / ``F.conv*``. Chosen wherever no sparse
  format is measured faster (low sparsity, small layers, no fast kernel on this device).
* ``"csr"``    values (nnz,) + int32 ``crow``/``col``: ``ops.compact_linear`` (the C++ SpMM on CPU
  when it is built, the reference otherwise). The transpose metadata (``row``, ``ccol``, ``row_t``,
  ``perm``) that the op signature carries is rebuilt from ``crow``/``col``, never stored; so is
  ``col16``, ``col`` in 16 bits (int16 read unsigned) where in_features <= 65536, which the C++ inference
  forward reads.
* ``"bsr"``    the same over (bn, bk) blocks: values (nnzb, bn, bk).
* ``"nm"``     N:M along K (2:4): values (N, K/m·n) + uint8 positions; on a CUDA GPU with 2:4 sparse
  tensor cores θ also lives as a ``torch.sparse.SparseSemiStructuredTensor`` (rebuilt after every
  ``.to()``/``.half()``); elsewhere the layer densifies θ per call (correct, not fast: extract never
  chooses it there).

Convolutions run dense through ``F.conv*``; their sparse formats run im2col (``F.unfold``) followed by the
same matrix product over the (out, in·kh·kw) view of θ. Grouped convolutions only have the dense format.

State: values and bias are ``nn.Parameter`` (requires_grad=False) so that ``parameters()`` counts what
the model holds; index tensors are buffers. ``state_dict`` holds what :func:`sparse_engine.save` writes
(:meth:`InferModule.storage_tensors`: ``crow``/``col`` or ``idx``/``valid`` with the values, a dense weight
as CSR where that is smaller) and an int64 record of format and storage, tensors only: its size is
proportional to nnz whatever format runs, and safetensors / ``save_pretrained`` can write it. Loading one
rebuilds the layer in its own format, device and dtype (any nnz, any storage; derived fields rebuilt).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops, records
from ..layout import FORMATS, BSRIndex, CSRIndex, NMIndex, matrix_shape

__all__ = ["FORMATS", "InferConv1d", "InferConv2d", "InferLinear", "InferModule", "semi_structured_support"]

_DERIVED = ("row", "ccol", "row_t", "perm")
#: the tensors of each storage (besides the bias) that a state dict / file holds
_STORAGE_KEYS = {"dense": ("weight",), "csr": ("values", "crow", "col"), "bsr": ("values", "crow", "col"),
                 "nm": ("values", "idx", "valid")}

#: CSR columns also kept in 16 bits (int16 holding 0..65535: torch pickles int16, not uint16) where
#: in_features <= 65536: the lean CPU forward reads them, 6 bytes to stream per float32 entry instead of 8,
#: and four indices per 64-bit load at batch 1. Measured at 90 % sparsity, 1 thread (Zen 4), against the
#: int32 columns: batch 1 1.04-1.12x faster from 100x300 to 1024x1024, 1.15-1.23x at 4096x4096 and
#: 4096x8192; batch 16 and 64 0.98-1.02x up to 1024x1024, 1.07-1.18x from 2048x2048 on.
_COL16_MAX_K = 65536


def _col16(col: Tensor) -> Tensor:
    """int32 columns < 65536 as int16 with the same low 16 bits (what the C++ forward reads unsigned)."""
    return torch.where(col >= 32768, col - 65536, col).to(torch.int16)


def _check_format(format: str) -> str:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    return format


def semi_structured_support(device: torch.device | str, dtype: torch.dtype, shape: tuple[int, int]) -> str:
    """"" if a (N, K) weight of ``dtype`` can run as a 2:4 semi-structured tensor on ``device``, else why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"2:4 semi-structured tensors need a CUDA GPU (device is {device})"
    if not torch.cuda.is_available():
        return "2:4 semi-structured tensors need a CUDA GPU (torch sees none)"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"2:4 sparse tensor cores need compute capability >= 8.0, got {major}.x"
    try:
        from torch.sparse import SparseSemiStructuredTensor
        from torch.sparse.semi_structured import (
            SparseSemiStructuredTensorCUSPARSELT as CSLT,
        )
        from torch.sparse.semi_structured import (
            SparseSemiStructuredTensorCUTLASS as CUTLASS,
        )
    except ImportError as e:  # older torch
        return f"this torch has no semi-structured sparse tensors ({e})"
    cls = CUTLASS if SparseSemiStructuredTensor._FORCE_CUTLASS or not torch.backends.cusparselt.is_available() \
        else CSLT
    cfg = cls._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
    if cfg is None:
        return f"semi-structured {cls.BACKEND} does not support {dtype} (supported: {sorted(map(str, cls._DTYPE_SHAPE_CONSTRAINTS))})"
    n, k = shape
    if n < cfg.sparse_min_rows or n % cfg.sparse_min_rows or k < cfg.sparse_min_cols or k % cfg.sparse_min_cols:
        return (f"semi-structured {cls.BACKEND} needs a weight of multiples of ({cfg.sparse_min_rows}, "
                f"{cfg.sparse_min_cols}), got {shape}")
    return ""


_COMPACT_FORMATS = ("csr", "bsr")


def _frozen(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=False)


class InferModule(nn.Module):
    """Shared storage and matrix product of every inference layer (a weight viewed as (N, K))."""

    format: str
    weight_shape: tuple[int, ...]

    # ------------------------------------------------------------------------------- construction

    def _init_storage(
        self, theta: Tensor, mask: Tensor | None, bias: Tensor | None, format: str,
        block_shape: tuple[int, int] | None = None, nm: tuple[int, int] = (2, 4),
    ) -> None:
        """θ: dense, weight's shape. mask: bool of θ's shape (None: θ != 0 in bits, -0.0 kept)."""
        _check_format(format)
        if not theta.is_floating_point():
            raise ValueError(f"theta must be floating point, got {theta.dtype}")
        self.format = format
        self.weight_shape = tuple(int(d) for d in theta.shape)
        self.shape2d = matrix_shape(self.weight_shape)
        theta = theta.detach()
        if mask is None:
            mask = _nonzero_bits(theta)
        elif tuple(mask.shape) != self.weight_shape or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape {self.weight_shape}, got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
        mask2 = mask.reshape(self.shape2d).to(theta.device)
        theta2 = torch.where(mask2, theta.reshape(self.shape2d), torch.zeros((), dtype=theta.dtype, device=theta.device))
        if bias is not None:
            _check_bias(bias, self.weight_shape[0], theta.dtype)
        self.bias = None if bias is None else _frozen(bias.to(theta.device))
        self.block_shape: tuple[int, int] | None = None
        self.nm: tuple[int, int] | None = None
        if format == "dense":
            self.weight = _frozen(theta2.reshape(self.weight_shape))
        elif format == "csr":
            index = CSRIndex.from_mask(mask2)
            self._set_compact(index, index.gather(theta2))
        elif format == "bsr":
            if block_shape is None:
                raise ValueError("block_shape is required for format 'bsr'")
            index = BSRIndex.from_mask(mask2, tuple(block_shape))
            self.block_shape = index.block_shape
            self._set_compact(index, index.gather(theta2))
        else:
            index = NMIndex.from_mask(mask2, *nm)
            self._set_nm(index, index.gather(theta2))
        self._semi = None
        self._refresh_semi()

    def _set_compact(self, index: CSRIndex | BSRIndex, values: Tensor) -> None:
        self.values = _frozen(values)
        self.register_buffer("crow", index.crow)
        self.register_buffer("col", index.col)
        for f in _DERIVED:
            self.register_buffer(f, getattr(index, f), persistent=False)
        narrow = isinstance(index, CSRIndex) and self.shape2d[1] <= _COL16_MAX_K
        self.register_buffer("col16", _col16(index.col) if narrow else None, persistent=False)

    def _set_nm(self, index: NMIndex, values: Tensor) -> None:
        self.nm = (index.n, index.m)
        self.values = _frozen(values)
        self.register_buffer("idx", index.idx)
        self.register_buffer("valid", index.valid)

    @classmethod
    def _from_parts(cls, spec: dict, tensors: dict[str, Tensor]) -> InferModule:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ queries

    def index(self) -> CSRIndex | BSRIndex | NMIndex:
        """The index of a csr / bsr / nm layer (cheap: no validation, no copies)."""
        if self.format == "csr":
            return CSRIndex(self.shape2d, self.crow, self.col, self.row, self.ccol, self.row_t, self.perm)
        if self.format == "bsr":
            return BSRIndex(self.shape2d, self.block_shape, self.crow, self.col, self.row, self.ccol, self.row_t,
                            self.perm)
        if self.format == "nm":
            return NMIndex(self.shape2d, self.nm[0], self.nm[1], self.idx, self.valid)
        raise AttributeError("a dense-format layer has no index")

    @torch.no_grad()
    def dense_weight(self) -> Tensor:
        """θ as a dense tensor of the weight's shape (a copy for the sparse formats)."""
        if self.format == "dense":
            return self.weight.detach()
        return self.index().scatter(self.values.detach()).reshape(self.weight_shape)

    @torch.no_grad()
    def mask(self) -> Tensor:
        """bool, weight's shape: the stored pattern (dense format: nonzero θ)."""
        if self.format == "dense":
            return _nonzero_bits(self.weight)
        return self.index().to_mask().reshape(self.weight_shape)

    @property
    def nnz(self) -> int:
        """Nonzero entries of θ (BSR / N:M padding slots hold zeros and do not count)."""
        return int(_nonzero_bits(self.weight if self.format == "dense" else self.values).sum())

    @property
    def density(self) -> float:
        return self.nnz / math.prod(self.weight_shape)

    # ----------------------------------------------------------------------------------- compute

    def _matmul(self, x: Tensor) -> Tensor:
        """y = x θᵀ + b over the (N, K) view of θ; x (..., K) -> (..., N). Not for the dense format of conv."""
        if self.format == "dense":
            p = self._parameters
            w = p["weight"]
            return F.linear(x, w if w.dim() == 2 else w.reshape(self.shape2d), p.get("bias"))
        if self.format in _COMPACT_FORMATS:
            return self._compact(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        semi = self._semi
        if semi is not None and x.device == self.values.device and x.dtype == self.values.dtype:
            y = F.linear(x2, semi, self.bias)
        else:
            y = F.linear(x2, self.index().scatter(self.values), self.bias)
        return y.reshape(*lead, self.shape2d[0])

    def _compact(self, x: Tensor) -> Tensor:
        # Direct dict lookups: nn.Module.__getattr__ costs ~0.6 µs per tensor, as much as a small SpMV.
        p, b = self._parameters, self._buffers
        values, bias = p["values"], p.get("bias")
        n, k = self.shape2d
        if not torch.compiler.is_compiling():
            # Eager: the same backend function the op would run (chosen by ops), without the dispatcher
            # round trip and re-validation of an index this module built and validated itself; at batch 1
            # those cost more than the SpMV.
            infer = ops.infer_entry(values.device, values.dtype)
            if infer is not None:
                # It checks x itself and declines (None) what is the op's: autograd, another device or
                # dtype, a wrong width, an empty x.
                col16 = b.get("col16")
                y = infer(x, values, bias, b["crow"], b["col"] if col16 is None else col16, n, k)
                if y is not None:
                    return y
            elif ops.lean_inference_applies(x, values, bias, k):
                # A 2-D contiguous x goes in as it is: a view costs ~1.5 µs, a tenth of a small layer.
                flat = x.dim() == 2 and x.is_contiguous()
                x2 = x if flat else x.reshape(-1, k).contiguous()
                y = ops.run_unchecked("compact_linear_fwd", x.device, x.dtype, x2, None, values, bias, b["crow"],
                                      b["col"], b["row"], b["ccol"], b["row_t"], b["perm"], n, k)
                return y if flat else y.reshape(*x.shape[:-1], n)
        # The registered op: autograd, torch.compile (fake kernels) and every input check.
        return ops.compact_linear(x, None, values, self.index(), bias)

    # ------------------------------------------------------------------- 2:4 semi-structured cache

    def _refresh_semi(self) -> None:
        self._semi = None
        if self.format != "nm" or self.nm != (2, 4):
            return
        if semi_structured_support(self.values.device, self.values.dtype, self.shape2d):
            return
        from torch.sparse import to_sparse_semi_structured

        dense = self.index().scatter(self.values.detach()).contiguous()
        self._semi = to_sparse_semi_structured(dense)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if getattr(self, "format", None) == "nm":
            self._refresh_semi()  # device or dtype may have changed
        return out

    # ---------------------------------------------------------------------------------- state_dict

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # What the compact file holds (storage_tensors: file size ∝ nnz whatever format runs) plus a record
        # of the format and storage: tensors only, so safetensors / save_pretrained can write it.
        storage, tensors = self.storage_tensors()
        for k, t in tensors.items():
            own = self._parameters.get(k) if keep_vars else None
            destination[prefix + k] = own if own is not None and own.shape == t.shape else t
        destination[prefix + "_extra_state"] = self._record(storage)

    def _record(self, storage: str) -> Tensor:
        bn, bk = self.block_shape or (0, 0)
        n, m = self.nm or (0, 0)
        return records.encode("InferModule", type=type(self).__name__, format=self.format, storage=storage,
                              block_n=bn, block_k=bk, nm_n=n, nm_m=m)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The layer is rebuilt from the stored tensors (any storage, any nnz) by from_file, which validates
        # them; it keeps its own format, device and dtype.
        mine = {k[len(prefix):] for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]}
        if not mine:  # nothing of this layer (its record stands for all of it)
            missing_keys.append(prefix + "_extra_state")
            return
        try:
            storage, rec = self._stored_storage(state_dict.get(prefix + "_extra_state"), mine)
        except ValueError as e:
            error_msgs.append(f"{prefix or 'model'}: {e}")
            return
        needed = list(_STORAGE_KEYS[storage]) + (["bias"] if "bias" in mine or self.bias is not None else [])
        absent = [k for k in needed if k not in mine]
        if absent:
            missing_keys.extend(prefix + k for k in absent)
            return
        if strict:
            unexpected_keys.extend(prefix + k for k in sorted(mine - set(needed) - {"_extra_state"}))
        spec = self.file_spec()
        if storage == "bsr" and rec is not None:
            spec["block_shape"] = [rec["block_n"], rec["block_k"]]
        if storage == "nm" and rec is not None:
            spec["nm"] = [rec["nm_n"], rec["nm_m"]]
        spec["bias"] = "bias" in needed
        try:
            new = type(self).from_file(spec, storage, {k: state_dict[prefix + k] for k in needed})
        except (ValueError, KeyError, TypeError) as e:
            error_msgs.append(f"{prefix or 'model'}: cannot load the stored layer: {e}")
            return
        ref = self.weight if self.format == "dense" else self.values
        self._take_storage(new.to(device=ref.device, dtype=ref.dtype))

    def _stored_storage(self, record: Tensor | None, keys: set[str]) -> tuple[str, dict | None]:
        """(storage of the state dict, its record or None) for this layer's keys (state dicts written before
        records existed: told apart by their keys)."""
        if record is not None:
            _, rec = records.decode(record, "InferModule")
            if rec["type"] != type(self).__name__:
                raise ValueError(f"the checkpoint holds an {rec['type']}, this layer is an "
                                 f"{type(self).__name__}")
            return rec["storage"], rec
        if "weight" in keys:
            return "dense", None
        if "idx" in keys:
            return "nm", None
        return (self.format if self.format in ("csr", "bsr") else "csr"), None

    def _take_storage(self, new: InferModule) -> None:
        """Adopt ``new``'s tensors and format (the module object, its hooks and mode stay)."""
        for name in ("weight", "values", "bias"):
            self._parameters.pop(name, None)
        for name in ("crow", "col", "col16", "idx", "valid") + _DERIVED:
            self._buffers.pop(name, None)
            self._non_persistent_buffers_set.discard(name)
        self._parameters.update(new._parameters)
        self._buffers.update(new._buffers)
        self._non_persistent_buffers_set |= new._non_persistent_buffers_set
        self.format, self.block_shape, self.nm, self._semi = new.format, new.block_shape, new.nm, new._semi

    # ------------------------------------------------------------------------------------- files

    def file_spec(self) -> dict[str, Any]:
        """JSON-able description from which :meth:`from_file` rebuilds this layer (io.save)."""
        spec = {"type": type(self).__name__, "format": self.format, "weight_shape": list(self.weight_shape),
                "dtype": str(self.dtype_of()).replace("torch.", ""), "bias": self.bias is not None}
        if self.block_shape is not None:
            spec["block_shape"] = list(self.block_shape)
        if self.nm is not None:
            spec["nm"] = list(self.nm)
        spec.update(self._arch())
        return spec

    def dtype_of(self) -> torch.dtype:
        return (self.weight if self.format == "dense" else self.values).dtype

    def _arch(self) -> dict[str, Any]:
        return {}

    def storage_tensors(self) -> tuple[str, dict[str, Tensor]]:
        """(storage kind, tensors) to write: the compact form of θ with the fewest bytes.

        The runtime format is kept in :meth:`file_spec`; the dense format is written as CSR when that
        is smaller (file size ∝ nnz whatever format runs).
        """
        out: dict[str, Tensor] = {}
        if self.bias is not None:
            out["bias"] = self.bias.detach()
        if self.format in ("csr", "bsr"):
            out.update(values=self.values.detach(), crow=self.crow, col=self.col)
            return self.format, out
        if self.format == "nm":
            out.update(values=self.values.detach(), idx=self.idx, valid=self.valid)
            return "nm", out
        w = self.weight.detach()
        mask2 = _nonzero_bits(w).reshape(self.shape2d)
        nnz = int(mask2.sum())
        dense_bytes = w.numel() * w.element_size()
        csr_bytes = nnz * (w.element_size() + 4) + (self.shape2d[0] + 1) * 4
        if csr_bytes < dense_bytes:
            index = CSRIndex.from_mask(mask2)
            out.update(values=index.gather(w.reshape(self.shape2d)), crow=index.crow, col=index.col)
            return "csr", out
        out["weight"] = w
        return "dense", out

    @classmethod
    def from_file(cls, spec: dict[str, Any], storage: str, tensors: dict[str, Tensor]) -> InferModule:
        """Rebuild a layer from :meth:`file_spec` and :meth:`storage_tensors` (validated; raises ValueError)."""
        shape = tuple(int(d) for d in spec["weight_shape"])
        shape2d = matrix_shape(shape)
        bias = tensors.get("bias")
        if spec.get("bias") and bias is None:
            raise ValueError("layer has bias=True but its file holds no bias tensor")
        if bias is not None and tuple(bias.shape) != (shape[0],):
            raise ValueError(f"bias must have shape ({shape[0]},), got {tuple(bias.shape)}")
        if storage == "dense":
            theta2 = _need(tensors, "weight", shape).reshape(shape2d)
            mask2 = None
        elif storage in ("csr", "bsr"):
            idx_t = {"crow": tensors.get("crow"), "col": tensors.get("col")}
            if storage == "csr":
                index = CSRIndex.from_tensors(shape2d, idx_t)
            else:
                idx_t["block_shape"] = torch.tensor(spec["block_shape"], dtype=torch.int64)
                index = BSRIndex.from_tensors(shape2d, idx_t)
            values = _need(tensors, "values", (index.nnz,) if storage == "csr" else (index.nnzb, *index.block_shape))
            if bias is not None:
                _check_bias(bias, shape[0], values.dtype)
            if spec["format"] == storage:  # fast path: no dense round trip (big layers)
                mod = cls._blank(spec, bias)
                mod.format, mod.block_shape = storage, getattr(index, "block_shape", None) if storage == "bsr" else None
                mod._set_compact(index, values)
                mod._semi = None
                return mod
            theta2 = index.scatter(values)
            mask2 = index.to_mask()
        elif storage == "nm":
            n, m = (int(v) for v in spec["nm"])
            index = NMIndex.from_tensors(shape2d, {"idx": tensors.get("idx"), "valid": tensors.get("valid"),
                                                   "nm": torch.tensor([n, m])})
            values = _need(tensors, "values", (shape2d[0], shape2d[1] // m * n))
            theta2 = index.scatter(values)
            mask2 = index.to_mask()
        else:
            raise ValueError(f"unknown storage {storage!r}")
        mod = cls._blank(spec, bias)
        mask = None if mask2 is None else mask2.reshape(shape)
        mod._init_storage(theta2.reshape(shape), mask, bias, spec["format"],
                          block_shape=spec.get("block_shape"), nm=tuple(spec.get("nm", (2, 4))))
        return mod

    @classmethod
    def _blank(cls, spec: dict[str, Any], bias: Tensor | None) -> InferModule:
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod._init_arch(spec)
        shape = tuple(int(d) for d in spec["weight_shape"])
        mod.weight_shape = shape
        mod.shape2d = matrix_shape(shape)
        mod.bias = None if bias is None else _frozen(bias)
        mod.block_shape, mod.nm, mod._semi = None, None, None
        return mod

    def _init_arch(self, spec: dict[str, Any]) -> None:
        raise NotImplementedError

    def _fmt_repr(self) -> str:
        extra = f", block_shape={self.block_shape}" if self.block_shape else ""
        extra += f", nm={self.nm[0]}:{self.nm[1]}" if self.nm else ""
        return f"format={self.format}{extra}, density={self.density:.3g}"


def _check_bias(bias, n: int, dtype: torch.dtype) -> None:
    if not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if bias.dtype != dtype:
        raise ValueError(f"bias must have the weight's dtype {dtype}, got {bias.dtype}")


def _need(tensors: dict[str, Tensor], name: str, shape: tuple[int, ...]) -> Tensor:
    t = tensors.get(name)
    if not isinstance(t, Tensor):
        raise ValueError(f"missing tensor {name!r}")  # noqa: TRY004  (a file problem: ValueError)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"tensor {name!r} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    return t


def _nonzero_bits(t: Tensor) -> Tensor:
    """t != 0 by bit pattern: -0.0 counts as stored, so a round trip is bit-exact."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().contiguous().view(ints) != 0


# --------------------------------------------------------------------------------------------------
# Linear
# --------------------------------------------------------------------------------------------------


class InferLinear(InferModule):
    """y = x θᵀ + b with θ (out_features, in_features) in ``format``. x: (..., in) -> (..., out)."""

    def __init__(
        self, theta: Tensor, bias: Tensor | None = None, format: str = "dense", mask: Tensor | None = None,
        block_shape: tuple[int, int] | None = None, nm: tuple[int, int] = (2, 4),
    ) -> None:
        super().__init__()
        if theta.dim() != 2:
            raise ValueError(f"theta must be 2-D (out_features, in_features), got shape {tuple(theta.shape)}")
        self.out_features, self.in_features = int(theta.shape[0]), int(theta.shape[1])
        self._init_storage(theta, mask, bias, format, block_shape, nm)

    def _init_arch(self, spec):
        self.out_features, self.in_features = (int(d) for d in spec["weight_shape"])

    def forward(self, x: Tensor) -> Tensor:
        # csr / bsr straight to the compact path: at batch 1 each Python hop is a few % of the layer
        return self._compact(x) if self.format in _COMPACT_FORMATS else self._matmul(x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self._fmt_repr()}")


# --------------------------------------------------------------------------------------------------
# Conv
# --------------------------------------------------------------------------------------------------


class _InferConvNd(InferModule):
    _nd: int = 2

    def __init__(
        self, theta: Tensor, bias: Tensor | None = None, format: str = "dense", mask: Tensor | None = None, *,
        stride=1, padding=0, dilation=1, groups: int = 1, padding_mode: str = "zeros",
        block_shape: tuple[int, int] | None = None, nm: tuple[int, int] = (2, 4),
    ) -> None:
        super().__init__()
        nd = self._nd
        if theta.dim() != nd + 2:
            raise ValueError(f"theta must be {nd + 2}-D (out, in/groups, *kernel), got shape {tuple(theta.shape)}")
        self._init_arch({
            "weight_shape": list(theta.shape), "stride": stride, "padding": padding, "dilation": dilation,
            "groups": groups, "padding_mode": padding_mode,
        })
        if format != "dense" and self.groups != 1:
            raise ValueError(f"format {format!r} needs groups=1 (im2col over all input channels); this conv has "
                             f"groups={self.groups}: use format 'dense'")
        self._init_storage(theta, mask, bias, format, block_shape, nm)

    def _init_arch(self, spec):
        nd = self._nd
        shape = [int(d) for d in spec["weight_shape"]]
        self.groups = int(spec.get("groups", 1))
        self.out_channels, self.in_channels = shape[0], shape[1] * self.groups
        self.kernel_size = tuple(shape[2:])
        self.stride = _tuple(spec.get("stride", 1), nd, "stride")
        self.dilation = _tuple(spec.get("dilation", 1), nd, "dilation")
        padding = spec.get("padding", 0)
        self.padding = padding if isinstance(padding, str) else _tuple(padding, nd, "padding")
        if isinstance(self.padding, str) and self.padding not in ("same", "valid"):
            raise ValueError(f"padding must be an int, a tuple, 'same' or 'valid', got {self.padding!r}")
        self.padding_mode = spec.get("padding_mode", "zeros")
        if self.padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"padding_mode must be zeros|reflect|replicate|circular, got {self.padding_mode!r}")

    def _arch(self):
        return {"stride": list(self.stride), "dilation": list(self.dilation), "groups": self.groups,
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "padding_mode": self.padding_mode}

    def _explicit_padding(self) -> list[int]:
        """(left, right) per spatial dim, first dim first."""
        if self.padding == "valid":
            return [0] * (2 * self._nd)
        if self.padding == "same":
            out = []
            for d, k in zip(self.dilation, self.kernel_size):
                total = d * (k - 1)
                out += [total // 2, total - total // 2]  # torch puts the odd extra on the right
            return out
        return [p for p in self.padding for _ in range(2)]

    def forward(self, x: Tensor) -> Tensor:
        nd = self._nd
        if x.dim() == nd + 1:  # unbatched, as torch's convolutions accept
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if x.dim() != nd + 2:
            raise ValueError(f"x must be {nd + 2}-D (batch, channels, *spatial) or {nd + 1}-D unbatched, "
                             f"got shape {tuple(x.shape)}")
        pads = self._explicit_padding()
        if self.padding_mode != "zeros" or self.format != "dense":
            if any(pads):
                # F.pad takes the last dim first.
                rev = [v for i in reversed(range(nd)) for v in pads[2 * i: 2 * i + 2]]
                mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
                x = F.pad(x, rev, mode=mode)
            padding: Any = 0
        else:
            padding = self.padding
        if self.format == "dense":
            conv = F.conv1d if nd == 1 else F.conv2d
            return conv(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x must have {self.in_channels} channels, got shape {tuple(x.shape)}")
        # im2col over a 2-D view (conv1d = height 1) then the compact product.
        x4 = x if nd == 2 else x.unsqueeze(2)
        k = self.kernel_size if nd == 2 else (1, self.kernel_size[0])
        s = self.stride if nd == 2 else (1, self.stride[0])
        d = self.dilation if nd == 2 else (1, self.dilation[0])
        b, _, h, w = x4.shape
        ho = (h - d[0] * (k[0] - 1) - 1) // s[0] + 1
        wo = (w - d[1] * (k[1] - 1) - 1) // s[1] + 1
        cols = F.unfold(x4, k, dilation=d, stride=s)  # (B, C·kh·kw, L)
        y = self._matmul(cols.transpose(1, 2))  # (B, L, out)
        y = y.transpose(1, 2)
        return y.reshape(b, self.out_channels, ho, wo) if nd == 2 else y.reshape(b, self.out_channels, wo)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"padding_mode={self.padding_mode}, bias={self.bias is not None}, {self._fmt_repr()}")


def _tuple(v, n: int, name: str) -> tuple[int, ...]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v,) * n
    try:
        t = tuple(int(e) for e in v)
    except TypeError:
        raise ValueError(f"{name} must be an int or a {n}-tuple of ints, got {v!r}") from None
    if len(t) != n:
        raise ValueError(f"{name} must be an int or a {n}-tuple of ints, got {v!r}")
    return t


class InferConv2d(_InferConvNd):
    """Conv2d with θ (out, in/groups, kh, kw) in ``format``."""

    _nd = 2


class InferConv1d(_InferConvNd):
    """Conv1d with θ (out, in/groups, k) in ``format``."""

    _nd = 1


LAYER_TYPES: dict[str, type[InferModule]] = {
    "InferLinear": InferLinear,
    "InferConv1d": InferConv1d,
    "InferConv2d": InferConv2d,
}
