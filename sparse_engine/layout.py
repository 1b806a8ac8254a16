"""Weight layouts and their index metadata.

A weight is a 2-D matrix (N = out_features, K = in_features); a Conv weight (out, in/groups, kh, kw) is
viewed as (out, in/groups*kh*kw) with :func:`matrix_view`. Four layouts describe which coordinates of
that matrix are stored:

* :class:`DenseIndex`  dense storage plus a bool mask (PILoT, low sparsity).
* :class:`CSRIndex`    compressed rows of single elements, plus the transpose (CSC order) that the dX
  pass needs, built once per mask.
* :class:`BSRIndex`    compressed rows of (bn, bk) blocks; the edges may be partial blocks.
* :class:`NMIndex`     N:M along K (e.g. 2:4): exactly n slots in every group of m inputs.

Every index is built once from a mask and reused for every step, so building may be a little slow but
must be vectorised (no Python loops over rows or elements). Index tensors are int32 because storage size
matters (a compact file at 90 % sparsity must stay under a quarter of dense fp32); anything that would
overflow int32 raises a ``ValueError`` naming what overflowed.

Every index has the same small interface: ``from_mask``, ``gather(dense) -> values``,
``scatter(values) -> dense``, ``to_mask()``, ``nnz``, ``density``, ``to(device)``, ``tensors()`` /
``from_tensors(shape, tensors)`` for files, and ``validate()``. :func:`convert` moves values between
layouts through the mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .checks import check_positive_int

__all__ = [
    "INT32_MAX",
    "INDEX_DTYPE",
    "FORMATS",
    "LAYOUTS",
    "check_block_shape",
    "check_int32",
    "check_mask",
    "matrix_shape",
    "matrix_view",
    "block_grid",
    "to_blocks",
    "reduce_to_blocks",
    "expand_block_mask",
    "DenseIndex",
    "CSRIndex",
    "BSRIndex",
    "NMIndex",
    "make_index",
    "convert",
]

INT32_MAX = 2**31 - 1
INDEX_DTYPE = torch.int32
#: how a stored weight's index lays out its active entries (make_index; the inference layers' formats)
FORMATS = ("dense", "csr", "bsr", "nm")
#: what a training layer (sparse_engine.nn) computes with: a dense weight times its mask, the block-sparse
#: matmuls over a dense weight with a block mask ("block"), the compact csr / bsr storage, or "auto"
#: (measured per layer). Here, not in nn, so that a method config can check it without loading the ops.
LAYOUTS = ("dense", "block", "csr", "bsr", "auto")


# --------------------------------------------------------------------------------------------------
# small checks shared by every layout
# --------------------------------------------------------------------------------------------------


def check_int32(name: str, value: int) -> int:
    """Return ``value`` if it fits an int32 index, else raise ``ValueError`` naming ``name``.

    Called on counts and dimensions *before* anything is allocated, so a huge layer fails fast.
    """
    value = int(value)
    if value < 0 or value > INT32_MAX:
        raise ValueError(
            f"{name} = {value} does not fit an int32 index (must be in [0, {INT32_MAX}]); "
            "split the layer or keep it in the dense layout"
        )
    return value


def _check_shape2(name: str, shape) -> tuple[int, int]:
    try:
        dims = tuple(int(d) for d in shape)
    except TypeError:
        raise ValueError(f"{name} must be a 2-tuple of ints, got {shape!r}") from None
    if len(dims) != 2 or any(d < 0 for d in dims):
        raise ValueError(f"{name} must be a 2-tuple of non-negative ints, got {shape!r}")
    return dims


def check_block_shape(block_shape) -> tuple[int, int]:
    """``block_shape`` as a pair of positive ints (bn, bk)."""
    try:
        bs = tuple(block_shape)
    except TypeError:
        bs = ()
    if len(bs) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in bs):
        raise ValueError(f"block_shape must be a pair of positive ints, got {block_shape!r}")
    return bs  # type: ignore[return-value]


def _check_2d_bool(name: str, mask) -> Tensor:
    if not isinstance(mask, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must have dtype torch.bool, got {mask.dtype} (convert with {name} != 0)")
    if mask.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (N, K), got shape {tuple(mask.shape)}; view a Conv weight mask as "
            f"{name}.reshape({name}.shape[0], -1)"
        )
    check_int32(f"{name}.shape[0]", mask.shape[0])
    check_int32(f"{name}.shape[1]", mask.shape[1])
    return mask


def check_mask(mask, weight_shape) -> Tensor:
    """Check that ``mask`` is a bool tensor of exactly ``weight_shape``; return it unchanged.

    Strict on dtype on purpose: a float "mask" with values other than 0/1 would silently scale weights.
    """
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must have dtype torch.bool, got {mask.dtype} (convert with mask != 0)")
    expected = tuple(int(d) for d in weight_shape)
    if tuple(mask.shape) != expected:
        raise ValueError(f"mask must have the weight's shape {expected}, got {tuple(mask.shape)}")
    return mask


def matrix_shape(shape) -> tuple[int, int]:
    """(out, prod(rest)) of a weight shape with ndim >= 2: the matrix every layout works on."""
    dims = tuple(int(d) for d in shape)
    if len(dims) < 2:
        raise ValueError(f"shape must have at least 2 dims (a Linear or Conv weight), got {dims}")
    return dims[0], math.prod(dims[1:])


def matrix_view(t: Tensor) -> Tensor:
    """View a weight (out, in, *kernel) as the matrix (out, in*prod(kernel))."""
    if t.ndim < 2:
        raise ValueError(f"t must have at least 2 dims (a Linear or Conv weight), got shape {tuple(t.shape)}")
    return t.reshape(t.shape[0], -1)


# --------------------------------------------------------------------------------------------------
# blocks
# --------------------------------------------------------------------------------------------------


def block_grid(shape, block_shape) -> tuple[int, int]:
    """Number of block rows and block columns, counting partial edge blocks."""
    n, k = _check_shape2("shape", shape)
    bn, bk = check_block_shape(block_shape)
    return -(-n // bn), -(-k // bk)


def to_blocks(dense: Tensor, block_shape) -> Tensor:
    """(N, K, *rest) -> (nbr, nbc, bn, bk, *rest), zero padded at the bottom/right edges.

    Always returns a fresh tensor (never a view of ``dense``).
    """
    if dense.ndim < 2:
        raise ValueError(f"dense must have at least 2 dims, got shape {tuple(dense.shape)}")
    n, k = dense.shape[0], dense.shape[1]
    bn, bk = check_block_shape(block_shape)
    nbr, nbc = -(-n // bn), -(-k // bk)
    rest = tuple(dense.shape[2:])
    if nbr * bn == n and nbc * bk == k:
        padded = dense
    else:
        padded = dense.new_zeros((nbr * bn, nbc * bk) + rest)
        padded[:n, :k] = dense
    return padded.reshape((nbr, bn, nbc, bk) + rest).transpose(1, 2).contiguous()


def _from_blocks(blocks: Tensor, shape: tuple[int, int]) -> Tensor:
    """(nbr, nbc, bn, bk, *rest) -> (N, K, *rest), dropping the padding."""
    nbr, nbc, bn, bk = blocks.shape[:4]
    rest = tuple(blocks.shape[4:])
    full = blocks.transpose(1, 2).reshape((nbr * bn, nbc * bk) + rest)
    return full[: shape[0], : shape[1]].contiguous()


def reduce_to_blocks(mask: Tensor, block_shape) -> Tensor:
    """Element mask (N, K) -> block mask (nbr, nbc): a block is active iff any element in it is."""
    _check_2d_bool("mask", mask)
    return to_blocks(mask, block_shape).any(dim=3).any(dim=2)


def expand_block_mask(block_mask: Tensor, block_shape, shape) -> Tensor:
    """Block mask (nbr, nbc) -> element mask (N, K): blocks expanded, cropped to ``shape``."""
    _check_2d_bool("block_mask", block_mask)
    n, k = _check_shape2("shape", shape)
    bn, bk = check_block_shape(block_shape)
    if tuple(block_mask.shape) != block_grid((n, k), (bn, bk)):
        raise ValueError(
            f"block_mask must have shape {block_grid((n, k), (bn, bk))} for shape {(n, k)} and "
            f"block_shape {(bn, bk)}, got {tuple(block_mask.shape)}"
        )
    full = block_mask.repeat_interleave(bn, dim=0).repeat_interleave(bk, dim=1)
    return full[:n, :k].contiguous()


# --------------------------------------------------------------------------------------------------
# compressed rows (shared by CSR over elements and BSR over blocks)
# --------------------------------------------------------------------------------------------------

_COMPRESSED_FIELDS = ("crow", "col", "row", "ccol", "row_t", "perm")


def _compressed_from_mask(mask: Tensor) -> dict[str, Tensor]:
    """All six index tensors of a bool (R, C) mask, int32."""
    nz = mask.nonzero()  # (nnz, 2), row-major: exactly the CSR order
    check_int32("nnz", nz.shape[0])
    crow = torch.zeros(mask.shape[0] + 1, dtype=torch.int64, device=mask.device)
    torch.cumsum(mask.sum(dim=1), dim=0, out=crow[1:])
    return _finish_compressed(crow, nz[:, 0], nz[:, 1], mask.shape[1])


def _finish_compressed(crow: Tensor, row: Tensor, col: Tensor, ncols: int) -> dict[str, Tensor]:
    """Add the transpose (ccol, row_t, perm) to a row-major (crow, row, col) and cast to int32."""
    # A stable sort by column keeps rows increasing inside each column, i.e. CSC order.
    perm = torch.sort(col, stable=True).indices
    ccol = torch.zeros(ncols + 1, dtype=torch.int64, device=col.device)
    torch.cumsum(torch.bincount(col, minlength=ncols), dim=0, out=ccol[1:])
    out = {"crow": crow, "col": col, "row": row, "ccol": ccol, "row_t": row[perm], "perm": perm}
    return {name: t.to(INDEX_DTYPE) for name, t in out.items()}


def _expected_rows(crow64: Tensor, nrows: int) -> Tensor:
    counts = crow64[1:] - crow64[:-1]
    return torch.repeat_interleave(torch.arange(nrows, device=crow64.device), counts)


def _check_crow_col(crow: Tensor, col: Tensor, nrows: int, ncols: int, where: str) -> Tensor:
    """Structural checks of crow and col; returns the row of each entry (int64)."""
    for name, t in (("crow", crow), ("col", col)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{where}.{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != INDEX_DTYPE:
            raise ValueError(f"{where}.{name} must have dtype {INDEX_DTYPE}, got {t.dtype}")
        if t.ndim != 1:
            raise ValueError(f"{where}.{name} must be 1-D, got shape {tuple(t.shape)}")
    if col.device != crow.device:
        raise ValueError(f"{where}.col is on {col.device} but {where}.crow is on {crow.device}")
    nnz = col.numel()
    if crow.numel() != nrows + 1:
        raise ValueError(f"{where}.crow must have {nrows + 1} entries, got {crow.numel()}")
    crow64 = crow.long()
    if int(crow64[0]) != 0:
        raise ValueError(f"{where}.crow[0] must be 0, got {int(crow64[0])}")
    if bool((crow64[1:] < crow64[:-1]).any()):
        raise ValueError(f"{where}.crow must be non-decreasing")
    if int(crow64[-1]) != nnz:
        raise ValueError(f"{where}.crow[-1] must equal nnz = len(col) = {nnz}, got {int(crow64[-1])}")
    col64 = col.long()
    if nnz and (int(col64.min()) < 0 or int(col64.max()) >= ncols):
        lo, hi = int(col64.min()), int(col64.max())
        raise ValueError(f"{where}.col must lie in [0, {ncols}), got values in [{lo}, {hi}]")
    row = _expected_rows(crow64, nrows)
    if nnz > 1:
        same_row = row[1:] == row[:-1]
        if bool((same_row & (col64[1:] <= col64[:-1])).any()):
            raise ValueError(f"{where}.col must be strictly increasing within each row")
    return row


def _validate_compressed(obj, nrows: int, ncols: int, where: str) -> None:
    for name in _COMPRESSED_FIELDS:
        t = getattr(obj, name)
        if not isinstance(t, Tensor):
            raise ValueError(f"{where}.{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != INDEX_DTYPE:
            raise ValueError(f"{where}.{name} must have dtype {INDEX_DTYPE}, got {t.dtype}")
        if t.ndim != 1:
            raise ValueError(f"{where}.{name} must be 1-D, got shape {tuple(t.shape)}")
        if t.device != obj.crow.device:
            raise ValueError(f"{where}.{name} is on {t.device} but {where}.crow is on {obj.crow.device}")
    row = _check_crow_col(obj.crow, obj.col, nrows, ncols, where)
    nnz = obj.col.numel()
    for name in ("row", "row_t", "perm"):
        if getattr(obj, name).numel() != nnz:
            got = getattr(obj, name).numel()
            raise ValueError(f"{where}.{name} must have nnz = {nnz} entries, got {got}")
    if not torch.equal(obj.row.long(), row):
        raise ValueError(f"{where}.row does not match crow (row[i] must be the row of entry i)")
    # The transpose is unique for a given (crow, col), so rebuild it and compare exactly.
    expected = _finish_compressed(obj.crow.long(), row, obj.col.long(), ncols)
    if obj.ccol.numel() != ncols + 1:
        raise ValueError(f"{where}.ccol must have {ncols + 1} entries, got {obj.ccol.numel()}")
    if not torch.equal(obj.ccol, expected["ccol"]):
        raise ValueError(f"{where}.ccol does not match col (column pointers of the transpose)")
    if not torch.equal(obj.perm, expected["perm"]):
        raise ValueError(f"{where}.perm is not the permutation from CSR order to column-major (CSC) order")
    if not torch.equal(obj.row_t, expected["row_t"]):
        raise ValueError(f"{where}.row_t does not match row[perm]")


def _compressed_from_tensors(tensors: dict, nrows: int, ncols: int, where: str) -> dict[str, Tensor]:
    if not isinstance(tensors, dict) or "crow" not in tensors or "col" not in tensors:
        raise ValueError(f"tensors must be a dict holding at least 'crow' and 'col' for {where}")
    crow, col = tensors["crow"], tensors["col"]
    row = _check_crow_col(crow, col, nrows, ncols, where)
    return _finish_compressed(crow.long(), row, col.long(), ncols)


def _check_derived(built: dict[str, Tensor], given: dict, where: str) -> None:
    """Fields rebuilt from (crow, col) must equal any the file also carried."""
    for name in ("row", "ccol", "row_t", "perm"):
        if name in given:
            t = given[name]
            ref = built[name]
            if not (isinstance(t, Tensor) and t.dtype == INDEX_DTYPE and torch.equal(t.to(ref.device), ref)):
                raise ValueError(f"{where}.{name} in tensors does not match the one rebuilt from crow, col")


def _matrix_shape(shape) -> tuple[int, int]:
    """(N, K) of an index's matrix: non-negative, each within int32."""
    n, k = _check_shape2("shape", shape)
    return check_int32("shape[0]", n), check_int32("shape[1]", k)


