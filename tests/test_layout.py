"""Tests of sparse_engine.layout: hand-written index metadata, round trips, validation, overflow checks."""

import io

import pytest
import torch

from sparse_engine import layout as L
from sparse_engine.layout import BSRIndex, CSRIndex, DenseIndex, NMIndex

I32 = torch.int32


def t32(values):
    return torch.tensor(values, dtype=I32)


def rand_mask(shape, p, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < p


def fresh(shape, *rest):
    # Nonzero everywhere, so a value that lands in the wrong place cannot hide as a zero.
    x = torch.randn(tuple(shape) + rest)
    return x + torch.sign(x) * 0.1 + (x == 0)


# 3x4 with an empty row (1) and an empty column (3).
#     c0 c1 c2 c3
# r0   1  0  1  0
# r1   0  0  0  0
# r2   1  1  1  0
MASK_3x4 = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)


# ------------------------------------------------------------------------------------------------ CSR


def test_csr_hand_3x4():
    c = CSRIndex.from_mask(MASK_3x4)
    assert c.shape == (3, 4)
    # CSR order: (0,0) (0,2) (2,0) (2,1) (2,2)
    assert torch.equal(c.crow, t32([0, 2, 2, 5]))
    assert torch.equal(c.col, t32([0, 2, 0, 1, 2]))
    assert torch.equal(c.row, t32([0, 0, 2, 2, 2]))
    # CSC order: (0,0) (2,0) (2,1) (0,2) (2,2) -> CSR positions 0 2 3 1 4; column 3 empty
    assert torch.equal(c.ccol, t32([0, 2, 3, 5, 5]))
    assert torch.equal(c.row_t, t32([0, 2, 2, 0, 2]))
    assert torch.equal(c.perm, t32([0, 2, 3, 1, 4]))
    for f in ("crow", "col", "row", "ccol", "row_t", "perm"):
        assert getattr(c, f).dtype == I32, f
    assert c.nnz == 5
    assert c.density == pytest.approx(5 / 12)
    dense = torch.arange(12.0).reshape(3, 4)
    vals = c.gather(dense)
    assert torch.equal(vals, torch.tensor([0.0, 2.0, 8.0, 9.0, 10.0]))
    # values[perm] walks column by column: col0 (0, 8), col1 (9), col2 (2, 10)
    assert torch.equal(vals[c.perm.long()], torch.tensor([0.0, 8.0, 9.0, 2.0, 10.0]))
    expected = torch.tensor([[0.0, 0, 2, 0], [0, 0, 0, 0], [8, 9, 10, 0]])
    assert torch.equal(c.scatter(vals), expected)
    assert torch.equal(c.to_mask(), MASK_3x4)
    c.validate()


@pytest.mark.filterwarnings("ignore:Sparse CSC tensor support is in beta")
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (7, 9), (129, 33)])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_csr_round_trip(shape, p):
    mask = rand_mask(shape, p, seed=shape[0] * 1000 + shape[1])
    c = CSRIndex.from_mask(mask)
    c.validate()
    assert c.nnz == int(mask.sum())
    assert torch.equal(c.to_mask(), mask)
    dense = fresh(shape)
    vals = c.gather(dense)
    assert vals.shape == (c.nnz,)
    assert torch.equal(c.scatter(vals), dense * mask)
    # the transpose agrees with torch's own CSC of the same pattern
    csc = mask.float().to_sparse_csc()
    assert torch.equal(c.ccol.long(), csc.ccol_indices())
    assert torch.equal(c.row_t.long(), csc.row_indices())
    assert torch.equal(vals[c.perm.long()], dense.t()[mask.t()])  # column-major order


