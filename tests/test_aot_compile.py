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

import os

import pytest

pytestmark = pytest.mark.aot

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip(
        "AOT compile needs TRITON_INTERPRET=0 (run `TRITON_INTERPRET=0 pytest -m aot` in its own process, "
        "as scripts/test.sh does)",
        allow_module_level=True,
    )

triton = pytest.importorskip("triton", reason="triton is not installed: nothing to compile")

from sparse_engine.kernels import _aot  # noqa: E402  (after the interpreter check)
from sparse_engine.kernels._common import MAX_SHARED, jit_of  # noqa: E402

MODULES = _aot.MODULES


@pytest.mark.parametrize("module_name", MODULES)
def test_every_launch_compiles_for_sm80_and_sm90(module_name):
    jobs = _aot.jobs(module_name)
    assert jobs, f"{module_name}.aot_launches() lists nothing to compile"
    # ptxas -v (registers, spills) only where it is checked: the matmul kernels
    names = [name for name, _, _ in _aot.module(module_name).aot_launches()]
    matmul = [j for j in jobs if names[j[1]].startswith(_aot.MATMUL_PREFIXES)]
    rest = [j for j in jobs if j not in matmul]
    results = (_aot.run_jobs(matmul, usage=True) if matmul else []) + (_aot.run_jobs(rest) if rest else [])
    errors = [f"{r['name']} sm_{r['arch']} {r['config']}: {r['error']}" for r in results if r["error"]]
    assert not errors, f"{len(errors)} of {len(results)} compiles failed:\n" + "\n\n".join(errors[:5])

    # Shared memory: the autotuner drops a config that does not fit (OutOfResources at launch), but
    # every launch must keep at least one config that fits on each architecture.
    fits: dict[tuple[str, int], list[bool]] = {}
    for r in results:
        fits.setdefault((r["name"], r["arch"]), []).append(r["shared"] <= MAX_SHARED[r["arch"]])
    too_big = [f"{name} sm_{arch}" for (name, arch), ok in fits.items() if not any(ok)]
    assert not too_big, f"no config fits in shared memory for: {too_big}"

    # Tensor cores: every matmul (16-bit, TF32, 3xTF32) compiles to mma / wgmma, not a scalar FMA loop.
    scalar = [
        f"{r['name']} sm_{r['arch']}"
        for r in results
        if r["name"].startswith(_aot.MATMUL_PREFIXES) and not r["tensor_core_ops"]
    ]
    assert not scalar, f"matmul kernels without tensor-core instructions: {scalar[:5]}"

    # Registers: a tile that does not fit spills to local memory (the IEEE-fp32 dot spilled 10.7 KB per
    # thread and ran 25x slower than cuBLAS). Like shared memory, the autotuner may hold a config that
    # spills a little, but every matmul launch keeps at least one config that does not spill at all
    # (checked where the whole config list is compiled: the sweep launches).
    spill_free: dict[tuple[str, int], list[bool]] = {}
    for r in results:
        if r["name"].startswith(_aot.MATMUL_PREFIXES) and r["sweep"]:
            spill_free.setdefault((r["name"], r["arch"]), []).append(r["spill_stores"] == 0)
    spilling = [f"{name} sm_{arch}" for (name, arch), ok in spill_free.items() if not any(ok)]
    assert not spilling, f"every config spills registers for: {spilling[:5]}"
    worst = max((r for r in results if "spill_stores" in r), key=lambda r: r["spill_stores"], default=None)
    if worst is not None:
        print(f"{module_name}: largest spill {worst['spill_stores']} B ({worst['name']} sm_{worst['arch']} "
              f"{worst['config']})")
    total = sum(r["seconds"] for r in results)
    print(f"{module_name}: {len(results)} compiles, {total:.1f} s of compile time")


@pytest.mark.parametrize("module_name", MODULES)
def test_plan_covers_every_kernel(module_name):
    """Every @triton.jit kernel of the module appears in its AOT plan (a new kernel cannot be missed)."""
    mod = _aot.module(module_name)
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


def test_kernel_resources_script_writes_its_table(tmp_path):
    """bench/kernel_resources.py (the registers / spills table) runs and writes one row per compile."""
    import csv
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "kernel_resources.py"
    run = subprocess.run(
        [sys.executable, str(script), "--modules", "signin_reset", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "kernel_resources.csv")))
    assert len(rows) == len(_aot.jobs("signin_reset"))
    assert all(int(r["registers"]) > 0 and r["error"] == "" for r in rows)
    assert {r["arch"] for r in rows} == {"80", "90"}
