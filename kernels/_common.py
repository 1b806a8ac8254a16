"""Shared machinery of the Triton kernels: one description of every launch, used three ways.

Each launcher first *prepares* a :class:`Launch` (the kernel, its grid and every argument by name) and
then runs it. The same preparation, fed with ``meta`` tensors, tells the AOT check
(tests/test_aot_compile.py) exactly which specialisations a GPU run will compile, so the check compiles
what the launcher launches rather than a hand-written copy of its signature.

Interpreter (``TRITON_INTERPRET=1``, CPU tensors, used by CI):
* bf16 arithmetic is wrong there (it computes on the raw uint16 bits), so kernels take an ``UPCAST``
  constexpr that converts loaded values to fp32 before any arithmetic or ``tl.dot``; it is True only
  when interpreting, so GPU code never pays for it.
* ``@triton.autotune`` with more than one config benchmarks through a GPU driver that does not exist:
  the interpreter gets one config (:func:`configs`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl

#: dtypes every kernel here supports (fp32 accumulation everywhere)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_TL_NAMES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.bool: "i1",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.int32: "i32",
    torch.int64: "i64",
}

INT32_MAX = 2**31 - 1


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (read at call time, like Triton itself)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def configs(gpu: Sequence[triton.Config], interp: triton.Config) -> list[triton.Config]:
    """The autotune list: all of ``gpu`` on a GPU, the single ``interp`` config in the interpreter."""
    return [interp] if interpreting() else list(gpu)


def quick_bench(kernel_call, quantiles):
    """The autotuner's timer: shorter than Triton's default (25 ms warm-up, 100 ms per config), which
    would dominate a test suite that meets many shapes; still ≥ 10 runs of any kernel worth tuning."""
    from triton.testing import do_bench

    return do_bench(kernel_call, warmup=10, rep=30, quantiles=quantiles)


def autotune(gpu_configs, interp_config, key):
    """``triton.autotune`` over ``gpu_configs`` (one ``interp_config`` in the interpreter)."""
    if interpreting():
        return triton.autotune([interp_config], key=key)
    return triton.autotune(list(gpu_configs), key=key, do_bench=quick_bench)


#: problems with at most this many multiply-adds skip autotuning and take the module's small config:
#: they run in microseconds, and tuning each new shape (tests meet hundreds) would cost far more
SMALL_WORK = 1 << 25


def small_problem_config(config, work: int, small):
    """``config`` if given, else ``small`` for a small problem on a GPU, else None (autotune)."""
    if config is not None or interpreting() or work > SMALL_WORK:
        return config
    return small


def upcast_flag() -> bool:
    """Value of the kernels' ``UPCAST`` constexpr: True only in the interpreter (see module doc)."""
    return interpreting()