def test_csr_density_0_and_1():
    z = CSRIndex.from_mask(torch.zeros(3, 5, dtype=torch.bool))
    assert z.nnz == 0 and z.density == 0.0
    assert torch.equal(z.crow, t32([0, 0, 0, 0])) and torch.equal(z.ccol, t32([0] * 6))
    assert torch.equal(z.scatter(torch.zeros(0)), torch.zeros(3, 5))
    z.validate()
    o = CSRIndex.from_mask(torch.ones(2, 3, dtype=torch.bool))
    assert o.density == 1.0
    assert torch.equal(o.crow, t32([0, 3, 6]))
    assert torch.equal(o.col, t32([0, 1, 2, 0, 1, 2]))
    assert torch.equal(o.ccol, t32([0, 2, 4, 6]))
    assert torch.equal(o.row_t, t32([0, 1, 0, 1, 0, 1]))
    assert torch.equal(o.perm, t32([0, 3, 1, 4, 2, 5]))
    o.validate()


def test_csr_trailing_dims_gather_scatter():
    c = CSRIndex.from_mask(MASK_3x4)
    dense = fresh((3, 4), 2)
    vals = c.gather(dense)
    assert vals.shape == (5, 2)
    assert torch.equal(c.scatter(vals), dense * MASK_3x4[:, :, None])


def test_csr_bad_inputs():
    with pytest.raises(ValueError, match="mask"):
        CSRIndex.from_mask(MASK_3x4.float())
    with pytest.raises(ValueError, match="mask"):
        CSRIndex.from_mask(torch.ones(2, 3, 4, dtype=torch.bool))
    c = CSRIndex.from_mask(MASK_3x4)
    with pytest.raises(ValueError, match="dense"):
        c.gather(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="values"):
        c.scatter(torch.zeros(4))


def _corrupt_cases():
    # (field, corrupted tensor) for MASK_3x4; each breaks exactly one field.
    return [
        ("crow", t32([0, 2, 1, 5])),  # not monotone
        ("crow", t32([0, 2, 2, 4])),  # crow[-1] != nnz
        ("crow", t32([1, 2, 2, 5])),  # crow[0] != 0
        ("crow", torch.tensor([0, 2, 2, 5])),  # int64
        ("col", t32([0, 2, 0, 1, 4])),  # out of range
        ("col", t32([2, 0, 0, 1, 2])),  # not increasing within row 0
        ("col", t32([0, 2, 0, 1, 1])),  # duplicate within row 2
        ("row", t32([0, 0, 1, 2, 2])),
        ("ccol", t32([0, 2, 3, 4, 5])),
        ("row_t", t32([0, 2, 2, 2, 0])),
        ("perm", t32([0, 2, 3, 4, 1])),
        ("perm", t32([0, 2, 3, 1, 9])),
        ("perm", t32([0, 2, 3, 1])),  # wrong length
    ]


