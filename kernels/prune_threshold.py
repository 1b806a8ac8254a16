"""k-th largest score by a multi-block radix select: the magnitude-pruning threshold without a sort.

    kth_largest(scores, k) == reference.prune_threshold_ref(scores, k)   (any shape, fp32/fp16/bf16)

Why a kernel at all: ``torch.kthvalue`` on CUDA runs one thread block per slice, so a global threshold
over a whole model (one slice of ~1e8 scores) is read by a single SM, 16 times (2-bit digits). Here
every pass is a full-GPU histogram: scores are mapped to order-preserving 32-bit keys, each pass
histograms the next 8 bits of the keys that still match the prefix chosen so far (one ``tl.histogram``
per program, 256 atomic adds into a global histogram), and a one-program kernel picks the bucket that
holds the wanted rank and narrows the prefix. fp32 needs 4 passes, fp16 3 (its keys end in 13 zero
bits), bf16 2; 2 launches per pass, no host synchronisation until the result is read.

Order: NaN is the largest value (as torch.kthvalue on CUDA), -0.0 sorts below +0.0 (pass |θ| for
magnitude pruning: no -0.0 there). k = 0 returns +inf (keep nothing), like the reference.

Status: **not registered as the backend's ``prune_threshold``** — the brief registers a kernel only when
it is measured faster than torch.kthvalue on a GPU, and no GPU measurement exists yet.
bench/bench_prune_threshold.py measures both; if the kernel wins above some size, expose
``prune_threshold`` here (falling back to torch.kthvalue below that size).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED_DTYPES, Launch, check_device, check_dtype, interpreting

__all__ = ["kth_largest", "SUPPORTED_DTYPES"]

RADIX_BITS = 8
#: passes (8 bits each, from the top) that decide a key: the remaining key bits are zero in the dtype
PASSES = {torch.float32: 4, torch.float16: 3, torch.bfloat16: 2}


@triton.jit
def _keys(x):
    """fp32 -> 32-bit keys (held in int64) in the same order; every NaN becomes the largest key."""
    bits = x.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    key = tl.where(bits >= 0x80000000, 0xFFFFFFFF - bits, bits + 0x80000000)
    return tl.where(x != x, 0xFFFFFFFF, key)


@triton.jit
def _radix_hist_kernel(
    x_ptr, state_ptr, hist_ptr, n, SHIFT: tl.constexpr, FIRST: tl.constexpr, BLOCK: tl.constexpr
):
    """Histogram of the 8-bit digit at SHIFT of the keys whose higher bits equal the current prefix."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    key = _keys(x)
    keep = inb
    if not FIRST:
        prefix = tl.load(state_ptr)
        keep = keep & ((key >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
    digit = ((key >> SHIFT) & 0xFF).to(tl.int32)
    digit = tl.where(keep, digit, 256)  # excluded lanes go to a bin nobody reads
    counts = tl.histogram(digit, 512)
    bins = tl.arange(0, 512)
    tl.atomic_add(hist_ptr + bins, counts, mask=bins < 256)


@triton.jit
def _radix_select_kernel(state_ptr, hist_ptr, SHIFT: tl.constexpr):
    """Pick the bucket that holds rank state[1]; narrow the prefix (state[0]); reset the histogram."""
    bins = tl.arange(0, 256)
    counts = tl.load(hist_ptr + bins).to(tl.int64)
    upto = tl.cumsum(counts, 0)
    before = upto - counts
    rank = tl.load(state_ptr + 1)
    here = (before <= rank) & (rank < upto)
    digit = tl.sum(tl.where(here, bins, 0), 0)
    skipped = tl.sum(tl.where(here, before, 0), 0)
    prefix = tl.load(state_ptr)
    tl.store(state_ptr, prefix | (digit.to(tl.int64) << SHIFT))
    tl.store(state_ptr + 1, rank - skipped)
    tl.store(hist_ptr + bins, tl.zeros_like(counts).to(tl.int32))


def _block() -> int:
    return 65536 if interpreting() else 8192


def prepare(scores: torch.Tensor, k: int):
    """(launches, state): state[0] ends as the key of the answer; None launches for k == 0."""
    check_device("scores", scores)
    check_dtype("scores", scores)
    n = scores.numel()
    if not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k must be an int in [0, {n}] (number of scores), got {k!r}")
    x = scores.reshape(-1)
    if not x.is_contiguous():
        x = x.contiguous()
    # state: [prefix (key bits chosen so far), rank still to skip among the matching keys]
    state = torch.tensor([0, n - k], dtype=torch.int64).to(scores.device)
    hist = torch.zeros(256, dtype=torch.int32, device=scores.device)
    block = _block()
    grid = (triton.cdiv(n, block),)
    launches = []
    for p in range(PASSES[scores.dtype]):
        shift = 32 - RADIX_BITS * (p + 1)
        cfg = triton.Config({}, num_warps=8 if block >= 4096 else 4, num_stages=1)
        launches.append(
            Launch(
                _radix_hist_kernel,
                grid,
                dict(x_ptr=x, state_ptr=state, hist_ptr=hist, n=n, SHIFT=shift, FIRST=p == 0, BLOCK=block),
                cfg,
            )
        )
        launches.append(
            Launch(
                _radix_select_kernel,
                (1,),
                dict(state_ptr=state, hist_ptr=hist, SHIFT=shift),
                triton.Config({}, num_warps=4, num_stages=1),
            )
        )
    return launches, state


def kth_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of ``scores`` as a 0-dim tensor of its dtype (+inf for k = 0)."""
    launches, state = prepare(scores, k)
    if k == 0:
        return torch.tensor(float("inf"), dtype=scores.dtype, device=scores.device)
    for launch in launches:
        launch.run()
    key = state[0:1]
    # the passes fixed the top 8·passes bits; below them a 16-bit value's fp32 bits are 0, i.e. key bits
    # 0 for non-negative and 1 for negative values (their keys are the complement)
    low = 32 - RADIX_BITS * PASSES[scores.dtype]
    if low:
        key = torch.where(key >= 2**31, key, key | ((1 << low) - 1))
    # invert the key map: keys with the top bit set came from non-negative floats
    bits = torch.where(key >= 2**31, key - 2**31, 0xFFFFFFFF - key)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    return bits.view(torch.float32).reshape(()).to(scores.dtype)


def aot_launches():
    """(name, Launch, sweep=False) for every pass of every dtype, on meta tensors."""
    out = []
    for dtype in SUPPORTED_DTYPES:
        x = torch.empty(1000, dtype=dtype, device="meta")
        launches, _ = prepare(x, 10)
        for i, launch in enumerate(launches):
            out.append((f"prune_threshold-{str(dtype)[6:]}-{i}", launch, False))
    return out
