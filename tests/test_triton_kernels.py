"""Kernel-level tests of the Triton backend: every launcher against its reference, called directly.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1 when no GPU is
visible); tiles are big there because every program instance costs milliseconds. The op tests
(tests/test_<op>.py) cover the same kernels through ``sparse_engine.ops``; this file adds what only a
direct call can reach: explicit tile configs (edge tiles, the transposed-θ variant), strided operands,
the bf16 path (upcast + manual rounding in the interpreter), the multi-tensor and Sign-In variants of
fused_step, index validation and the shape of the launch grids (work ∝ non-empty blocks).

Comparisons: matmul results against the float64 reference on the same inputs with the shared tolerance
table (tests/_tolerances.py); elementwise results against the reference in the same dtype. Tests marked
``gpu`` repeat the checks on CUDA for every autotune config (the autotuner only ever runs one).
"""

from __future__ import annotations

import math

import pytest
import torch

from sparse_engine.ops import reference as R

triton = pytest.importorskip("triton", reason="triton is not installed: no Triton backend to test")

from _tolerances import assert_close, linear_terms_scale  # noqa: E402
from sparse_engine.kernels import _common  # noqa: E402
from sparse_engine.kernels import block_sparse_linear as BSL  # noqa: E402
from sparse_engine.kernels import fused_step as FS  # noqa: E402
from sparse_engine.kernels import masked_linear as ML  # noqa: E402
from sparse_engine.kernels import prune_threshold as PT  # noqa: E402
from sparse_engine.kernels import reparam as RP  # noqa: E402
from sparse_engine.kernels import signin_reset as SR  # noqa: E402

from sparse_engine.layout import BSRIndex

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and not _common.interpreting():
    pytest.skip(
        "no CUDA GPU and TRITON_INTERPRET is not 1: Triton kernels cannot run here", allow_module_level=True
    )

DEV = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _id(d):
    return str(d).replace("torch.", "")


def _mask(shape, density, device=DEV):
    """A bool mask of exactly round(density·numel) ones (density 0 and 1 exact), shuffled."""
    n = math.prod(shape)
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.randperm(n)[: round(density * n)]] = True
    return flat.reshape(shape).to(device)


def _rand(*shape, dtype=torch.float32, device=DEV):
    return torch.randn(*shape, dtype=torch.float32).to(device=device, dtype=dtype)


def _f64(t):
    return None if t is None else t.double()


def _close(actual, expected, dtype, what, elementwise=False, scale=None):
    assert_close(
        actual, expected.to(actual.device), dtype, what, device=actual.device, elementwise=elementwise,
        scale=scale,
    )