class _Index:
    """What every index shares (subclasses have ``shape`` (N, K) and ``nnz``)."""

    @property
    def density(self) -> float:
        numel = self.shape[0] * self.shape[1]
        return self.nnz / numel if numel else 0.0


class _Compressed(_Index):
    """CSR and BSR: the compressed-row fields (_COMPRESSED_FIELDS) over rows of elements or of blocks."""

    @property
    def device(self) -> torch.device:
        return self.crow.device

    def _fields(self, full: bool) -> dict[str, Tensor]:
        """The fields a file stores: crow and col (the rest is rebuilt on load), or all with ``full``."""
        return {f: getattr(self, f) for f in (_COMPRESSED_FIELDS if full else ("crow", "col"))}

    def _moved(self, device) -> dict[str, Tensor]:
        return {f: getattr(self, f).to(device) for f in _COMPRESSED_FIELDS}


# --------------------------------------------------------------------------------------------------
# dense + mask
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False, repr=False)
class DenseIndex(_Index):
    """Dense storage with a bool mask: values are the full (N, K) matrix, zero where the mask is False."""

    shape: tuple[int, int]
    mask: Tensor  # (N, K) bool

    @classmethod
    def from_mask(cls, mask: Tensor) -> "DenseIndex":
        _check_2d_bool("mask", mask)
        return cls(tuple(mask.shape), mask.clone())

    @property
    def nnz(self) -> int:
        return int(self.mask.sum())

    @property
    def device(self) -> torch.device:
        return self.mask.device

    def gather(self, dense: Tensor) -> Tensor:
        """(N, K, *rest) -> (N, K, *rest) with zeros where the mask is off."""
        _check_dense(dense, self.shape, self.device)
        m = self.mask.reshape(self.shape + (1,) * (dense.ndim - 2))
        return torch.where(m, dense, torch.zeros((), dtype=dense.dtype, device=dense.device))

    def scatter(self, values: Tensor) -> Tensor:
        return self.gather(values)

    def to_mask(self) -> Tensor:
        return self.mask.clone()

    def to(self, device) -> "DenseIndex":
        return DenseIndex(self.shape, self.mask.to(device))

    def tensors(self) -> dict[str, Tensor]:
        return {"mask": self.mask}

    @classmethod
    def from_tensors(cls, shape, tensors: dict) -> "DenseIndex":
        shape = _check_shape2("shape", shape)
        if not isinstance(tensors, dict) or "mask" not in tensors:
            raise ValueError("tensors must be a dict holding 'mask' for DenseIndex")
        out = cls(shape, tensors["mask"])
        out.validate()
        return out

    def validate(self) -> None:
        check_mask(self.mask, self.shape)

    def __repr__(self) -> str:
        return f"DenseIndex(shape={self.shape}, nnz={self.nnz}, device={self.device})"


