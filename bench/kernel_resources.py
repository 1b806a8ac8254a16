"""What every Triton kernel configuration costs on sm_80 / sm_90, without a GPU: registers, spills,
shared memory, tensor-core instructions.

    TRITON_INTERPRET=0 python bench/kernel_resources.py [--modules masked_linear,...] [--out DIR]

Compiles each kernel module's AOT plan (``aot_launches()``: exactly what the launchers launch, see
kernels/_aot.py) with ``triton.compile(target=GPUTarget("cuda", arch, 32))`` and runs ptxas -v on the
PTX. A static explanation of GPU timings: a config that spills registers or runs without tensor cores
cannot be fast whatever the GPU. Writes ``kernel_resources.csv`` (one row per launch × config × arch,
with triton version and commit) and prints, per launch and arch, the best config's numbers.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compiling needs real JITFunctions, not interpreted ones

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

FIELDS = [
    "module",
    "name",
    "arch",
    "config",
    "registers",
    "spill_stores",
    "spill_loads",
    "shared",
    "tensor_core_ops",
    "error",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--modules",
        default="masked_linear,block_sparse_linear",
        help="comma-separated kernel modules (default %(default)s; 'all' for every module)",
    )
    p.add_argument("--out", default=str(common.ROOT / "bench" / "results"), help="directory for the CSV")
    args = p.parse_args(argv)

    common.kernels("_common")  # maps kernels/ in when running from a checkout that was not installed
    from sparse_engine.kernels import _aot

    names = (
        _aot.MODULES if args.modules == "all" else [m.strip() for m in args.modules.split(",") if m.strip()]
    )
    unknown = sorted(set(names) - set(_aot.MODULES))
    if unknown:
        p.error(f"--modules: unknown {unknown}; known: {_aot.MODULES}")
    rows = []
    for name in names:
        results = _aot.run_jobs(_aot.jobs(name), usage=True)
        rows += results
        print(f"{name}: {len(results)} compiles, {sum(r['error'] is not None for r in results)} failed")

    env = common.environment("aot", "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "kernel_resources.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS + ["triton", "commit", "date"], extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "triton": env["triton"], "commit": env["commit"], "date": env["date"]})

    # per launch and arch: how many configs spill, and the config with the fewest spills / registers
    print(f"\n{'launch':44s} arch configs spilling  best: regs spill smem(KB) tc-ops")
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        if r["error"] is None:
            groups.setdefault((r["name"], r["arch"]), []).append(r)
    for (name, arch), rs in groups.items():
        best = min(rs, key=lambda r: (r["spill_stores"], r["registers"]))
        spilling = sum(r["spill_stores"] > 0 for r in rs)
        print(
            f"{name:44s} {arch:4d} {len(rs):7d} {spilling:8d}  {best['registers']:10d} {best['spill_stores']:5d} "
            f"{best['shared'] / 1024:8.0f} {best['tensor_core_ops']:6d}"
        )
    for r in rows:
        if r["error"] is not None:
            print(f"FAILED {r['name']} sm_{r['arch']} {r['config']}: {r['error'][:300]}")
    print(f"\nwrote {path}")
    return 1 if any(r["error"] is not None for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