# --------------------------------------------------------------------------------------------- reparam


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", [(1, 1), (7, 129), (3, 5, 7)], ids=str)
@pytest.mark.parametrize("density", [None, 0.0, 0.5, 1.0])
@pytest.mark.parametrize("has_m", [True, False])
def test_reparam_matches_reference_exactly(dtype, shape, density, has_m):
    w = _rand(*shape, dtype=dtype)
    m = _rand(*shape, dtype=dtype) if has_m else None
    mask = None if density is None else _mask(shape, density)
    theta = RP.reparam_fwd(m, w, mask)
    # one product rounded once: bit-identical to torch, bf16 included (rounded by hand in the interpreter)
    assert torch.equal(theta, R.reparam_ref(m, w, mask))
    grad = _rand(*shape, dtype=dtype)
    g_m, g_w = RP.reparam_bwd(grad, m, w, mask)
    r_m, r_w = R.reparam_backward_ref(grad, m, w, mask)
    assert (g_m is None) == (r_m is None)
    if g_m is not None:
        assert torch.equal(g_m, r_m)
    assert torch.equal(g_w, r_w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
def test_reparam_strided_operands(dtype):
    w = _rand(129, 7, dtype=dtype).t()  # (7, 129) transposed view
    m = _rand(40, 300, dtype=dtype)[::3, 5:134:1][:7]  # sliced rows
    mask = _mask((129, 7), 0.5).t()
    assert not w.is_contiguous() and not m.is_contiguous()
    assert torch.equal(RP.reparam_fwd(m, w, mask), R.reparam_ref(m, w, mask))
    grad = _rand(129, 7, dtype=dtype).t()
    for a, b in zip(RP.reparam_bwd(grad, m, w, mask), R.reparam_backward_ref(grad, m, w, mask)):
        assert torch.equal(a, b)


def test_reparam_nan_at_pruned_coordinates_does_not_leak():
    w = _rand(33, 65)
    m = _rand(33, 65)
    mask = _mask((33, 65), 0.5)
    w[~mask] = float("nan")
    m[~mask] = float("inf")
    grad = _rand(33, 65)
    grad[~mask] = float("nan")
    theta = RP.reparam_fwd(m, w, mask)
    g_m, g_w = RP.reparam_bwd(grad, m, w, mask)
    for t in (theta, g_m, g_w):
        assert torch.isfinite(t).all()
        assert (t[~mask] == 0).all()


def test_reparam_rejects_bad_inputs():
    w = _rand(4, 5)
    with pytest.raises(ValueError, match="mask must have dtype torch.bool"):
        RP.reparam_fwd(None, w, torch.ones(4, 5, device=DEV))
    with pytest.raises(ValueError, match="m must have shape"):
        RP.reparam_fwd(_rand(5, 4), w, None)
    with pytest.raises(ValueError, match="w must have dtype in"):
        RP.reparam_fwd(None, w.double(), None)


# --------------------------------------------------------------------------------------- masked_linear


def _check_linear(x, m, w, mask, bias, dtype, *, fwd_cfg=None, dx_cfg=None, dt_cfg=None):
    launch, y = ML.prepare_fwd(x, m, w, mask, bias, config=fwd_cfg)
    launch.run()
    x64, m64, w64 = _f64(x), _f64(m), _f64(w)
    # atol from the terms' magnitude: x θᵀ and b can nearly cancel (seed 1948658841 at 1x1x1 in fp16)
    scale = linear_terms_scale(x64, m64, w64, mask, _f64(bias))
    _close(y, R.masked_linear_ref(x64, m64, w64, mask, _f64(bias)), dtype, "y", scale=scale)
    gy = _rand(x.shape[0], w.shape[0], dtype=dtype)
    launch, g_x = ML.prepare_dx(gy, m, w, mask, config=dx_cfg)
    launch.run()
    launch, (g_m, g_w) = ML.prepare_dtheta(gy, x, m, w, mask, config=dt_cfg)
    launch.run()
    r_x, r_m, r_w = R.masked_linear_backward_ref(_f64(gy), x64, m64, w64, mask)
    _close(g_x, r_x, dtype, "g_x")
    _close(g_w, r_w, dtype, "g_w")
    assert (g_m is None) == (m is None)
    if m is not None:
        _close(g_m, r_m, dtype, "g_m")
    if mask is not None:  # pruned coordinates get exactly zero gradient
        assert (g_w[~mask] == 0).all() and (g_m is None or (g_m[~mask] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("bnk", [(1, 1, 1), (7, 129, 33), (130, 70, 129)], ids=str)
@pytest.mark.parametrize("density", [None, 0.0, 0.3, 1.0])
@pytest.mark.parametrize("has_m", [True, False])
def test_masked_linear_matches_reference(dtype, bnk, density, has_m):
    b, n, k = bnk
    w = _rand(n, k, dtype=dtype)
    m = _rand(n, k, dtype=dtype) if has_m else None
    mask = None if density is None else _mask((n, k), density)
    bias = _rand(n, dtype=dtype) if density != 0.3 else None
    _check_linear(_rand(b, k, dtype=dtype), m, w, mask, bias, dtype)


def test_masked_linear_public_entry_points():
    x, w, m = _rand(5, 20), _rand(9, 20), _rand(9, 20)
    mask = _mask((9, 20), 0.5)
    y = ML.masked_linear_fwd(x, m, w, mask, None)
    _close(y, R.masked_linear_ref(_f64(x), _f64(m), _f64(w), mask, None), torch.float32, "y")
    gy = _rand(5, 9)
    got = ML.masked_linear_bwd(gy, x, m, w, mask)
    want = R.masked_linear_backward_ref(_f64(gy), _f64(x), _f64(m), _f64(w), mask)
    for a, b_, what in zip(got, want, ("g_x", "g_m", "g_w")):
        _close(a, b_, torch.float32, what)
    # empty batch: y is (0, N), dθ = 0
    x0 = _rand(0, 20)
    assert ML.masked_linear_fwd(x0, m, w, mask, None).shape == (0, 9)
    g_x, g_m, g_w = ML.masked_linear_bwd(_rand(0, 9), x0, m, w, mask)
    assert g_x.shape == (0, 20) and (g_m == 0).all() and (g_w == 0).all()


_SMALL = [  # tile edge cases: the smallest tl.dot tiles, the transposed-θ variant, non-square tiles
    ML._mm_cfg(16, 16, 16, 4, 1),
    ML._mm_cfg(32, 16, 64, 4, 1, lhs=True),
    ML._mm_cfg(16, 64, 32, 4, 1, lhs=True, group=2),
]


@pytest.mark.parametrize("cfg", range(len(_SMALL)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
def test_masked_linear_tile_configs(cfg, dtype):
    b, n, k = 37, 45, 50  # no tile divides any dim
    w, m = _rand(n, k, dtype=dtype), _rand(n, k, dtype=dtype)
    mask = _mask((n, k), 0.6)
    dt = ML._dt_cfg(16, 32, 16, 4, 1, group=3)
    _check_linear(
        _rand(b, k, dtype=dtype),
        m,
        w,
        mask,
        _rand(n, dtype=dtype),
        dtype,
        fwd_cfg=_SMALL[cfg],
        dx_cfg=_SMALL[cfg],
        dt_cfg=dt,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_id)
def test_masked_linear_strided_operands(dtype):
    n, k, b = 40, 72, 19
    x = _rand(b, 2 * k, dtype=dtype)[:, ::2]  # column stride 2
    w = _rand(k, n, dtype=dtype).t()  # transposed
    m = _rand(n + 5, k, dtype=dtype)[5:]  # row offset
    mask = _mask((k, n), 0.5).t()
    assert not x.is_contiguous() and not w.is_contiguous() and not mask.is_contiguous()
    _check_linear(x, m, w, mask, _rand(2 * n, dtype=dtype)[::2], dtype)


def test_masked_linear_rejects_bad_inputs():
    w = _rand(6, 8)
    with pytest.raises(ValueError, match="x must be 2-D"):
        ML.masked_linear_fwd(_rand(3, 7), None, w, None, None)
    with pytest.raises(ValueError, match="bias must have shape"):
        ML.masked_linear_fwd(_rand(3, 8), None, w, None, _rand(5))
    with pytest.raises(ValueError, match="x must have dtype"):
        ML.masked_linear_fwd(_rand(3, 8, dtype=torch.float16), None, w, None, None)
    with pytest.raises(ValueError, match="grad_y has 2 rows but x has 3"):
        ML.masked_linear_bwd(_rand(2, 6), _rand(3, 8), None, w, None)


def test_fp32_dot_precision_follows_torch_setting():
    """fp32 operands: 3xTF32 (fp32-class) under torch's default "highest", TF32 when the user allows it;
    every launcher passes that choice to the kernel."""
    before = torch.get_float32_matmul_precision()
    try:
        for setting, expected in (("highest", "tf32x3"), ("high", "tf32"), ("medium", "tf32")):
            torch.set_float32_matmul_precision(setting)
            assert _common.dot_precision(torch.float32) == expected
            assert _common.dot_precision(torch.bfloat16) == "ieee"  # ignored for 16-bit operands
            w = torch.empty(64, 32, device="meta")
            x, gy = torch.empty(8, 32, device="meta"), torch.empty(8, 64, device="meta")
            assert ML.prepare_fwd(x, None, w, None, None)[0].args["PREC"] == expected
            assert ML.prepare_dx(gy, None, w, None)[0].args["PREC"] == expected
            assert ML.prepare_dtheta(gy, x, None, w, None)[0].args["PREC"] == expected
    finally:
        torch.set_float32_matmul_precision(before)


def test_tile_offsets_refuse_strides_that_overflow_int32():
    """The dθ epilogues address tiles with int32 offsets from a 64-bit origin: strides whose tile span
    exceeds int32 are refused by name instead of wrapping around (meta tensors: nothing allocated)."""
    ok = torch.empty(64, 32, device="meta")
    huge = torch.empty_strided((64, 32), (2**24, 1), device="meta")  # 255 rows span > 2**31 elements
    x, gy = torch.empty(8, 32, device="meta"), torch.empty(8, 64, device="meta")
    ML.prepare_dtheta(gy, x, None, ok, None)
    with pytest.raises(ValueError, match="^w has strides"):
        ML.prepare_dtheta(gy, x, None, huge, None)
    with pytest.raises(ValueError, match="^m has strides"):
        ML.prepare_dtheta(gy, x, huge, ok, None)
    _common.check_tile_offsets("w", torch.empty_strided((64, 32), (2**23, 1), device="meta"), tile=128)
    with pytest.raises(ValueError, match="^w has strides"):
        _common.check_tile_offsets("w", torch.empty_strided((64, 32), (2**24 + 2**20, 1), device="meta"), tile=128)


# ---------------------------------------------------------------------------------- block_sparse_linear


def _bsr(n, k, bn, bk, density):
    nbr, nbc = -(-n // bn), -(-k // bk)
    blocks = _mask((nbr, nbc), density, device="cpu")
    return BSRIndex.from_block_mask(blocks, (bn, bk), (n, k)).to(DEV)


def _index(idx):
    return (idx.crow, idx.col, idx.row, idx.ccol, idx.row_t, idx.perm)


def _check_bsr(x, m, w, bias, idx, dtype, cfgs=(None, None, None)):
    bn, bk = idx.block_shape
    i = _index(idx)
    launch, y = BSL.prepare_fwd(x, m, w, bias, *i[:5], bn, bk, config=cfgs[0])
    launch.run()
    _close(y, R.block_sparse_linear_ref(_f64(x), _f64(m), _f64(w), _f64(bias), *i, bn, bk), dtype, "y")
    gy = _rand(x.shape[0], w.shape[0], dtype=dtype)
    launch, g_x = BSL.prepare_dx(gy, m, w, *i[:5], bn, bk, config=cfgs[1])
    launch.run()
    launch, (g_m, g_w) = BSL.prepare_dtheta(gy, x, m, w, *i[:5], bn, bk, config=cfgs[2])
    assert launch.grid == (idx.nnzb,)  # SDDMM: one program per non-empty block, nothing else
    launch.run()
    r_x, r_m, r_w = R.block_sparse_linear_backward_ref(_f64(gy), _f64(x), _f64(m), _f64(w), *i, bn, bk)
    _close(g_x, r_x, dtype, "g_x")
    _close(g_w, r_w, dtype, "g_w")
    if m is not None:
        _close(g_m, r_m, dtype, "g_m")
    outside = ~idx.to_mask()
    assert (g_w[outside] == 0).all() and (g_m is None or (g_m[outside] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize(
    "case",
    [  # (B, N, K, bn, bk): odd sizes, edge blocks cropped, non-power-of-two
        (7, 129, 33, 16, 16),
        (1, 64, 64, 64, 64),
        (130, 70, 200, 32, 64),
        (33, 100, 90, 48, 20),
    ],
    ids=str,
)
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("has_m", [True, False])
def test_block_sparse_linear_matches_reference(dtype, case, density, has_m):
    b, n, k, bn, bk = case
    w = _rand(n, k, dtype=dtype)
    m = _rand(n, k, dtype=dtype) if has_m else None
    bias = _rand(n, dtype=dtype) if has_m else None
    _check_bsr(_rand(b, k, dtype=dtype), m, w, bias, _bsr(n, k, bn, bk, density), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
def test_block_sparse_linear_configs_and_strides(dtype):
    n, k, b = 96, 128, 45
    idx = _bsr(n, k, 32, 64, 0.5)
    x = _rand(b, 2 * k, dtype=dtype)[:, ::2]
    w = _rand(k, n, dtype=dtype).t()
    m = _rand(n, k, dtype=dtype)
    spmm = triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=1)
    sddmm = triton.Config({"BLOCK_B": 16}, num_warps=4, num_stages=1)
    _check_bsr(x, m, w, _rand(n, dtype=dtype), idx, dtype, cfgs=(spmm, spmm, sddmm))


def test_block_sparse_linear_empty_rows_write_bias_and_grids_follow_blocks():
    n, k, b = 64, 64, 9
    blocks = torch.zeros(4, 4, dtype=torch.bool)
    blocks[1, 2] = blocks[3, 0] = True  # block rows 0 and 2 empty
    idx = BSRIndex.from_block_mask(blocks, (16, 16), (n, k)).to(DEV)
    x, w, bias = _rand(b, k), _rand(n, k), _rand(n)
    y = BSL.block_sparse_linear_fwd(x, None, w, bias, *_index(idx), 16, 16)
    assert torch.equal(y[:, :16], bias[:16].expand(b, 16))
    assert torch.equal(y[:, 32:48], bias[32:48].expand(b, 16))
    g_x, _, g_w = BSL.block_sparse_linear_bwd(_rand(b, n), x, None, w, *_index(idx), 16, 16)
    assert (g_x[:, 16:32] == 0).all() and (g_x[:, 48:] == 0).all()  # empty block columns
    assert int((g_w != 0).sum()) == 2 * 16 * 16


def test_block_sparse_linear_rejects_bad_index():
    idx = _bsr(32, 32, 16, 16, 0.5)
    x, w = _rand(3, 32), _rand(32, 32)
    i = list(_index(idx))
    with pytest.raises(ValueError, match="block_n must be an int in"):
        BSL.block_sparse_linear_fwd(x, None, w, None, *i, 256, 16)
    bad = list(i)
    bad[0] = bad[0].long()
    with pytest.raises(ValueError, match="crow must have dtype torch.int32"):
        BSL.block_sparse_linear_fwd(x, None, w, None, *bad, 16, 16)
    with pytest.raises(ValueError, match="crow must have 5 entries"):
        BSL.block_sparse_linear_fwd(x, None, w, None, *i, 8, 16)
    assert "block_k" in BSL.unsupported("block_sparse_linear_fwd", (x, None, w, None, *i, 16, 200))
    assert BSL.unsupported("block_sparse_linear_fwd", (x, None, w, None, *i, 16, 16)) == ""


# ----------------------------------------------------------------------------------------- fused_step

_KINDS = [  # (kind, momentum, dampening, nesterov)
    ("sgd", 0.0, 0.0, False),
    ("sgd", 0.9, 0.1, False),
    ("sgd", 0.9, 0.0, True),
    ("adamw", 0.0, 0.0, False),
]


def _hyper(kind, momentum, dampening, nesterov, **over):
    h = dict(
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        beta1=0.9,
        beta2=0.99,
        eps=1e-8,
        weight_decay=0.01,
        alpha=0.002,
        maximize=False,
    )
    h.update(over)
    return h


def _state(shape, dtype, kind, momentum):
    b1 = _rand(*shape, dtype=dtype) if (kind == "adamw" or momentum) else None
    b2 = _rand(*shape, dtype=dtype).abs() if kind == "adamw" else None
    return b1, b2


def _clone(*ts):
    return [None if t is None else t.clone() for t in ts]


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("kind", range(len(_KINDS)))
@pytest.mark.parametrize("step", [1, 4])
@pytest.mark.parametrize("density", [None, 0.0, 0.5, 1.0])
def test_fused_step_matches_reference(dtype, kind, step, density):
    kind, mom, damp, nest = _KINDS[kind]
    shape = (7, 129)
    p, g = _rand(*shape, dtype=dtype), _rand(*shape, dtype=dtype)
    mask = None if density is None else _mask(shape, density)
    if mask is not None:
        g[~mask] = float("nan")  # ignored at pruned coordinates
    b1, b2 = _state(shape, dtype, kind, mom)
    lr = torch.tensor(0.05, device=DEV)
    h = _hyper(kind, mom, damp, nest, maximize=step == 4)
    want = _clone(p, b1, b2)
    R.fused_step_ref(want[0], g, want[1], want[2], mask, lr, step, kind, **h)
    got = _clone(p, b1, b2)
    FS.fused_step(got[0], g, got[1], got[2], mask, lr, step, kind, **h)
    for a, b_, what in zip(got, want, ("param", "buf1", "buf2")):
        if b_ is not None:
            _close(a, b_, dtype, what, elementwise=True)
    if mask is not None:
        assert torch.equal(got[0][~mask], p[~mask])
        assert all(t is None or (t[~mask] == 0).all() for t in got[1:])


@pytest.mark.parametrize("kind", [1, 3])
def test_fused_step_fp32_state_for_bf16_params_and_cpu_lr(kind):
    kind, mom, damp, nest = _KINDS[kind]
    shape = (33, 65)
    p, g = _rand(*shape, dtype=torch.bfloat16), _rand(*shape, dtype=torch.bfloat16)
    b1, b2 = _state(shape, torch.float32, kind, mom)
    lr = torch.tensor(0.01, dtype=torch.float64)  # another dtype, on the CPU
    h = _hyper(kind, mom, damp, nest)
    want, got = _clone(p, b1, b2), _clone(p, b1, b2)
    R.fused_step_ref(want[0], g, want[1], want[2], None, lr, 3, kind, **h)
    FS.fused_step(got[0], g, got[1], got[2], None, lr, 3, kind, **h)
    _close(got[0], want[0], torch.bfloat16, "param", elementwise=True)
    for a, b_ in zip(got[1:], want[1:]):
        if b_ is not None:
            assert a.dtype == torch.float32
            _close(a, b_, torch.float32, "state", elementwise=True)


def test_fused_step_strided_and_non_viewable_params():
    h = _hyper("adamw", 0.0, 0.0, False)
    lr = torch.tensor(0.05, device=DEV)
    for make in (lambda: _rand(40, 30).t(), lambda: _rand(5, 6, 7).permute(2, 0, 1)):
        p, g, b1, b2 = make(), make(), make(), make().abs()
        mask = _mask(tuple(p.shape), 0.5)
        want, got = _clone(p, b1, b2), [p, b1, b2]  # in place on the strided originals
        R.fused_step_ref(want[0], g, want[1], want[2], mask, lr, 2, "adamw", **h)
        FS.fused_step(p, g, b1, b2, mask, lr, 2, "adamw", **h)
        for a, b_ in zip(got, want):
            _close(a, b_, torch.float32, "strided", elementwise=True)


def test_fused_step_multi_matches_per_tensor_reference():
    lr = torch.tensor(0.02, device=DEV)
    shapes = [(3,), (70, 5), (1,), (0,), (3000,), (17, 3)]
    dtypes = [torch.float32, torch.float16, torch.float32, torch.float32, torch.float32, torch.bfloat16]
    for kind, mom, damp, nest in _KINDS:
        for step in (1, 2):
            ps = [_rand(*s, dtype=d) for s, d in zip(shapes, dtypes)]
            gs = [_rand(*s, dtype=d) for s, d in zip(shapes, dtypes)]
            states = [_state(s, d, kind, mom) for s, d in zip(shapes, dtypes)]
            masks = [None, _mask((70, 5), 0.3), None, None, _mask((3000,), 0.5), None]
            wds = [0.0, 0.01, 0.1, 0.0, 0.05, 0.0]
            alphas = [0.0, 0.0, 0.001, 0.0, 0.0, 0.003]
            want = [_clone(p, *st) for p, st in zip(ps, states)]
            for i, wnt in enumerate(want):
                h = _hyper(kind, mom, damp, nest, weight_decay=wds[i], alpha=alphas[i])
                R.fused_step_ref(wnt[0], gs[i], wnt[1], wnt[2], masks[i], lr, step, kind, **h)
            got = [_clone(p, *st) for p, st in zip(ps, states)]
            h = _hyper(kind, mom, damp, nest, weight_decay=wds, alpha=alphas)
            need1, need2 = states[0][0] is not None, states[0][1] is not None
            FS.fused_step_multi(
                [t[0] for t in got],
                gs,
                [t[1] for t in got] if need1 else None,
                [t[2] for t in got] if need2 else None,
                masks,
                lr,
                step,
                kind,
                **h,
            )
            for i, (a, b_) in enumerate(zip(got, want)):
                # atol relative to the inputs too: AdamW's buf1 of the 1-element tensor can be a
                # near-cancellation of β1·m and (1-β1)·g, far smaller than either
                inputs = [t for t in (ps[i], gs[i], *states[i]) if t is not None and t.numel()]
                scale = max((float(t.abs().max()) for t in inputs), default=0.0)
                for x, y, what in zip(a, b_, ("param", "buf1", "buf2")):
                    if y is not None:
                        scale_xy = max(scale, float(y.abs().max()) if y.numel() else 0.0)
                        _close(x, y, dtypes[i], f"{kind} step {step} tensor {i} {what}", elementwise=True,
                               scale=scale_xy)


def test_fused_step_multi_rejects_bad_inputs():
    lr = torch.tensor(0.1, device=DEV)
    p = [_rand(4, 4)]
    with pytest.raises(ValueError, match="must be contiguous"):
        FS.fused_step_multi([_rand(4, 4).t()], [_rand(4, 4)], None, None, None, lr, 1, "sgd")
    with pytest.raises(ValueError, match="weight_decay must be one float or one per tensor"):
        FS.fused_step_multi(p, [_rand(4, 4)], None, None, None, lr, 1, "sgd", weight_decay=[0.1, 0.2])
    with pytest.raises(ValueError, match="buf1s\\[0\\] must be given"):
        FS.fused_step_multi(p, [_rand(4, 4)], None, None, None, lr, 1, "sgd", momentum=0.9)
    with pytest.raises(ValueError, match="kind must be one of"):
        FS.fused_step(
            p[0],
            _rand(4, 4),
            None,
            None,
            None,
            lr,
            1,
            "lion",
            0.0,
            0.0,
            False,
            0.9,
            0.99,
            1e-8,
            0.0,
            0.0,
            False,
        )


def _signin_reference(m, w, gm, gw, st, mask, lr, step, kind, h, beta, state):
    m, w = m.clone(), w.clone()
    st = [None if t is None else t.clone() for t in st]
    R.fused_step_ref(m, gm, st[0], st[1], mask, lr, step, kind, **h)
    R.fused_step_ref(w, gw, st[2], st[3], mask, lr, step, kind, **h)
    if beta is None:
        return [m, w] + st
    nm, nw = R.signin_reset_ref(m, w, mask, beta)
    if state == "zero":
        st = [None if t is None else torch.zeros_like(t) for t in st]
    elif state == "transform":
        fm, fw, nmf, nwf = m.double(), w.double(), nm.double(), nw.double()
        norm = fm * fm + fw * fw
        safe = torch.where(norm > 0, norm, torch.ones_like(norm))
        g = torch.where(norm > 0, (st[0].double() * fw + st[2].double() * fm) / safe, torch.zeros_like(norm))
        new = [g * nwf, None, g * nmf, None]
        if st[1] is not None:
            s = torch.where(norm > 0, (st[1].double() + st[3].double()) / safe, torch.zeros_like(norm))
            new[1], new[3] = s * nwf * nwf, s * nmf * nmf
        st = [None if t is None else n.to(t.dtype) for t, n in zip(st, new)]
    return [nm, nw] + st


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("kind", [1, 3])
@pytest.mark.parametrize("reset", [None, "keep", "zero", "transform"])
def test_fused_step_signin_matches_composition(dtype, kind, reset):
    kind, mom, damp, nest = _KINDS[kind]
    shape = (9, 41)
    m = _rand(*shape, dtype=dtype).abs() + 0.5
    w, gm, gw = (_rand(*shape, dtype=dtype) for _ in range(3))
    mask = _mask(shape, 0.6)
    st = list(_state(shape, torch.float32, kind, mom)) + list(_state(shape, torch.float32, kind, mom))
    st = [st[0], st[1], st[2], st[3]]
    lr = torch.tensor(0.05, device=DEV)
    h = _hyper(kind, mom, damp, nest)
    beta = None if reset is None else 1.0
    want = _signin_reference(m, w, gm, gw, st, mask, lr, 3, kind, h, beta, reset or "keep")
    got = _clone(m, w, *st)
    FS.fused_step_signin(
        got[0],
        got[1],
        gm,
        gw,
        got[2],
        got[3],
        got[4],
        got[5],
        mask,
        lr,
        3,
        kind,
        beta=beta,
        state=reset or "keep",
        **h,
    )
    for a, b_, what in zip(got, want, ("m", "w", "m_buf1", "m_buf2", "w_buf1", "w_buf2")):
        if b_ is not None:
            _close(a, b_, a.dtype, what, elementwise=True)
    if beta is not None:  # pruned: m = sqrt(β), w = 0
        assert torch.allclose(got[0][~mask].float(), torch.tensor(1.0, device=DEV))
        assert (got[1][~mask] == 0).all()


# --------------------------------------------------------------------------------------- signin_reset


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("beta", [1e-6, 1.0, 10.0])
@pytest.mark.parametrize("density", [None, 0.0, 0.5, 1.0])
def test_signin_reset_matches_reference(dtype, beta, density):
    shape = (7, 129)
    scale = torch.tensor([1e-20, 1e-3, 1.0, 1e3, 1e20])[torch.randint(0, 5, shape)]
    if dtype != torch.float32:
        scale = scale.clamp(1e-3, 1e3)  # inside the 16-bit ranges
    w = (_rand(*shape) * scale.to(DEV)).to(dtype)
    m = _rand(*shape, dtype=dtype)
    mask = None if density is None else _mask(shape, density)
    got = SR.signin_reset(m, w, mask, beta)
    want = R.signin_reset_ref(m, w, mask, beta)
    for a, b_, what in zip(got, want, ("m", "w")):
        _close(a, b_, dtype, what, elementwise=True)
    nm, nw = (t.double() for t in got)
    assert (nm > 0).all()
    theta = R.reparam_ref(m, w, mask).double()
    # sign(w) = sign(θ); a 16-bit w may underflow to 0 for tiny |θ| / m (the reference's too)
    nz = nw != 0
    assert torch.equal(torch.sign(nw)[nz], torch.sign(theta)[nz])
    if dtype == torch.float32:
        assert torch.equal(nz, theta != 0)
    if dtype == torch.float32:  # METHODS §4.1: m ⊙ w = θ, m² − w² = β (to rounding)
        assert torch.allclose(nm * nw, theta, rtol=1e-5, atol=0)
        # m² − w² cancels: fp32 rounding of m, w (~|θ|·1e-7) must stay small against β
        sel = theta.abs() <= 100 * beta
        assert sel.any()
        assert torch.allclose(((nm - nw) * (nm + nw))[sel], torch.full_like(nm[sel], beta), rtol=1e-4, atol=0)


def test_signin_reset_strided_and_errors():
    m, w = _rand(50, 20).t(), _rand(50, 20).t()
    mask = _mask((50, 20), 0.5).t()
    for a, b_ in zip(SR.signin_reset(m, w, mask, 2.0), R.signin_reset_ref(m, w, mask, 2.0)):
        _close(a, b_, torch.float32, "strided", elementwise=True)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        SR.signin_reset(m, w, mask, float("nan"))
    with pytest.raises(ValueError, match="m must be a tensor"):
        SR.signin_reset(None, w, mask, 1.0)


# ------------------------------------------------------------------------------ prune_threshold (radix)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("n", [1, 7, 129, 70000])
def test_kth_largest_matches_kthvalue_exactly(dtype, n):
    x = _rand(n, dtype=dtype)  # signed values: negative keys are the complement, check them too
    if n > 10:
        x[:5] = x[5]  # ties
    for k in sorted({0, 1, n // 3, n - 1, n}):
        got, want = PT.kth_largest(x, k), R.prune_threshold_ref(x, k)
        assert got.dtype == want.dtype and got.shape == ()
        assert torch.equal(got, want.to(got.device)), (k, got, want)
    scores = x.abs().reshape(-1, 1) if n > 1 else x.abs()  # any shape
    assert torch.equal(PT.kth_largest(scores, 1), R.prune_threshold_ref(scores, 1))


def test_kth_largest_nan_is_largest_and_bad_k():
    x = torch.tensor([1.0, float("nan"), -2.0, 3.0], device=DEV)
    assert torch.isnan(PT.kth_largest(x, 1))
    assert PT.kth_largest(x, 2).item() == 3.0 and PT.kth_largest(x, 4).item() == -2.0
    with pytest.raises(ValueError, match=r"k must be an int in \[0, 4\]"):
        PT.kth_largest(x, 5)
    assert not hasattr(PT, "prune_threshold"), "register prune_threshold only once it is measured faster"


# ----------------------------------------------------------------------------------------- machinery


def test_modules_declare_dtypes_and_upcast_follows_the_interpreter():
    for mod in (RP, ML, BSL, FS, SR, PT):
        assert set(mod.SUPPORTED_DTYPES) == {torch.float32, torch.float16, torch.bfloat16}
    assert _common.upcast_flag() == _common.interpreting()
    launch, _ = RP.prepare_fwd(None, _rand(3, 3, dtype=torch.bfloat16), None)
    assert launch.args["UPCAST"] == _common.interpreting()


def test_interpreter_gets_one_autotune_config():
    if not _common.interpreting():
        pytest.skip("only meaningful under TRITON_INTERPRET=1 (the GPU autotunes over several configs)")
    for tuner in (*ML._masked_mm.values(), *ML._masked_dtheta.values(), *BSL._bsr_fwd.values()):
        assert len(tuner.configs) == 1


# ---------------------------------------------------------------------------------- GPU: every config


def _run_or_skip_resources(launch):
    try:
        launch.run()
        return True
    except Exception as e:  # a config that does not fit this GPU is dropped by the autotuner too
        if "OutOfResources" in type(e).__name__ or "out of resource" in str(e):
            return False
        raise


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=_id)  # fp16 tiles are bf16's
def test_gpu_every_masked_linear_config(dtype):
    b, n, k = 300, 257, 190
    x, w, m = _rand(b, k, dtype=dtype), _rand(n, k, dtype=dtype), _rand(n, k, dtype=dtype)
    mask, bias, gy = _mask((n, k), 0.5), _rand(n, dtype=dtype), _rand(b, n, dtype=dtype)
    es = w.element_size()
    ran = 0
    for cfg in ML._masked_mm[es].configs:
        launch, y = ML.prepare_fwd(x, m, w, mask, bias, config=cfg)
        if _run_or_skip_resources(launch):
            ran += 1
            _close(y, R.masked_linear_ref(_f64(x), _f64(m), _f64(w), mask, _f64(bias)), dtype, f"y {cfg}")
        launch, g_x = ML.prepare_dx(gy, m, w, mask, config=cfg)
        if _run_or_skip_resources(launch):
            _close(
                g_x,
                R.masked_linear_backward_ref(_f64(gy), _f64(x), _f64(m), _f64(w), mask)[0],
                dtype,
                f"g_x {cfg}",
            )
    for cfg in ML._masked_dtheta[es].configs:
        launch, (g_m, g_w) = ML.prepare_dtheta(gy, x, m, w, mask, config=cfg)
        if _run_or_skip_resources(launch):
            _, r_m, r_w = R.masked_linear_backward_ref(_f64(gy), _f64(x), _f64(m), _f64(w), mask)
            _close(g_m, r_m, dtype, f"g_m {cfg}")
            _close(g_w, r_w, dtype, f"g_w {cfg}")
    assert ran, "no forward config fits this GPU"


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,block",
    [
        (torch.bfloat16, (64, 64)),
        (torch.bfloat16, (128, 128)),
        (torch.bfloat16, (48, 80)),
        (torch.float32, (128, 128)),
    ],
    ids=str,
)
def test_gpu_every_block_sparse_config(dtype, block):
    bn, bk = block
    n, k, b = 4 * bn + 3, 3 * bk + 5, 257
    idx = _bsr(n, k, bn, bk, 0.4)
    x, w, m = _rand(b, k, dtype=dtype), _rand(n, k, dtype=dtype), _rand(n, k, dtype=dtype)
    es = w.element_size()
    spmm, sddmm = BSL._bsr_fwd[es].configs, BSL._bsr_dtheta[es].configs
    ran = 0
    for j in range(max(len(spmm), len(sddmm))):  # every SpMM config (fwd and dX) and every SDDMM config
        try:
            _check_bsr(
                x,
                m,
                w,
                _rand(n, dtype=dtype),
                idx,
                dtype,
                cfgs=(spmm[j % len(spmm)], spmm[j % len(spmm)], sddmm[j % len(sddmm)]),
            )
            ran += 1
        except Exception as e:  # a config that does not fit this GPU is dropped by the autotuner too
            if "OutOfResources" not in type(e).__name__:
                raise
    assert ran, "no block-sparse config fits this GPU"