def _check_dense(dense, shape: tuple[int, int], device: torch.device, name: str = "dense") -> None:
    if not isinstance(dense, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(dense).__name__}")
    if dense.ndim < 2 or tuple(dense.shape[:2]) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (+ trailing dims), got {tuple(dense.shape)}")
    if dense.device != device:
        raise ValueError(f"{name} is on {dense.device} but the index is on {device}")


def _check_values(values, lead: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(values, Tensor):
        raise ValueError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if tuple(values.shape[: len(lead)]) != lead or values.ndim < len(lead):
        raise ValueError(f"values must have leading shape {lead}, got {tuple(values.shape)}")
    if values.device != device:
        raise ValueError(f"values is on {values.device} but the index is on {device}")


# --------------------------------------------------------------------------------------------------
# CSR
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False, repr=False)
class CSRIndex(_Compressed):
    """Compressed sparse rows of an (N, K) pattern, with its transpose for the dX pass.

    crow (N+1,), col (nnz,), row (nnz,): CSR order (row-major). ccol (K+1,), row_t (nnz,): CSC order;
    perm (nnz,): ``values[perm]`` lists the CSR-ordered values in column-major order. All int32.
    """

    shape: tuple[int, int]
    crow: Tensor
    col: Tensor
    row: Tensor
    ccol: Tensor
    row_t: Tensor
    perm: Tensor

    @classmethod
    def from_mask(cls, mask: Tensor) -> "CSRIndex":
        """mask: bool (N, K)."""
        _check_2d_bool("mask", mask)
        return cls(tuple(mask.shape), **_compressed_from_mask(mask))

    @property
    def nnz(self) -> int:
        return int(self.col.numel())

    def gather(self, dense: Tensor) -> Tensor:
        """(N, K, *rest) -> values (nnz, *rest) in CSR (row-major) order."""
        _check_dense(dense, self.shape, self.device)
        return dense[self.row.long(), self.col.long()]

    def scatter(self, values: Tensor) -> Tensor:
        """values (nnz, *rest) -> dense (N, K, *rest), zeros elsewhere."""
        _check_values(values, (self.nnz,), self.device)
        out = values.new_zeros(self.shape + tuple(values.shape[1:]))
        out[self.row.long(), self.col.long()] = values
        return out

    def to_mask(self) -> Tensor:
        out = torch.zeros(self.shape, dtype=torch.bool, device=self.device)
        out[self.row.long(), self.col.long()] = True
        return out

    def to(self, device) -> "CSRIndex":
        return CSRIndex(self.shape, **self._moved(device))

    def tensors(self, full: bool = False) -> dict[str, Tensor]:
        """The tensors to store. Only crow and col by default (the rest is rebuilt on load) so that a
        file holds 4 bytes of index per nonzero; ``full=True`` adds the derived fields."""
        return self._fields(full)

    @classmethod
    def from_tensors(cls, shape, tensors: dict) -> "CSRIndex":
        n, k = _matrix_shape(shape)
        built = _compressed_from_tensors(tensors, n, k, "CSRIndex")
        _check_derived(built, tensors, "CSRIndex")
        return cls((n, k), **built)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is inconsistent."""
        n, k = _check_shape2("shape", self.shape)
        _validate_compressed(self, n, k, "CSRIndex")

    def __repr__(self) -> str:
        return f"CSRIndex(shape={self.shape}, nnz={self.nnz}, device={self.device})"


# --------------------------------------------------------------------------------------------------
# BSR
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False, repr=False)
class BSRIndex(_Compressed):
    """Compressed rows of (bn, bk) blocks over an (N, K) matrix; N, K need not divide evenly.

    Block grid (nbr, nbc) = (ceil(N/bn), ceil(K/bk)). crow (nbr+1,), col/row (nnzb,) in block-row-major
    order; ccol (nbc+1,), row_t (nnzb,), perm (nnzb,) describe the transposed (block-CSC) order. Gathered
    values are (nnzb, bn, bk), zero padded where an edge block sticks out of the matrix.
    """

    shape: tuple[int, int]
    block_shape: tuple[int, int]
    crow: Tensor
    col: Tensor
    row: Tensor
    ccol: Tensor
    row_t: Tensor
    perm: Tensor

    @classmethod
    def from_block_mask(cls, block_mask: Tensor, block_shape, shape) -> "BSRIndex":
        """block_mask: bool (nbr, nbc) for a matrix of ``shape`` cut into ``block_shape`` blocks."""
        _check_2d_bool("block_mask", block_mask)
        n, k = _matrix_shape(shape)
        bs = check_block_shape(block_shape)
        grid = block_grid((n, k), bs)
        if tuple(block_mask.shape) != grid:
            raise ValueError(
                f"block_mask must have shape {grid} for shape {(n, k)} and block_shape {bs}, "
                f"got {tuple(block_mask.shape)}"
            )
        return cls((n, k), bs, **_compressed_from_mask(block_mask))

    @classmethod
    def from_mask(cls, mask: Tensor, block_shape) -> "BSRIndex":
        """mask: bool (N, K); a block is active iff any of its elements is."""
        _check_2d_bool("mask", mask)
        bs = check_block_shape(block_shape)
        return cls.from_block_mask(reduce_to_blocks(mask, bs), bs, tuple(mask.shape))

    @property
    def grid(self) -> tuple[int, int]:
        return block_grid(self.shape, self.block_shape)

    @property
    def nnzb(self) -> int:
        """Number of stored blocks."""
        return int(self.col.numel())

    @property
    def nnz(self) -> int:
        """Number of matrix elements covered by the stored blocks (edge blocks count only their part
        inside the matrix), i.e. ``to_mask().sum()`` without building the mask."""
        bn, bk = self.block_shape
        h = (self.shape[0] - self.row.long() * bn).clamp(max=bn)
        w = (self.shape[1] - self.col.long() * bk).clamp(max=bk)
        return int((h * w).sum())

    @property
    def block_density(self) -> float:
        nb = self.grid[0] * self.grid[1]
        return self.nnzb / nb if nb else 0.0

    def block_mask(self) -> Tensor:
        """bool (nbr, nbc)."""
        out = torch.zeros(self.grid, dtype=torch.bool, device=self.device)
        out[self.row.long(), self.col.long()] = True
        return out

    def gather(self, dense: Tensor) -> Tensor:
        """(N, K, *rest) -> values (nnzb, bn, bk, *rest), zero padded at the edges."""
        _check_dense(dense, self.shape, self.device)
        return to_blocks(dense, self.block_shape)[self.row.long(), self.col.long()]

    def scatter(self, values: Tensor) -> Tensor:
        """values (nnzb, bn, bk, *rest) -> dense (N, K, *rest); padding and inactive blocks dropped."""
        _check_values(values, (self.nnzb,) + self.block_shape, self.device)
        blocks = values.new_zeros(self.grid + tuple(values.shape[1:]))
        blocks[self.row.long(), self.col.long()] = values
        return _from_blocks(blocks, self.shape)

    def to_mask(self) -> Tensor:
        """Element mask (N, K): active blocks expanded, cropped to the matrix."""
        return expand_block_mask(self.block_mask(), self.block_shape, self.shape)

    def to(self, device) -> "BSRIndex":
        return BSRIndex(self.shape, self.block_shape, **self._moved(device))

    def tensors(self, full: bool = False) -> dict[str, Tensor]:
        """crow, col and block_shape (int64 pair) by default; ``full=True`` adds the derived fields."""
        out = self._fields(full)
        out["block_shape"] = torch.tensor(self.block_shape, dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, shape, tensors: dict) -> "BSRIndex":
        n, k = _matrix_shape(shape)
        if not isinstance(tensors, dict) or "block_shape" not in tensors:
            raise ValueError("tensors must be a dict holding 'block_shape', 'crow' and 'col' for BSRIndex")
        bs = check_block_shape(tuple(int(v) for v in torch.as_tensor(tensors["block_shape"]).flatten()))
        nbr, nbc = block_grid((n, k), bs)
        built = _compressed_from_tensors(tensors, nbr, nbc, "BSRIndex")
        _check_derived(built, tensors, "BSRIndex")
        return cls((n, k), bs, **built)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is inconsistent."""
        _check_shape2("shape", self.shape)
        check_block_shape(self.block_shape)
        nbr, nbc = self.grid
        _validate_compressed(self, nbr, nbc, "BSRIndex")

    def __repr__(self) -> str:
        return (
            f"BSRIndex(shape={self.shape}, block_shape={self.block_shape}, nnzb={self.nnzb}, "
            f"device={self.device})"
        )