@pytest.mark.parametrize("field,bad", _corrupt_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_csr_validate_catches_corruption(field, bad):
    c = CSRIndex.from_mask(MASK_3x4)
    setattr(c, field, bad)
    with pytest.raises(ValueError, match=field):
        c.validate()


def test_csr_serialise_round_trip_and_file_size():
    c = CSRIndex.from_mask(MASK_3x4)
    stored = c.tensors()
    assert set(stored) == {"crow", "col"}
    back = CSRIndex.from_tensors((3, 4), stored)
    for f in ("crow", "col", "row", "ccol", "row_t", "perm"):
        assert torch.equal(getattr(back, f), getattr(c, f)), f
    back2 = CSRIndex.from_tensors((3, 4), c.tensors(full=True))
    assert torch.equal(back2.perm, c.perm)
    bad = c.tensors(full=True)
    bad["perm"] = t32([0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="perm"):
        CSRIndex.from_tensors((3, 4), bad)
    with pytest.raises(ValueError, match="col"):
        CSRIndex.from_tensors((3, 4), {"crow": c.crow, "col": t32([0, 2, 0, 1, 7])})
    with pytest.raises(ValueError, match="crow"):
        CSRIndex.from_tensors((4, 4), stored)  # wrong number of rows

    # A compact file at 90 % sparsity must be at most 0.25x the dense fp32 file.
    shape = (512, 512)
    mask = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    chosen = torch.randperm(mask.numel(), generator=torch.Generator().manual_seed(0))[: mask.numel() // 10]
    mask[chosen] = True
    mask = mask.reshape(shape)
    w = fresh(shape)
    big = CSRIndex.from_mask(mask)

    def size(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.tell()

    compact = size({"values": big.gather(w), **big.tensors()})
    dense = size({"weight": w})
    assert compact <= 0.25 * dense, (compact, dense)


def test_to_device_keeps_fields():
    c = CSRIndex.from_mask(MASK_3x4).to("cpu")
    c.validate()
    b = BSRIndex.from_mask(MASK_3x4, (2, 2)).to("cpu")
    b.validate()
    n = NMIndex.from_mask(torch.tensor([[1, 0, 1, 0]], dtype=torch.bool)).to("cpu")
    n.validate()


# ------------------------------------------------------------------------------------------------ int32


def test_check_int32():
    assert L.check_int32("nnz", 2**31 - 1) == 2**31 - 1
    assert L.check_int32("nnz", 0) == 0
    with pytest.raises(ValueError, match="nnz"):
        L.check_int32("nnz", 2**31)
    with pytest.raises(ValueError, match="nnz"):
        L.check_int32("nnz", -1)


def test_int32_overflow_raises_before_allocating():
    # Zero-element masks with a huge dimension cost no memory; the check must fire before any work.
    with pytest.raises(ValueError, match=r"mask\.shape\[0\]"):
        CSRIndex.from_mask(torch.empty((2**31, 0), dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask\.shape\[1\]"):
        CSRIndex.from_mask(torch.empty((0, 2**31), dtype=torch.bool))
    with pytest.raises(ValueError, match=r"shape\[1\]"):
        CSRIndex.from_tensors((1, 2**31), {"crow": t32([0, 0]), "col": t32([])})


# ------------------------------------------------------------------------------------------------ BSR

# 3x4 with 2x2 blocks: block grid 2x2, bottom row of blocks is half height.
#     c0 c1 | c2 c3
# r0   0  0 |  1  0
# r1   0  0 |  0  1
# ----------+------
# r2   1  0 |  0  0
MASK_BSR = torch.tensor([[0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]], dtype=torch.bool)


def test_bsr_hand_3x4():
    b = BSRIndex.from_mask(MASK_BSR, (2, 2))
    assert b.shape == (3, 4) and b.block_shape == (2, 2) and b.grid == (2, 2)
    assert torch.equal(b.block_mask(), torch.tensor([[0, 1], [1, 0]], dtype=torch.bool))
    assert torch.equal(b.crow, t32([0, 1, 2]))
    assert torch.equal(b.col, t32([1, 0]))
    assert torch.equal(b.row, t32([0, 1]))
    assert torch.equal(b.ccol, t32([0, 1, 2]))
    assert torch.equal(b.row_t, t32([1, 0]))
    assert torch.equal(b.perm, t32([1, 0]))
    assert b.nnzb == 2
    assert b.nnz == 6  # one full 2x2 block + one half (1x2) edge block
    assert b.density == pytest.approx(6 / 12)
    assert b.block_density == pytest.approx(2 / 4)
    dense = torch.arange(1.0, 13.0).reshape(3, 4)
    vals = b.gather(dense)
    expected = torch.tensor([[[3.0, 4.0], [7.0, 8.0]], [[9.0, 10.0], [0.0, 0.0]]])  # edge padded with 0
    assert torch.equal(vals, expected)
    expected_mask = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(b.to_mask(), expected_mask)
    assert torch.equal(b.scatter(vals), dense * b.to_mask())
    b.validate()


def test_bsr_transpose_hand():
    # block mask 2x3:  [1 0 1]
    #                  [1 1 0]
    bm = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    b = BSRIndex.from_block_mask(bm, (2, 3), (4, 9))
    assert torch.equal(b.crow, t32([0, 2, 4]))
    assert torch.equal(b.col, t32([0, 2, 0, 1]))
    assert torch.equal(b.ccol, t32([0, 2, 3, 4]))
    assert torch.equal(b.row_t, t32([0, 1, 1, 0]))
    assert torch.equal(b.perm, t32([0, 2, 3, 1]))
    b.validate()


@pytest.mark.parametrize(
    "shape,block", [((7, 9), (4, 4)), ((1, 1), (16, 16)), ((129, 33), (16, 32)), ((8, 8), (4, 2))]
)
@pytest.mark.parametrize("p", [0.0, 0.05, 0.5, 1.0])
def test_bsr_round_trip(shape, block, p):
    mask = rand_mask(shape, p, seed=7)
    b = BSRIndex.from_mask(mask, block)
    b.validate()
    full = b.to_mask()
    # every active element is covered; a block is stored iff it holds an active element
    assert not bool((mask & ~full).any())
    assert torch.equal(BSRIndex.from_mask(full, block).block_mask(), b.block_mask())
    assert b.nnz == int(full.sum())
    dense = fresh(shape)
    vals = b.gather(dense)
    assert vals.shape == (b.nnzb,) + tuple(block)
    assert torch.equal(b.scatter(vals), dense * full)
    # padding outside the matrix is zero
    padded = torch.zeros(b.grid[0] * block[0], b.grid[1] * block[1])
    padded[: shape[0], : shape[1]] = 1
    pad_blocks = L.to_blocks(padded, block)[b.row.long(), b.col.long()]
    assert torch.all(vals[pad_blocks == 0] == 0)


def test_bsr_edge_blocks_7x9():
    mask = torch.zeros(7, 9, dtype=torch.bool)
    mask[6, 8] = True  # only the bottom-right corner block (3x1 inside the matrix)
    b = BSRIndex.from_mask(mask, (4, 4))
    assert b.grid == (2, 3)
    assert torch.equal(b.crow, t32([0, 0, 1])) and torch.equal(b.col, t32([2]))
    assert b.nnz == 3 * 1
    dense = fresh((7, 9))
    vals = b.gather(dense)
    assert vals.shape == (1, 4, 4)
    assert torch.equal(vals[0, :3, :1], dense[4:7, 8:9])
    assert int((vals[0] != 0).sum()) == 3
    # scatter drops whatever sits in the padding
    junk = vals.clone()
    junk[0, 3, :] = 5.0
    junk[0, :, 1:] = 5.0
    assert torch.equal(b.scatter(junk), dense * b.to_mask())


def test_bsr_bad_inputs_and_validate():
    with pytest.raises(ValueError, match="block_shape"):
        BSRIndex.from_mask(MASK_BSR, (0, 2))
    with pytest.raises(ValueError, match="block_shape"):
        BSRIndex.from_mask(MASK_BSR, (2,))
    with pytest.raises(ValueError, match="block_mask"):
        BSRIndex.from_block_mask(torch.ones(3, 3, dtype=torch.bool), (2, 2), (3, 4))
    b = BSRIndex.from_mask(MASK_BSR, (2, 2))
    with pytest.raises(ValueError, match="values"):
        b.scatter(torch.zeros(2, 2, 3))
    for field, bad in [
        ("crow", t32([0, 1, 1])),
        ("col", t32([1, 2])),
        ("row", t32([0, 0])),
        ("ccol", t32([0, 0, 2])),
        ("row_t", t32([0, 1])),
        ("perm", t32([0, 1])),
    ]:
        c = BSRIndex.from_mask(MASK_BSR, (2, 2))
        setattr(c, field, bad)
        with pytest.raises(ValueError, match=field):
            c.validate()


def test_bsr_serialise():
    b = BSRIndex.from_mask(MASK_BSR, (2, 2))
    back = BSRIndex.from_tensors((3, 4), b.tensors())
    assert back.block_shape == (2, 2)
    for f in ("crow", "col", "row", "ccol", "row_t", "perm"):
        assert torch.equal(getattr(back, f), getattr(b, f)), f


# ------------------------------------------------------------------------------------------------ N:M


def test_nm_hand_2x8():
    # row 0: group 0 keeps {0, 2}; group 1 keeps {3} only -> spare slot at position 0, invalid
    # row 1: group 0 empty -> slots {0, 1} both invalid; group 1 keeps {0, 1}
    mask = torch.tensor([[1, 0, 1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    nm = NMIndex.from_mask(mask, n=2, m=4)
    assert nm.idx.dtype == torch.uint8
    assert torch.equal(nm.idx, torch.tensor([[0, 2, 0, 3], [0, 1, 0, 1]], dtype=torch.uint8))
    assert torch.equal(nm.valid, torch.tensor([[1, 1, 0, 1], [0, 0, 1, 1]], dtype=torch.bool))
    assert nm.nnz == 5 and nm.density == pytest.approx(5 / 16)
    dense = torch.arange(1.0, 17.0).reshape(2, 8)
    vals = nm.gather(dense)
    assert torch.equal(vals, torch.tensor([[1.0, 3.0, 0.0, 8.0], [0.0, 0.0, 13.0, 14.0]]))
    assert torch.equal(nm.scatter(vals), dense * mask)
    assert torch.equal(nm.to_mask(), mask)
    nm.validate()


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (1, 1)])
@pytest.mark.parametrize("rows", [1, 7, 129])
def test_nm_round_trip(n, m, rows):
    g = torch.Generator().manual_seed(rows)
    k = 3 * m
    # random n:m (or sparser) pattern: keep the n smallest of random keys, then drop some
    keys = torch.rand(rows, k // m, m, generator=g)
    keep = keys <= keys.kthvalue(n, dim=2, keepdim=True).values
    keep &= torch.rand(keep.shape, generator=g) < 0.8
    mask = keep.reshape(rows, k)
    nm = NMIndex.from_mask(mask, n, m)
    nm.validate()
    assert torch.equal(nm.to_mask(), mask)
    dense = fresh((rows, k))
    vals = nm.gather(dense)
    assert vals.shape == (rows, k // m * n)
    assert torch.equal(nm.scatter(vals), dense * mask)
    back = NMIndex.from_tensors((rows, k), nm.tensors())
    assert torch.equal(back.idx, nm.idx) and torch.equal(back.valid, nm.valid)


def test_nm_errors():
    with pytest.raises(ValueError, match="m"):
        NMIndex.from_mask(torch.ones(2, 6, dtype=torch.bool) & False, 2, 4)
    too_many = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match="mask"):
        NMIndex.from_mask(too_many, 2, 4)
    with pytest.raises(ValueError, match="n"):
        NMIndex.from_mask(torch.zeros(1, 4, dtype=torch.bool), 5, 4)
    nm = NMIndex.from_mask(torch.tensor([[1, 0, 1, 0]], dtype=torch.bool))
    for field, bad in [
        ("idx", torch.tensor([[2, 0]], dtype=torch.uint8)),  # not increasing
        ("idx", torch.tensor([[0, 4]], dtype=torch.uint8)),  # out of range
        ("idx", torch.tensor([[0, 2]], dtype=torch.int32)),
        ("valid", torch.tensor([[1, 1, 0]], dtype=torch.bool)),
    ]:
        c = NMIndex.from_mask(torch.tensor([[1, 0, 1, 0]], dtype=torch.bool))
        setattr(c, field, bad)
        with pytest.raises(ValueError, match=field):
            c.validate()
    nm.validate()


# ------------------------------------------------------------------- dense / check_mask / convert


def test_check_mask():
    m = torch.ones(3, 4, dtype=torch.bool)
    assert L.check_mask(m, (3, 4)) is m
    with pytest.raises(ValueError, match="mask"):
        L.check_mask(m, (4, 3))
    with pytest.raises(ValueError, match="mask"):
        L.check_mask(m.float(), (3, 4))
    with pytest.raises(ValueError, match="mask"):
        L.check_mask([[True]], (1, 1))


def test_matrix_view_conv():
    w = torch.randn(8, 3, 3, 3)
    assert L.matrix_shape(w.shape) == (8, 27)
    assert L.matrix_view(w).shape == (8, 27)
    with pytest.raises(ValueError, match="shape"):
        L.matrix_shape((5,))


def test_dense_index():
    d = DenseIndex.from_mask(MASK_3x4)
    w = fresh((3, 4))
    assert torch.equal(d.gather(w), w * MASK_3x4)
    assert d.nnz == 5
    back = DenseIndex.from_tensors((3, 4), d.tensors())
    assert torch.equal(back.mask, MASK_3x4)


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_convert_csr_bsr_dense(p):
    shape = (7, 9)
    mask = rand_mask(shape, p, seed=3)
    w = fresh(shape)
    csr = CSRIndex.from_mask(mask)
    bsr = BSRIndex.from_mask(mask, (4, 4))
    dense = DenseIndex.from_mask(mask)
    v_csr = csr.gather(w)
    v_bsr = L.convert(v_csr, csr, bsr)
    assert torch.equal(bsr.scatter(v_bsr), w * mask)  # extra block slots hold zeros
    # BSR -> CSR needs a CSR pattern that covers every element of the active blocks
    csr_full = CSRIndex.from_mask(bsr.to_mask())
    v_back = L.convert(v_bsr, bsr, csr_full)
    assert torch.equal(csr_full.scatter(v_back), w * mask)
    assert torch.equal(L.convert(v_csr, csr, dense), w * mask)
    assert torch.equal(L.convert(w * mask, dense, csr), v_csr)
    if 0 < p < 1:
        assert not torch.equal(bsr.to_mask(), mask)  # the blocks cover more than the pattern
        with pytest.raises(ValueError, match="index_to"):
            L.convert(v_bsr, bsr, csr)


def test_convert_nm():
    mask = torch.tensor([[1, 0, 1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    w = fresh((2, 8))
    nm = NMIndex.from_mask(mask)
    csr = CSRIndex.from_mask(mask)
    v_nm = L.convert(csr.gather(w), csr, nm)
    assert torch.equal(v_nm, nm.gather(w))
    assert torch.equal(L.convert(v_nm, nm, csr), csr.gather(w))
    # a 3-of-4 pattern cannot be stored as 2:4
    wide = CSRIndex.from_mask(torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="index_to"):
        L.convert(wide.gather(w), wide, nm)
    with pytest.raises(ValueError, match="index_to"):
        L.convert(csr.gather(w), csr, CSRIndex.from_mask(torch.ones(2, 4, dtype=torch.bool)))


def test_make_index():
    assert isinstance(L.make_index(MASK_3x4, "csr"), CSRIndex)
    assert isinstance(L.make_index(MASK_3x4, "bsr", block_shape=(2, 2)), BSRIndex)
    assert isinstance(L.make_index(MASK_3x4, "dense"), DenseIndex)
    with pytest.raises(ValueError, match="layout"):
        L.make_index(MASK_3x4, "coo")


def test_deterministic_build():
    mask = rand_mask((129, 65), 0.2, seed=11)
    a, b = CSRIndex.from_mask(mask), CSRIndex.from_mask(mask.clone())
    for f in ("crow", "col", "row", "ccol", "row_t", "perm"):
        assert torch.equal(getattr(a, f), getattr(b, f))


@pytest.mark.gpu
def test_cuda_build_matches_cpu():
    # Device independence: the same mask gives bit-identical indices and values on CUDA and CPU.
    mask = rand_mask((129, 200), 0.3, seed=5)
    w = fresh((129, 200))
    for make in (
        CSRIndex.from_mask,
        lambda m: BSRIndex.from_mask(m, (16, 32)),
        lambda m: DenseIndex.from_mask(m),
    ):
        cpu, gpu = make(mask), make(mask.cuda())
        gpu.validate()
        for name, t in cpu.tensors().items():
            assert torch.equal(gpu.tensors()[name].cpu(), t), name
        assert torch.equal(gpu.gather(w.cuda()).cpu(), cpu.gather(w))
        assert torch.equal(gpu.to_mask().cpu(), cpu.to_mask())
    nm_mask = torch.zeros(129, 200, dtype=torch.bool)
    nm_mask[:, ::4] = True
    nm_mask[:, 2::4] = rand_mask((129, 50), 0.5, seed=1)
    cpu, gpu = NMIndex.from_mask(nm_mask), NMIndex.from_mask(nm_mask.cuda())
    assert torch.equal(gpu.idx.cpu(), cpu.idx) and torch.equal(gpu.valid.cpu(), cpu.valid)
    assert torch.equal(gpu.scatter(gpu.gather(w.cuda())).cpu(), w * nm_mask)