@triton.jit
def cast_out(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (round to nearest even).

    The interpreter truncates fp32 -> bf16 instead of rounding, so under UPCAST the rounding is done
    here on the bit pattern (finite values; the interpreter is only for tests).
    """
    if UPCAST and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def factorize(theta, half_beta):
    """(m, w) with m·w = θ, m² − w² = β, m > 0, in fp32 (as reference.factorize_ref).

    m = sqrt(β/2 + hypot(β/2, θ)); hypot as max·sqrt(1 + (min/max)²), so θ is never squared (no
    overflow for huge |θ|, no underflow for tiny θ); the sum adds non-negative terms (no cancellation
    for tiny β). θ = 0 with β = 0 gives m = w = 0. Rounded-to-nearest sqrt and division throughout.
    """
    a = tl.abs(theta)
    hi = tl.maximum(a, half_beta)
    lo = tl.minimum(a, half_beta)
    safe_hi = tl.where(hi > 0, hi, 1.0)
    ratio = tl.div_rn(lo, safe_hi)
    h = hi * tl.sqrt_rn(1.0 + ratio * ratio)
    m = tl.sqrt_rn(half_beta + h)
    w = tl.where(m > 0, tl.div_rn(theta, tl.where(m > 0, m, 1.0)), 0.0)
    return m, w


@triton.jit
def tile_ptrs(ptr, row0, col0, lanes_r, lanes_c, s_r, s_c):
    """Pointers to a tile of a 2-D tensor: the tile origin (row0, col0: int64 scalars) as one 64-bit
    offset, the lanes (lanes_r (R, 1), lanes_c (1, C), int32) as int32 offsets. 64-bit offsets for every
    element held two registers each across an epilogue's loads and stores and made 128×128 tiles spill;
    launchers check the int32 part with :func:`check_tile_offsets`."""
    return ptr + (row0 * s_r + col0 * s_c) + (lanes_r * s_r + lanes_c * s_c)


def check_device(name: str, t: torch.Tensor) -> None:
    if t.device.type == "cuda" or t.device.type == "meta":
        return
    if t.device.type == "cpu" and interpreting():
        return
    raise ValueError(
        f"{name} must be a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1) for the Triton kernels, "
        f"got device {t.device}"
    )


def check_dtype(name: str, t: torch.Tensor, allowed: Sequence[torch.dtype] = SUPPORTED_DTYPES) -> None:
    if t.dtype not in allowed:
        raise ValueError(f"{name} must have dtype in {tuple(allowed)} for the Triton kernels, got {t.dtype}")


def check_same(
    name: str, t: torch.Tensor | None, ref: torch.Tensor, *, dtype: bool = True, shape: bool = True
) -> None:
    if t is None:
        return
    if shape and t.shape != ref.shape:
        raise ValueError(f"{name} must have shape {tuple(ref.shape)}, got {tuple(t.shape)}")
    if dtype and t.dtype != ref.dtype:
        raise ValueError(f"{name} must have dtype {ref.dtype}, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device}, got {t.device}")


def check_mask(mask: torch.Tensor | None, ref: torch.Tensor) -> None:
    if mask is None:
        return
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must have dtype torch.bool, got {mask.dtype}")
    check_same("mask", mask, ref, dtype=False)


#: the largest tile side any kernel here addresses with int32 tile-local offsets
MAX_TILE = 256


def check_tile_offsets(name: str, t: torch.Tensor | None, tile: int = MAX_TILE) -> None:
    """Epilogues address a (tile × tile) piece of a 2-D tensor as a 64-bit origin plus int32 offsets
    (64-bit offsets per element cost registers and made tiles spill); refuse strides where they overflow."""
    if t is None:
        return
    reach = (tile - 1) * sum(abs(s) for s in t.stride())
    if reach > INT32_MAX:
        raise ValueError(
            f"{name} has strides {tuple(t.stride())}: a {tile}×{tile} tile spans {reach} elements, more than "
            f"the int32 tile offsets of the Triton kernels allow ({INT32_MAX}); use a contiguous tensor or "
            "the reference backend"
        )


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for fp32 operands, following torch's matmul precision setting.

    * ``"highest"`` (torch's default) -> ``"tf32x3"``: each fp32 operand is split into a TF32 high part
      and a TF32 remainder and three tensor-core products are summed (the lo·lo term is dropped), so
      every product keeps about 21 of fp32's 24 significant bits, accumulated in fp32 -- fp32-class
      results at tensor-core speed. Triton's exact-IEEE fp32 ``tl.dot`` is a scalar FMA loop instead:
      on sm_90 ptxas gives the masked_linear forward tile 32 registers and 10.7 KB of spill stores per
      thread (bench/kernel_resources.py), and the H200 ran it 25x slower than cuBLAS
      (bench/results/gpu/README.md). Users who need bit-exact IEEE fp32 products take the reference
      backend (``SPARSE_ENGINE_BACKEND=reference``: θ materialised + cuBLAS).
    * ``"high"`` / ``"medium"`` -> ``"tf32"``: what torch's own matmul does under those settings.

    fp16/bf16 operands ignore it.
    """
    if dtype != torch.float32:
        return "ieee"  # irrelevant for 16-bit operands; one value keeps the number of variants down
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


@dataclasses.dataclass
class Launch:
    """One kernel launch: ``kernel[grid](**args)``. ``args`` holds every non-config argument by name."""

    kernel: Any  # triton JITFunction or Autotuner
    grid: Callable[[dict], tuple[int, ...]] | tuple[int, ...]
    args: dict[str, Any]
    #: config used instead of autotuning (tests pick tile shapes this way); None: the kernel's own
    config: Any = None

    def run(self) -> None:
        if self.config is not None:
            jit = self.kernel.fn if hasattr(self.kernel, "configs") else self.kernel
            meta = dict(self.config.kwargs)
            grid = self.grid(meta) if callable(self.grid) else self.grid
            if _empty_grid(grid):
                return
            jit[grid](**self.args, **meta, num_warps=self.config.num_warps, num_stages=self.config.num_stages)
            return
        if not callable(self.grid) and _empty_grid(self.grid):
            return
        if callable(self.grid) and not hasattr(self.kernel, "configs"):
            grid = self.grid({})
            if _empty_grid(grid):
                return
            self.kernel[grid](**self.args)
            return
        self.kernel[self.grid](**self.args)


def _empty_grid(grid: tuple[int, ...]) -> bool:
    return any(int(g) == 0 for g in grid)


def ordered_args(kernel, args: dict, config_keys) -> dict:
    """``args`` in the kernel's parameter order; raises if one is missing or unknown.

    ``config_keys`` are the parameters a triton.Config supplies (tile sizes), absent from ``args``.
    """
    import inspect

    fn = kernel.fn if hasattr(kernel, "fn") else kernel
    names = [n for n in inspect.signature(fn).parameters if n not in config_keys]
    missing = [n for n in names if n not in args]
    extra = [n for n in args if n not in names]
    if missing or extra:
        raise TypeError(f"{fn.__name__}: missing arguments {missing}, unexpected {extra}")
    return {n: args[n] for n in names}


# --------------------------------------------------------------------------------------- AOT compile


def jit_of(kernel):
    """The JITFunction under an Autotuner (or the kernel itself)."""
    return kernel.fn if hasattr(kernel, "configs") else kernel


def configs_of(kernel, config=None) -> list:
    if config is not None:
        return [config]
    if hasattr(kernel, "configs"):
        return list(kernel.configs)
    return [triton.Config({}, num_warps=4, num_stages=3)]


def signature_of(launch: Launch, aligned: bool, config) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of ``launch`` as Triton's launcher would specialise it.

    ``aligned``: every pointer is 16-byte aligned (what torch's allocator gives); integer arguments are
    specialised by value exactly like a real launch (1 becomes a constant, multiples of 16 get the
    divisibility hint), so the unit-stride and divisible-by-16 code paths are the ones compiled.
    """
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    fn = jit_of(launch.kernel)
    values = dict(launch.args)
    values.update(config.kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        name = p.name
        if name not in values:
            raise KeyError(f"{fn.__name__}: no value for argument {name!r}")
        v = values[name]
        if p.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = v
            continue
        if isinstance(v, torch.Tensor):
            signature[name] = "*" + _TL_NAMES[v.dtype]
            if aligned and not p.do_not_specialize_on_alignment:
                attrs[(i,)] = [["tt.divisibility", 16]]
            continue
        if isinstance(v, bool) or isinstance(v, float):
            signature[name] = "i1" if isinstance(v, bool) else "fp32"
            continue
        if isinstance(v, int):
            if p.do_not_specialize:
                signature[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
                continue
            kind, spec = native_specialize_impl(BaseBackend, v, False, True, aligned)
            if kind == "constexpr":
                signature[name] = "constexpr"
                constexprs[name] = spec
            else:
                signature[name] = kind
                if spec == "D":
                    attrs[(i,)] = [["tt.divisibility", 16]]
            continue
        raise TypeError(f"{fn.__name__}: cannot specialise argument {name}={v!r}")
    return signature, constexprs, attrs


#: the most dynamic shared memory one block may use, by SM major.minor (CUDA programming guide)
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ------------------------------------------------------------------------------- elementwise layouts


def as_2d(t: torch.Tensor) -> torch.Tensor:
    """A 2-D (R, C) view of ``t`` (R = first dim; 1-D becomes (1, n)); a copy only if no view exists."""
    if t.dim() == 2:
        return t
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t.unsqueeze(0)
    return t.reshape(t.shape[0], -1)


def all_contiguous(*ts: torch.Tensor | None) -> bool:
    return all(t is None or t.is_contiguous() for t in ts)


def elementwise_grid(flat: bool, numel: int, rows: int, cols: int):
    """Grid for the elementwise kernels: 1-D over ``numel`` (FLAT) or 2-D tiles over (rows, cols)."""
    if flat:
        return lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(cols, meta["BLOCK_C"]))


def elementwise_config(gpu: bool = False) -> triton.Config:
    """Tile sizes of the elementwise kernels: big tiles in the interpreter (each program costs ms)."""
    if interpreting() and not gpu:
        return triton.Config({"BLOCK": 65536, "BLOCK_R": 128, "BLOCK_C": 256}, num_warps=4, num_stages=1)
    return triton.Config({"BLOCK": 2048, "BLOCK_R": 16, "BLOCK_C": 128}, num_warps=8, num_stages=1)


@triton.jit
def ew_offsets(
    FLAT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, numel, rows, cols
):
    """(flat offsets or (rows, cols) index pair, in-bounds mask) of this program's tile."""
    # one return statement: the compiler rejects differently shaped returns even under a constexpr if
    if FLAT:
        r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        c = r
        inb = r < numel
    else:
        rr = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cc = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        r = rr[:, None]
        c = cc[None, :]
        inb = (rr < rows)[:, None] & (cc < cols)[None, :]
    return r, c, inb


@triton.jit
def ew_at(FLAT: tl.constexpr, r, c, s0, s1):
    """Element offsets of one operand: the flat offsets themselves, or r·s0 + c·s1."""
    if FLAT:
        off = r
    else:
        off = r * s0 + c * s1
    return off


def strides_2d(t: torch.Tensor | None) -> tuple[int, int]:
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def strides(dims: str, order: tuple[int, int] = (0, 1), **tensors: torch.Tensor | None) -> dict[str, int]:
    """A kernel's stride arguments of 2-D tensors, named ``s_<name><dim>``:
    ``strides("mk", x=x)`` -> ``{"s_xm": x.stride(0), "s_xk": x.stride(1)}``. ``order``: the tensor dim of
    each name dim (``(1, 0)``: a transposed view); a None tensor gets strides 0 (the kernel never reads it)."""
    out = {}
    for name, t in tensors.items():
        st = strides_2d(t)
        out.update({f"s_{name}{d}": st[i] for d, i in zip(dims, order)})
    return out
