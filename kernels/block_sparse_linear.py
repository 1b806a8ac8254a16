"""block_sparse_linear (BSR layout over dense m, w): work proportional to the non-empty blocks.

θ = B ⊙ m ⊙ w where B is the block mask of a BSRIndex (blocks of bn × bk, edge blocks cropped); m and
w stay dense (N, K), so the index can change without re-laying the parameters.

Forward  y[B, N] = x θᵀ + b    one program per (token tile, block row r): loops over the blocks of
                                row r only (crow[r]..crow[r+1], columns col[j]), θ block formed on the fly
dX       dX = dY θ             one program per (token tile, block column c): loops over the blocks of
                                column c only (ccol[c]..ccol[c+1], rows row_t[j])
dθ       SDDMM                 one program per non-empty block j = (row[j], col[j]): dθ block = dYᵀ x over
                                the token dimension; epilogue writes g_m = dθ ⊙ w, g_w = dθ ⊙ m
                                directly (dθ never written). Gradients outside the blocks are zero.

The index tensors (crow/col and the transposed ccol/row_t, int32) are built once per mask by
layout.BSRIndex; nothing here rebuilds them. FLOPs are 2·B·bn·bk per non-empty block and pass; empty
block rows / columns only write their (zero or bias) outputs.

Block sizes 16..128 map straight onto the tile shape (tl.dot needs ≥ 16); other sizes from 1 to 128
work too, padded to the next power of two ≥ 16 inside the kernel (correct, but the padding is wasted
work: prefer powers of two).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (SUPPORTED_DTYPES, autotune, cast_out, check_device, check_dtype, check_same,
                      check_tile_offsets, dot_precision, Launch, next_pow2, ordered_args,
                      small_problem_config, strides, tile_ptrs, upcast_flag)

__all__ = ["block_sparse_linear_fwd", "block_sparse_linear_bwd", "SUPPORTED_DTYPES"]

MAX_BLOCK = 128


def _cfg(bm, warps, stages):
    return triton.Config({"BLOCK_M": bm}, num_warps=warps, num_stages=stages)


#: forward / dX: BLOCK_M tokens per program; the other tile side is the (padded) block size
SPMM_CONFIGS_16 = [_cfg(128, 8, 3), _cfg(128, 4, 4), _cfg(64, 4, 4), _cfg(256, 8, 3)]
#: fp32 (TF32 / 3xTF32 operands): 8 warps, because at 4 warps the 3xTF32 split spills on sm_80
SPMM_CONFIGS_32 = [_cfg(64, 8, 3), _cfg(128, 8, 3), _cfg(64, 4, 3), _cfg(32, 8, 3)]
SPMM_INTERP = _cfg(64, 4, 1)

#: dθ: BLOCK_B tokens per step of the reduction
SDDMM_CONFIGS_16 = [
    triton.Config({"BLOCK_B": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_B": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_B": 32}, num_warps=4, num_stages=4),
]
SDDMM_CONFIGS_32 = [
    triton.Config({"BLOCK_B": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_B": 64}, num_warps=8, num_stages=2),
    # 128×128 fp32 blocks: the accumulator alone is 128 registers per thread at 4 warps
    triton.Config({"BLOCK_B": 32}, num_warps=8, num_stages=3),
]
SDDMM_INTERP = triton.Config({"BLOCK_B": 64}, num_warps=4, num_stages=1)


@triton.jit
def _block_range(block, size, limit, B: tl.constexpr, B_P: tl.constexpr):
    """Offsets of block ``block`` (size B, padded to B_P lanes) and which lanes are real and inside."""
    lanes = tl.arange(0, B_P)
    offs = block * B + lanes
    inside = offs < limit
    if B_P != B:
        inside = inside & (lanes < B)
    return offs, inside


@triton.jit
def _theta_block(
    m_ptr,
    w_ptr,
    rows,
    cols,
    inb,
    s_mn,
    s_mk,
    s_wn,
    s_wk,
    dtype: tl.constexpr,
    HAS_M: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """m·w on one block (rows/cols broadcast to the wanted orientation), rounded to ``dtype``."""
    w = tl.load(w_ptr + rows * s_wn + cols * s_wk, mask=inb, other=0.0)
    if UPCAST:
        theta = w.to(tl.float32)
        if HAS_M:
            m = tl.load(m_ptr + rows * s_mn + cols * s_mk, mask=inb, other=0.0).to(tl.float32)
            theta = cast_out(theta * m, dtype, UPCAST).to(tl.float32)
    else:
        theta = w
        if HAS_M:
            theta = theta * tl.load(m_ptr + rows * s_mn + cols * s_mk, mask=inb, other=0.0)
    return theta


@triton.jit(do_not_specialize=["has_bias"])
def _block_sparse_linear_fwd_kernel(
    x_ptr,
    m_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    crow_ptr,
    col_ptr,
    M,
    N,
    K,
    s_xm,
    s_xk,
    s_mn,
    s_mk,
    s_wn,
    s_wk,
    s_ym,
    s_yn,
    has_bias,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BN_P: tl.constexpr,
    BK_P: tl.constexpr,
    CH: tl.constexpr,
    HAS_M: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """y[:, block row r] = Σ_{j in row r} x[:, block col(j)] · θ_jᵀ (+ b).

    Each block's reduction (its BK columns) runs in CH-wide chunks, one loop step per chunk, so shared
    memory per pipeline stage stays bounded for 128-wide fp32 blocks.
    """
    NSUB: tl.constexpr = BK_P // CH
    pid_m = tl.program_id(0)
    r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_in = offs_m < M
    offs_n, n_in = _block_range(r, BN, N, BN, BN_P)
    start = tl.load(crow_ptr + r)
    end = tl.load(crow_ptr + r + 1)
    dtype = w_ptr.dtype.element_ty
    lanes = tl.arange(0, CH)
    acc = tl.zeros((BLOCK_M, BN_P), dtype=tl.float32)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * s_xm
    w_rows = offs_n[None, :].to(tl.int64)
    for t in range(start * NSUB, end * NSUB):
        c = tl.load(col_ptr + t // NSUB)
        sub = (t % NSUB) * CH + lanes  # lane offsets inside the block
        offs_k = c * BK + sub
        k_in = (offs_k < K) & (sub < BK)
        x = tl.load(x_rows + offs_k[None, :] * s_xk, mask=m_in[:, None] & k_in[None, :], other=0.0)
        # θ chunk transposed: (CH, BN_P)
        theta = _theta_block(
            m_ptr,
            w_ptr,
            w_rows,
            offs_k[:, None],
            k_in[:, None] & n_in[None, :],
            s_mn,
            s_mk,
            s_wn,
            s_wk,
            dtype,
            HAS_M,
            UPCAST,
        )
        if UPCAST:
            x = x.to(tl.float32)
        acc = tl.dot(x, theta, acc, input_precision=PREC)
    if has_bias != 0:  # runtime flag: a branch in the epilogue, not another compiled variant
        acc += tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * s_ym + offs_n[None, :] * s_yn
    tl.store(y_ptrs, cast_out(acc, y_ptr.dtype.element_ty, UPCAST), mask=m_in[:, None] & n_in[None, :])


@triton.jit
def _block_sparse_linear_dx_kernel(
    dy_ptr,
    m_ptr,
    w_ptr,
    dx_ptr,
    ccol_ptr,
    row_t_ptr,
    M,
    N,
    K,
    s_dym,
    s_dyn,
    s_mn,
    s_mk,
    s_wn,
    s_wk,
    s_dxm,
    s_dxk,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BN_P: tl.constexpr,
    BK_P: tl.constexpr,
    CH: tl.constexpr,
    HAS_M: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """dX[:, block col c] = Σ_{j in col c} dY[:, block row row_t(j)] · θ_j (reduction in CH-row chunks)."""
    NSUB: tl.constexpr = BN_P // CH
    pid_m = tl.program_id(0)
    c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_in = offs_m < M
    offs_k, k_in = _block_range(c, BK, K, BK, BK_P)
    start = tl.load(ccol_ptr + c)
    end = tl.load(ccol_ptr + c + 1)
    dtype = w_ptr.dtype.element_ty
    lanes = tl.arange(0, CH)
    acc = tl.zeros((BLOCK_M, BK_P), dtype=tl.float32)
    dy_rows = dy_ptr + offs_m[:, None].to(tl.int64) * s_dym
    for t in range(start * NSUB, end * NSUB):
        r = tl.load(row_t_ptr + t // NSUB)
        sub = (t % NSUB) * CH + lanes
        offs_n = r * BN + sub
        n_in = (offs_n < N) & (sub < BN)
        dy = tl.load(dy_rows + offs_n[None, :] * s_dyn, mask=m_in[:, None] & n_in[None, :], other=0.0)
        theta = _theta_block(
            m_ptr,
            w_ptr,
            offs_n[:, None].to(tl.int64),
            offs_k[None, :],
            n_in[:, None] & k_in[None, :],
            s_mn,
            s_mk,
            s_wn,
            s_wk,
            dtype,
            HAS_M,
            UPCAST,
        )
        if UPCAST:
            dy = dy.to(tl.float32)
        acc = tl.dot(dy, theta, acc, input_precision=PREC)
    dx_ptrs = dx_ptr + offs_m[:, None].to(tl.int64) * s_dxm + offs_k[None, :] * s_dxk
    tl.store(dx_ptrs, cast_out(acc, dx_ptr.dtype.element_ty, UPCAST), mask=m_in[:, None] & k_in[None, :])


@triton.jit
def _block_sparse_linear_dtheta_kernel(
    dy_ptr,
    x_ptr,
    m_ptr,
    w_ptr,
    gm_ptr,
    gw_ptr,
    row_ptr,
    col_ptr,
    M,
    N,
    K,
    s_dym,
    s_dyn,
    s_xm,
    s_xk,
    s_mn,
    s_mk,
    s_wn,
    s_wk,
    s_gn,
    s_gk,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BN_P: tl.constexpr,
    BK_P: tl.constexpr,
    HAS_M: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """SDDMM: for block j = (row[j], col[j]), dθ_j = dY[:, rows]ᵀ · x[:, cols]; writes g_m, g_w there."""
    j = tl.program_id(0)
    r = tl.load(row_ptr + j)
    c = tl.load(col_ptr + j)
    offs_n, n_in = _block_range(r, BN, N, BN, BN_P)
    offs_k, k_in = _block_range(c, BK, K, BK, BK_P)
    offs_b = tl.arange(0, BLOCK_B)
    dyt_ptrs = dy_ptr + offs_n[:, None] * s_dyn + offs_b[None, :].to(tl.int64) * s_dym
    x_ptrs = x_ptr + offs_b[:, None].to(tl.int64) * s_xm + offs_k[None, :] * s_xk
    acc = tl.zeros((BN_P, BK_P), dtype=tl.float32)
    for b0 in range(0, M, BLOCK_B):
        b_in = offs_b < M - b0
        dyt = tl.load(dyt_ptrs, mask=n_in[:, None] & b_in[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=b_in[:, None] & k_in[None, :], other=0.0)
        if UPCAST:
            dyt = dyt.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(dyt, x, acc, input_precision=PREC)
        dyt_ptrs += BLOCK_B * s_dym
        x_ptrs += BLOCK_B * s_xm
    dtype = w_ptr.dtype.element_ty
    g = cast_out(acc, dtype, UPCAST).to(tl.float32)  # dθ in the storage dtype, like the reference
    inb = n_in[:, None] & k_in[None, :]
    r0 = (r * BN).to(tl.int64)  # block origin; tile_ptrs keeps the per-element offsets int32
    c0 = (c * BK).to(tl.int64)
    lanes_n = tl.arange(0, BN_P)[:, None]
    lanes_k = tl.arange(0, BK_P)[None, :]
    # g_m and g_w are allocated together: same strides. Pointer blocks are built where they are used
    # (a block held across the other factor's load costs registers: measured spills)
    if HAS_M:
        # one factor at a time: g·w is stored before m is loaded, so fewer tiles are live at once
        w = tl.load(tile_ptrs(w_ptr, r0, c0, lanes_n, lanes_k, s_wn, s_wk), mask=inb, other=0.0)
        gm_ptrs = tile_ptrs(gm_ptr, r0, c0, lanes_n, lanes_k, s_gn, s_gk)
        tl.store(gm_ptrs, cast_out(g * w.to(tl.float32), dtype, UPCAST), mask=inb)
        m = tl.load(tile_ptrs(m_ptr, r0, c0, lanes_n, lanes_k, s_mn, s_mk), mask=inb, other=0.0)
        gw_ptrs = tile_ptrs(gw_ptr, r0, c0, lanes_n, lanes_k, s_gn, s_gk)
        tl.store(gw_ptrs, cast_out(g * m.to(tl.float32), dtype, UPCAST), mask=inb)
    else:
        gw_ptrs = tile_ptrs(gw_ptr, r0, c0, lanes_n, lanes_k, s_gn, s_gk)
        tl.store(gw_ptrs, cast_out(g, dtype, UPCAST), mask=inb)


# one autotuner per operand width (fp32 needs other tiles; the key does not see dtypes)
_SPMM_KEY = ["M", "N", "K", "BN", "BK", "HAS_M", "PREC"]
_bsr_fwd = {
    es: autotune(c, SPMM_INTERP, _SPMM_KEY)(_block_sparse_linear_fwd_kernel)
    for es, c in ((2, SPMM_CONFIGS_16), (4, SPMM_CONFIGS_32))
}
_bsr_dx = {
    es: autotune(c, SPMM_INTERP, _SPMM_KEY)(_block_sparse_linear_dx_kernel)
    for es, c in ((2, SPMM_CONFIGS_16), (4, SPMM_CONFIGS_32))
}
_bsr_dtheta = {
    es: autotune(c, SDDMM_INTERP, _SPMM_KEY)(_block_sparse_linear_dtheta_kernel)
    for es, c in ((2, SDDMM_CONFIGS_16), (4, SDDMM_CONFIGS_32))
}
#: element size -> config of small problems (no autotuning; see _common.SMALL_WORK)
SPMM_SMALL = {2: SPMM_CONFIGS_16[2], 4: SPMM_CONFIGS_32[0]}
SDDMM_SMALL = {2: SDDMM_CONFIGS_16[2], 4: SDDMM_CONFIGS_32[0]}


# ------------------------------------------------------------------------------------------ launchers


def _check(x_name, x, m, w, feats, index, block_n, block_k):
    check_device("w", w)
    check_dtype("w", w)
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    check_same("m", m, w)
    if x.dim() != 2 or x.shape[1] != feats:
        raise ValueError(f"{x_name} must be 2-D (batch, {feats}), got shape {tuple(x.shape)}")
    check_same(x_name, x, w, shape=False)
    for name, b in (("block_n", block_n), ("block_k", block_k)):
        if not isinstance(b, int) or not 1 <= b <= MAX_BLOCK:
            raise ValueError(f"{name} must be an int in [1, {MAX_BLOCK}] for the Triton kernels, got {b!r}")
    n, k = w.shape
    nbr, nbc = -(-n // block_n), -(-k // block_k)
    crow, col, row, ccol, row_t = index
    for name, t, length in (
        ("crow", crow, nbr + 1),
        ("ccol", ccol, nbc + 1),
        ("col", col, None),
        ("row", row, col.numel()),
        ("row_t", row_t, col.numel()),
    ):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must have dtype torch.int32, got {t.dtype}")
        if t.device != w.device:
            raise ValueError(f"{name} must be on {w.device}, got {t.device}")
        if length is not None and t.numel() != length:
            raise ValueError(
                f"{name} must have {length} entries for a {(n, k)} weight with "
                f"{(block_n, block_k)} blocks, got {t.numel()}"
            )


def unsupported(impl: str, args: tuple) -> str:
    """Backend hook (sparse_engine.ops.backends): why these exact arguments cannot run here ("" if they can)."""
    if impl in ("block_sparse_linear_fwd", "block_sparse_linear_bwd") and len(args) >= 2:
        for name, b in (("block_n", args[-2]), ("block_k", args[-1])):
            if not isinstance(b, int) or not 1 <= b <= MAX_BLOCK:
                return f"the Triton kernels take {name} in [1, {MAX_BLOCK}], got {b!r}"
    return ""


def _block_consts(block_n: int, block_k: int, dtype: torch.dtype, reduce_over: str | None) -> dict:
    """Block constexprs; CH = the reduction chunk of the SpMM kernels (bounded shared memory per stage)."""
    bn_p, bk_p = max(16, next_pow2(block_n)), max(16, next_pow2(block_k))
    out = dict(BN=block_n, BK=block_k, BN_P=bn_p, BK_P=bk_p)
    if reduce_over is not None:
        limit = 32 if dtype == torch.float32 else 64
        out["CH"] = min(limit, bn_p if reduce_over == "n" else bk_p)
    return out


def prepare_fwd(x, m, w, bias, crow, col, row, ccol, row_t, block_n, block_k, config=None):
    _check("x", x, m, w, w.shape[1], (crow, col, row, ccol, row_t), block_n, block_k)
    n, k = w.shape
    if bias is not None:
        check_same("bias", bias, w, shape=False)
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    bsz = x.shape[0]
    y = torch.empty(bsz, n, dtype=x.dtype, device=x.device)
    dm = m if m is not None else w
    args = dict(
        x_ptr=x, m_ptr=dm, w_ptr=w, bias_ptr=bias.contiguous() if bias is not None else w, y_ptr=y,
        crow_ptr=crow, col_ptr=col, M=bsz, N=n, K=k, **strides("mk", x=x), **strides("nk", m=dm, w=w),
        **strides("mn", y=y), has_bias=int(bias is not None), HAS_M=m is not None, UPCAST=upcast_flag(),
        PREC=dot_precision(w.dtype), **_block_consts(block_n, block_k, w.dtype, "k"),
    )
    nbr = -(-n // block_n)
    grid = lambda meta: (triton.cdiv(bsz, meta["BLOCK_M"]), nbr)
    config = small_problem_config(config, bsz * col.numel() * block_n * block_k, SPMM_SMALL[w.element_size()])
    return Launch(
        _bsr_fwd[w.element_size()],
        grid,
        ordered_args(_block_sparse_linear_fwd_kernel, args, SPMM_INTERP.kwargs),
        config,
    ), y


def prepare_dx(grad_y, m, w, crow, col, row, ccol, row_t, block_n, block_k, config=None):
    _check("grad_y", grad_y, m, w, w.shape[0], (crow, col, row, ccol, row_t), block_n, block_k)
    n, k = w.shape
    bsz = grad_y.shape[0]
    g_x = torch.empty(bsz, k, dtype=w.dtype, device=w.device)
    dm = m if m is not None else w
    args = dict(
        dy_ptr=grad_y, m_ptr=dm, w_ptr=w, dx_ptr=g_x, ccol_ptr=ccol, row_t_ptr=row_t, M=bsz, N=n, K=k,
        **strides("mn", dy=grad_y), **strides("nk", m=dm, w=w), **strides("mk", dx=g_x), HAS_M=m is not None,
        UPCAST=upcast_flag(), PREC=dot_precision(w.dtype), **_block_consts(block_n, block_k, w.dtype, "n"),
    )
    nbc = -(-k // block_k)
    grid = lambda meta: (triton.cdiv(bsz, meta["BLOCK_M"]), nbc)
    config = small_problem_config(config, bsz * col.numel() * block_n * block_k, SPMM_SMALL[w.element_size()])
    return Launch(
        _bsr_dx[w.element_size()],
        grid,
        ordered_args(_block_sparse_linear_dx_kernel, args, SPMM_INTERP.kwargs),
        config,
    ), g_x


def prepare_dtheta(grad_y, x, m, w, crow, col, row, ccol, row_t, block_n, block_k, config=None):
    _check("grad_y", grad_y, m, w, w.shape[0], (crow, col, row, ccol, row_t), block_n, block_k)
    _check("x", x, m, w, w.shape[1], (crow, col, row, ccol, row_t), block_n, block_k)
    if grad_y.shape[0] != x.shape[0]:
        raise ValueError(f"grad_y has {grad_y.shape[0]} rows but x has {x.shape[0]}")
    n, k = w.shape
    # zero outside the blocks: the kernel writes only the non-empty blocks
    g_m = None if m is None else torch.zeros(n, k, dtype=w.dtype, device=w.device)
    g_w = torch.zeros(n, k, dtype=w.dtype, device=w.device)
    for name, t in (("m", m), ("w", w), ("g_w", g_w)):  # g_m has g_w's strides
        check_tile_offsets(name, t, MAX_BLOCK)
    dm = m if m is not None else w
    args = dict(
        dy_ptr=grad_y, x_ptr=x, m_ptr=dm, w_ptr=w, gm_ptr=g_m if g_m is not None else g_w, gw_ptr=g_w,
        row_ptr=row, col_ptr=col, M=x.shape[0], N=n, K=k, **strides("mn", dy=grad_y), **strides("mk", x=x),
        **strides("nk", m=dm, w=w, g=g_w), HAS_M=m is not None, UPCAST=upcast_flag(),
        PREC=dot_precision(w.dtype), **_block_consts(block_n, block_k, w.dtype, None),
    )
    grid = (col.numel(),)
    config = small_problem_config(
        config, x.shape[0] * col.numel() * block_n * block_k, SDDMM_SMALL[w.element_size()]
    )
    return Launch(
        _bsr_dtheta[w.element_size()],
        grid,
        ordered_args(_block_sparse_linear_dtheta_kernel, args, SDDMM_INTERP.kwargs),
        config,
    ), (g_m, g_w)


def block_sparse_linear_fwd(x, m, w, bias, crow, col, row, ccol, row_t, perm, block_n: int, block_k: int):
    """y = x θᵀ + b with θ = B ⊙ m ⊙ w, B the blocks listed by the BSR index. x: (B, K), w: (N, K)."""
    launch, y = prepare_fwd(x, m, w, bias, crow, col, row, ccol, row_t, block_n, block_k)
    if y.numel():
        launch.run()
    return y


def block_sparse_linear_bwd(grad_y, x, m, w, crow, col, row, ccol, row_t, perm, block_n: int, block_k: int):
    """(g_x, g_m, g_w); g_m, g_w dense (N, K), zero outside the non-empty blocks (g_m None if m is)."""
    launch_dx, g_x = prepare_dx(grad_y, m, w, crow, col, row, ccol, row_t, block_n, block_k)
    launch_dt, (g_m, g_w) = prepare_dtheta(grad_y, x, m, w, crow, col, row, ccol, row_t, block_n, block_k)
    if g_x.numel():
        launch_dx.run()
    if col.numel():
        launch_dt.run()
    return g_x, g_m, g_w


def aot_launches():
    """(name, Launch, sweep) covering every specialisation a GPU run can launch, on meta tensors.

    sweep=True (every autotune config): 64×64 and 128×128 blocks in bf16, fp32/TF32 and fp32/3xTF32
    with m, the shared-memory and register extremes. sweep=False (first config): other block shapes
    (16×16, a non-power-of-two 48×80 padded one, 32×128, 128×16), fp16, fp32/3xTF32, and m absent,
    rotating through the kernels.
    """
    variants = {
        "bf16": (torch.bfloat16, "ieee"),
        "fp16": (torch.float16, "ieee"),
        "tf32": (torch.float32, "tf32"),
        "fp32": (torch.float32, "tf32x3"),
    }

    def launches(bn, bk, v, has_m):
        dtype, prec = variants[v]
        n, k, bsz = 4 * bn, 4 * bk, 256
        w = torch.empty(n, k, dtype=dtype, device="meta")
        m = torch.empty_like(w) if has_m else None
        x = torch.empty(bsz, k, dtype=dtype, device="meta")
        dy = torch.empty(bsz, n, dtype=dtype, device="meta")
        b = torch.empty(n, dtype=dtype, device="meta")
        i32 = dict(dtype=torch.int32, device="meta")
        idx = (
            torch.empty(5, **i32),
            torch.empty(6, **i32),
            torch.empty(6, **i32),
            torch.empty(5, **i32),
            torch.empty(6, **i32),
        )
        tag = f"{bn}x{bk}-{v}-m{int(has_m)}"
        res = [
            (f"bsr_fwd-{tag}", prepare_fwd(x, m, w, b, *idx, bn, bk)[0]),
            (f"bsr_dx-{tag}", prepare_dx(dy, m, w, *idx, bn, bk)[0]),
            (f"bsr_dtheta-{tag}", prepare_dtheta(dy, x, m, w, *idx, bn, bk)[0]),
        ]
        for _, launch in res:
            launch.args["PREC"] = prec
        return res

    out = []
    for bn, bk in ((64, 64), (128, 128)):
        for v in ("bf16", "tf32", "fp32"):
            out += [(name, launch, True) for name, launch in launches(bn, bk, v, True)]
    rotation = ["fp16", "fp32", "bf16", "tf32"]
    cases = [(16, 16, True), (48, 80, True), (32, 128, True), (128, 16, True), (64, 64, False)]
    for i, (bn, bk, has_m) in enumerate(cases):
        for j in range(3):
            name, launch = launches(bn, bk, rotation[(i + j) % len(rotation)], has_m)[j]
            out.append((name, launch, False))
    for v in ("fp16", "fp32"):
        out += [(name, launch, False) for name, launch in launches(64, 64, v, True)]
    return out