# --------------------------------------------------------------------------------------------------
# N:M
# --------------------------------------------------------------------------------------------------


def _check_nm(n, m) -> tuple[int, int]:
    m = check_positive_int("m", m)
    if m > 256:
        raise ValueError(f"m must be at most 256 (positions are stored as uint8), got {m}")
    n = check_positive_int("n", n)
    if n > m:
        raise ValueError(f"n must be in [1, m] = [1, {m}], got {n}")
    return n, m


@dataclass(eq=False, repr=False)
class NMIndex(_Index):
    """N:M sparsity along K: every group of m consecutive inputs keeps (at most) n.

    Each group has exactly n slots. idx (N, K//m*n) uint8 is the position of each slot inside its group,
    strictly increasing within the group. A group with fewer than n active inputs fills its spare slots
    with its lowest inactive positions and marks them ``valid = False``: their values are stored as zero,
    so a kernel may use every slot, and ``to_mask`` still gives the exact pattern.
    """

    shape: tuple[int, int]
    n: int
    m: int
    idx: Tensor  # (N, K//m*n) uint8
    valid: Tensor  # (N, K//m*n) bool

    @classmethod
    def from_mask(cls, mask: Tensor, n: int = 2, m: int = 4) -> "NMIndex":
        """mask: bool (N, K) with K % m == 0 and at most n active in each group of m."""
        _check_2d_bool("mask", mask)
        n, m = _check_nm(n, m)
        rows, k = mask.shape
        if k % m:
            raise ValueError(f"m = {m} must divide K = mask.shape[1] = {k}")
        groups = mask.reshape(rows, k // m, m)
        counts = groups.sum(dim=2)
        bad = counts > n
        if bool(bad.any()):
            r, g = (int(v) for v in bad.nonzero()[0])
            raise ValueError(
                f"mask is not {n}:{m} sparse: {int(bad.sum())} groups have more than {n} active "
                f"(first: row {r}, columns {g * m}..{g * m + m - 1} have {int(counts[r, g])})"
            )
        pos = torch.arange(m, device=mask.device)
        # Active positions first, then inactive ones, each ascending; keep the first n, re-sort.
        key = torch.where(groups, pos, pos + m)
        chosen = torch.sort(key, dim=2).values[..., :n] % m
        chosen = torch.sort(chosen, dim=2).values
        valid = groups.gather(2, chosen)
        g = k // m
        return cls((rows, k), n, m, chosen.reshape(rows, g * n).to(torch.uint8), valid.reshape(rows, g * n))

    @property
    def groups(self) -> int:
        return self.shape[1] // self.m

    @property
    def nnz(self) -> int:
        return int(self.valid.sum())

    @property
    def device(self) -> torch.device:
        return self.idx.device

    def _slots(self, rest: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        rows, g, n = self.shape[0], self.groups, self.n
        ix = self.idx.long().reshape((rows, g, n) + (1,) * len(rest)).expand((rows, g, n) + rest)
        ok = self.valid.reshape((rows, g, n) + (1,) * len(rest))
        return ix, ok

    def gather(self, dense: Tensor) -> Tensor:
        """(N, K, *rest) -> values (N, K//m*n, *rest); spare slots hold zero."""
        _check_dense(dense, self.shape, self.device)
        rest = tuple(dense.shape[2:])
        ix, ok = self._slots(rest)
        vals = dense.reshape((self.shape[0], self.groups, self.m) + rest).gather(2, ix)
        vals = torch.where(ok, vals, torch.zeros((), dtype=vals.dtype, device=vals.device))
        return vals.reshape((self.shape[0], self.groups * self.n) + rest)

    def scatter(self, values: Tensor) -> Tensor:
        """values (N, K//m*n, *rest) -> dense (N, K, *rest); spare slots dropped."""
        _check_values(values, (self.shape[0], self.groups * self.n), self.device)
        rest = tuple(values.shape[2:])
        ix, ok = self._slots(rest)
        v = values.reshape((self.shape[0], self.groups, self.n) + rest)
        v = torch.where(ok, v, torch.zeros((), dtype=v.dtype, device=v.device))
        out = values.new_zeros((self.shape[0], self.groups, self.m) + rest)
        out.scatter_(2, ix, v)  # positions are distinct within a group: no write conflicts
        return out.reshape(self.shape + rest)

    def to_mask(self) -> Tensor:
        rows = self.shape[0]
        out = torch.zeros((rows, self.groups, self.m), dtype=torch.bool, device=self.device)
        slots = (rows, self.groups, self.n)
        out.scatter_(2, self.idx.long().reshape(slots), self.valid.reshape(slots))
        return out.reshape(self.shape)

    def to(self, device) -> "NMIndex":
        return NMIndex(self.shape, self.n, self.m, self.idx.to(device), self.valid.to(device))

    def tensors(self) -> dict[str, Tensor]:
        return {"idx": self.idx, "valid": self.valid, "nm": torch.tensor([self.n, self.m], dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, shape, tensors: dict) -> "NMIndex":
        n_rows, k = _check_shape2("shape", shape)
        if not isinstance(tensors, dict) or not {"idx", "valid", "nm"} <= set(tensors):
            raise ValueError("tensors must be a dict holding 'idx', 'valid' and 'nm' for NMIndex")
        nm = [int(v) for v in torch.as_tensor(tensors["nm"]).flatten()]
        if len(nm) != 2:
            raise ValueError(f"tensors['nm'] must hold two ints (n, m), got {nm}")
        out = cls((n_rows, k), nm[0], nm[1], tensors["idx"], tensors["valid"])
        out.validate()
        return out

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is inconsistent."""
        rows, k = _check_shape2("shape", self.shape)
        n, m = _check_nm(self.n, self.m)
        if k % m:
            raise ValueError(f"m = {m} must divide K = shape[1] = {k}")
        slots = (rows, k // m * n)
        for name, dtype in (("idx", torch.uint8), ("valid", torch.bool)):
            t = getattr(self, name)
            if not isinstance(t, Tensor):
                raise ValueError(f"NMIndex.{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != dtype:
                raise ValueError(f"NMIndex.{name} must have dtype {dtype}, got {t.dtype}")
            if tuple(t.shape) != slots:
                raise ValueError(f"NMIndex.{name} must have shape {slots}, got {tuple(t.shape)}")
        if self.valid.device != self.idx.device:
            raise ValueError(
                f"NMIndex.valid is on {self.valid.device} but NMIndex.idx is on {self.idx.device}"
            )
        ix = self.idx.long().reshape(rows, k // m, n)
        if ix.numel() and int(ix.max()) >= m:
            raise ValueError(f"NMIndex.idx must lie in [0, {m}), got max {int(ix.max())}")
        if n > 1 and bool((ix[..., 1:] <= ix[..., :-1]).any()):
            raise ValueError("NMIndex.idx must be strictly increasing within each group")

    def __repr__(self) -> str:
        return f"NMIndex(shape={self.shape}, n={self.n}, m={self.m}, nnz={self.nnz}, device={self.device})"


# --------------------------------------------------------------------------------------------------
# conversions
# --------------------------------------------------------------------------------------------------

Index = DenseIndex | CSRIndex | BSRIndex | NMIndex


def make_index(mask: Tensor, layout: str, *, block_shape=None, n: int = 2, m: int = 4) -> Index:
    """Build the index of ``layout`` ("dense", "csr", "bsr", "nm") for a bool (N, K) mask."""
    if layout == "dense":
        return DenseIndex.from_mask(mask)
    if layout == "csr":
        return CSRIndex.from_mask(mask)
    if layout == "bsr":
        if block_shape is None:
            raise ValueError("block_shape is required for layout 'bsr'")
        return BSRIndex.from_mask(mask, block_shape)
    if layout == "nm":
        return NMIndex.from_mask(mask, n, m)
    raise ValueError(f"layout must be one of {FORMATS}, got {layout!r}")


def convert(values: Tensor, index_from: Index, index_to: Index) -> Tensor:
    """Re-lay ``values`` stored under ``index_from`` into the layout of ``index_to``.

    Goes through the dense matrix. Every active coordinate of ``index_from`` must have a slot in
    ``index_to`` (the target may store more, e.g. whole blocks, filled with zeros); otherwise raises,
    because values would be lost.
    """
    for name, idx in (("index_from", index_from), ("index_to", index_to)):
        if not isinstance(idx, (DenseIndex, CSRIndex, BSRIndex, NMIndex)):
            raise ValueError(
                f"{name} must be a DenseIndex, CSRIndex, BSRIndex or NMIndex, got {type(idx).__name__}"
            )
    if tuple(index_from.shape) != tuple(index_to.shape):
        raise ValueError(
            f"index_to has shape {tuple(index_to.shape)} but index_from has {tuple(index_from.shape)}"
        )
    src = index_from.to_mask()
    lost = src & ~index_to.to_mask().to(src.device)
    if bool(lost.any()):
        raise ValueError(
            f"index_to ({type(index_to).__name__}) cannot represent the pattern of index_from "
            f"({type(index_from).__name__}): {int(lost.sum())} active entries have no slot in it"
        )
    return index_to.gather(index_from.scatter(values))
