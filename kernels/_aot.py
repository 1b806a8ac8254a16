"""Ahead-of-time compile of the kernels' launch plans for a GPU that is not here.

Each kernel module lists, in ``aot_launches()``, every specialisation a GPU run can launch (name, Launch
prepared on ``meta`` tensors, sweep). This module turns that plan into compile jobs
(module, launch index, config index, arch), compiles them with ``triton.compile(...,
target=GPUTarget("cuda", arch, 32))`` in a process pool, and, on request, asks ptxas what each compiled
kernel costs (registers, spills). Used by tests/test_aot_compile.py (must compile, fit, use tensor cores,
not spill) and bench/kernel_resources.py (the table). Needs ``TRITON_INTERPRET=0``: under the
interpreter the kernels are InterpretedFunctions that cannot be compiled.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import multiprocessing
import os
import re
import subprocess
import tempfile
import time

import triton

from ._common import configs_of, jit_of, signature_of

MODULES = ["reparam", "masked_linear", "block_sparse_linear", "fused_step", "signin_reset", "prune_threshold"]
ARCHS = (80, 90)
#: launches whose kernels are matmuls: they must use tensor cores and keep their tiles in registers
MATMUL_PREFIXES = ("masked_linear_", "bsr_")


def module(name: str):
    return importlib.import_module(f"sparse_engine.kernels.{name}")


def plan_configs(launch, sweep: bool) -> list:
    """Every autotune config for a sweep; else the config the launcher picked (or the first)."""
    if sweep:
        return configs_of(launch.kernel)
    return configs_of(launch.kernel, launch.config)[:1]


def jobs(module_name: str, archs=ARCHS) -> list[tuple[str, int, int, int]]:
    """(module, launch index, config index, arch) for every compile of a module's plan."""
    out = []
    for i, (_, launch, sweep) in enumerate(module(module_name).aot_launches()):
        for c in range(len(plan_configs(launch, sweep))):
            for arch in archs:
                out.append((module_name, i, c, arch))
    return out


def compile_launch(launch, cfg, arch: int, aligned: bool = True):
    """``launch`` with config ``cfg`` compiled for ``sm_<arch>`` (a triton CompiledKernel)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs = signature_of(launch, aligned, cfg)
    return triton.compile(
        ASTSource(fn=jit_of(launch.kernel), signature=sig, constexprs=consts, attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
    )


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Per-thread registers and spill bytes of one compiled kernel, from ``ptxas -v``.

    Runs the ptxas Triton itself uses on the kernel's PTX (Triton keeps that log to itself). Spills are
    the signature of a tile that does not fit the register file: Triton's IEEE-fp32 dot on sm_90 spilled
    10.7 KB per thread in the masked_linear forward and ran 25x slower than cuBLAS on an H200.
    """
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run(
            # the flags Triton's own make_cubin passes (regAllocOptLevel=2 included: without it ptxas
            # allocates some kernels differently from what Triton ships)
            [
                get_ptxas(arch).path,
                "-lineinfo",
                "-v",
                "--regAllocOptLevel=2",
                f"--gpu-name={sm_arch_from_capability(arch)}",
                src,
                "-o",
                os.path.join(d, "kernel.cubin"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    if run.returncode != 0:
        raise RuntimeError(f"ptxas failed for sm_{arch}: {run.stderr[-1500:]}")

    def number(pattern: str) -> int:
        found = re.search(pattern, run.stderr)
        return int(found.group(1)) if found else 0

    return dict(
        registers=number(r"Used (\d+) registers"),
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"),
    )


def compile_job(job, usage: bool = False) -> dict:
    """Compile one (module, launch, config, arch) job; never raises (the error is in the result).

    usage: also run ptxas -v (registers, spills) -- about a second more per kernel.
    """
    module_name, i, c, arch = job
    name, launch, sweep = module(module_name).aot_launches()[i]
    cfg = plan_configs(launch, sweep)[c]
    result = dict(module=module_name, name=name, arch=arch, config=str(cfg), sweep=sweep, error=None)
    t0 = time.perf_counter()
    try:
        ck = compile_launch(launch, cfg, arch)
        ptx = ck.asm["ptx"]
        result.update(
            shared=int(ck.metadata.shared),
            tensor_core_ops=len(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)\b", ptx)),
        )
        if usage:
            result.update(ptxas_usage(ptx, arch))
    except Exception as e:  # reported by the caller with the launch's name
        result.update(shared=None, tensor_core_ops=0, error=f"{type(e).__name__}: {str(e)[-1500:]}")
    result["seconds"] = time.perf_counter() - t0
    return result


def _usage_job(job):
    return compile_job(job, usage=True)


def run_jobs(job_list, usage: bool = False) -> list[dict]:
    """compile_job over ``job_list`` in a process pool (one worker per core), results in order."""
    workers = max(1, min(len(job_list), os.cpu_count() or 1))
    ctx = multiprocessing.get_context("fork")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(_usage_job if usage else compile_job, job_list, chunksize=4))
