"""AOT compile of the Triton kernels for sm_80 and sm_90, without a GPU (marker ``aot``).

The interpreter accepts code a GPU compile rejects (tl.dot with K < 16, differently shaped returns,
too much shared memory), so every kernel specialisation the launchers can produce is compiled here with
``triton.compile(..., target=GPUTarget("cuda", arch, 32))``. Each kernel module lists its launches with
``aot_launches()`` (name, Launch, sweep): the launcher's own argument preparation run on ``meta``
tensors, so what is compiled is exactly what a GPU run launches (integers specialised like a real
launch: unit strides become constants, multiples of 16 get the divisibility hint). ``sweep`` launches
compile every autotune config, the others the first one.

Runs only in its own process with ``TRITON_INTERPRET=0`` (``TRITON_INTERPRET=0 pytest -m aot``, as
scripts/test.sh does); under the interpreter the kernels are InterpretedFunctions that cannot be
compiled, so the tests skip with that reason. Compiles run in a process pool (one per core).
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import multiprocessing
import os
import time

import pytest

pytestmark = pytest.mark.aot

MODULES = ["reparam", "masked_linear", "block_sparse_linear", "fused_step", "signin_reset", "prune_threshold"]
ARCHS = (80, 90)
#: matmul kernels that must use tensor cores (mma / wgmma) unless their operands are IEEE fp32
MATMUL_PREFIXES = ("masked_linear_", "bsr_")

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip(
        "AOT compile needs TRITON_INTERPRET=0 (run `TRITON_INTERPRET=0 pytest -m aot` in its own process, "
        "as scripts/test.sh does)",
        allow_module_level=True,
    )

triton = pytest.importorskip("triton", reason="triton is not installed: nothing to compile")


def _module(name: str):
    return importlib.import_module(f"sparse_engine.kernels.{name}")


def _plan_configs(launch, sweep: bool) -> list:
    """Every autotune config for a sweep; else the config the launcher picked (or the first)."""
    from sparse_engine.kernels._common import configs_of

    if sweep:
        return configs_of(launch.kernel)
    return configs_of(launch.kernel, launch.config)[:1]


def _jobs(module_name: str) -> list[tuple[str, int, int, int]]:
    """(module, launch index, config index, arch) for every compile of a module's plan."""
    jobs = []
    for i, (_, launch, sweep) in enumerate(_module(module_name).aot_launches()):
        for c in range(len(_plan_configs(launch, sweep))):
            for arch in ARCHS:
                jobs.append((module_name, i, c, arch))
    return jobs


def _compile_job(job):
    """Runs in a worker process: compile one (launch, config, arch); never raises."""
    module_name, i, c, arch = job
    from sparse_engine.kernels._common import jit_of, signature_of
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, launch, sweep = _module(module_name).aot_launches()[i]
    cfg = _plan_configs(launch, sweep)[c]
    t0 = time.perf_counter()
    try:
        sig, consts, attrs = signature_of(launch, True, cfg)
        ck = triton.compile(
            ASTSource(fn=jit_of(launch.kernel), signature=sig, constexprs=consts, attrs=attrs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
        )
        ptx = ck.asm["ptx"]
        return dict(
            name=name,
            arch=arch,
            config=str(cfg),
            shared=int(ck.metadata.shared),
            mma=("mma" in ptx),
            error=None,
            seconds=time.perf_counter() - t0,
        )
    except Exception as e:  # reported by the test with the launch's name
        return dict(
            name=name,
            arch=arch,
            config=str(cfg),
            shared=None,
            mma=False,
            error=f"{type(e).__name__}: {str(e)[-1500:]}",
            seconds=time.perf_counter() - t0,
        )


def _run(jobs):
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    ctx = multiprocessing.get_context("fork")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(_compile_job, jobs, chunksize=4))


@pytest.mark.parametrize("module_name", MODULES)
def test_every_launch_compiles_for_sm80_and_sm90(module_name):
    from sparse_engine.kernels._common import MAX_SHARED

    jobs = _jobs(module_name)
    assert jobs, f"{module_name}.aot_launches() lists nothing to compile"
    results = _run(jobs)
    errors = [f"{r['name']} sm_{r['arch']} {r['config']}: {r['error']}" for r in results if r["error"]]
    assert not errors, f"{len(errors)} of {len(results)} compiles failed:\n" + "\n\n".join(errors[:5])

    # Shared memory: the autotuner drops a config that does not fit (OutOfResources at launch), but
    # every launch must keep at least one config that fits on each architecture.
    fits: dict[tuple[str, int], list[bool]] = {}
    for r in results:
        fits.setdefault((r["name"], r["arch"]), []).append(r["shared"] <= MAX_SHARED[r["arch"]])
    too_big = [f"{name} sm_{arch}" for (name, arch), ok in fits.items() if not any(ok)]
    assert not too_big, f"no config fits in shared memory for: {too_big}"

    # Tensor cores: 16-bit and TF32 matmuls must compile to mma / wgmma, not a scalar FMA loop.
    scalar = [
        f"{r['name']} sm_{r['arch']}"
        for r in results
        if r["name"].startswith(MATMUL_PREFIXES)
        and "-fp32-" not in r["name"]
        and "-float32-ieee-" not in r["name"]
        and not r["mma"]
    ]
    assert not scalar, f"matmul kernels without tensor-core instructions: {scalar[:5]}"
    total = sum(r["seconds"] for r in results)
    print(f"{module_name}: {len(results)} compiles, {total:.1f} s of compile time")


@pytest.mark.parametrize("module_name", MODULES)
def test_plan_covers_every_kernel(module_name):
    """Every @triton.jit kernel of the module appears in its AOT plan (a new kernel cannot be missed)."""
    from sparse_engine.kernels._common import jit_of

    mod = _module(module_name)
    kernels = {
        name
        for name, obj in vars(mod).items()
        if name.endswith("_kernel") and type(obj).__name__ == "JITFunction"
    }
    planned = {jit_of(launch.kernel).__name__ for _, launch, _ in mod.aot_launches()}
    assert kernels, f"found no kernels in {module_name}"
    assert kernels <= planned, (
        f"kernels missing from {module_name}.aot_launches(): {sorted(kernels - planned)}"
    )
