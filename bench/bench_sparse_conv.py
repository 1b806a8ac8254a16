"""Sparse convolutions on CPU: SparseConv2d (direct C++ sparse conv, and the dense+mask layout) against
torch's nn.Conv2d, forward + backward, on the 3×3 layers of small ResNets.

    python bench/bench_sparse_conv.py [--threads 1,2] [--clock wall] [--batch 128] [--density 0.1] [--out DIR]

Rows: dense nn.Conv2d (the baseline), SparseConv2d layout=dense (dense weight times a mask), layout=csr
(``ops.sparse_conv2d``: no im2col; forward and backward behind one C++ autograd node), ``layout=csr custom
op`` (the same kernels through the Python custom op's autograd, as before that node: the A side of that
change), and ``F.unfold`` alone (the im2col copy the csr path used to need: more than the whole dense
convolution). Each time is the best single call over interleaved rounds
(robust to other processes on the machine); ratios are against nn.Conv2d measured in the same run, at
the same thread count. ``--clock cpu`` times with the process CPU clock instead of the wall clock (one
thread only: it leaves out the time the process waits for a core on a busy machine). Writes
sparse_conv_cpu.csv (sparse_conv_cpu_cpuclock.csv with --clock cpu; to runs/bench unless --out) with machine / versions / commit / load average.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

#: (in_channels, out_channels, height = width): the three stages of a CIFAR-style ResNet at 28×28 input
SHAPES = [(16, 16, 28), (32, 32, 14), (64, 64, 7)]


def measure_shape(cin: int, cout: int, hw: int, args, clock) -> dict[str, float]:
    """Best single-call time (ms) of each provider, fwd+bwd, over interleaved rounds."""
    import torch
    import torch.nn.functional as F

    from sparse_engine.nn import SparseConv2d

    x = torch.randn(args.batch, cin, hw, hw, requires_grad=True)
    mods = {
        "nn.Conv2d": torch.nn.Conv2d(cin, cout, 3, padding=1),
        "layout=dense": SparseConv2d(cin, cout, 3, padding=1, kind="signin", density=args.density),
        "layout=csr": SparseConv2d(cin, cout, 3, padding=1, kind="signin", density=args.density, layout="csr"),
    }

    def step(mod):
        def run():
            mod(x).sum().backward()
        return run

    def custom_op(fn):
        # ops.backends.extra finds no whole-call entry: the layer takes the Python custom op
        from sparse_engine.ops import backends

        def run():
            real = backends.extra
            backends.extra = lambda *a, **k: None
            try:
                fn()
            finally:
                backends.extra = real
        return run

    calls = {name: step(mod) for name, mod in mods.items()}
    calls["layout=csr custom op"] = custom_op(calls["layout=csr"])
    calls["F.unfold only"] = lambda: F.unfold(x.detach(), 3, padding=1)
    best = {name: float("inf") for name in calls}
    reps = 3 if args.quick else 10
    for fn in calls.values():  # warm-up (allocations, thread pools)
        fn()
    for _ in range(args.rounds):
        for name, fn in calls.items():
            for _ in range(reps):
                t0 = clock()
                fn()
                best[name] = min(best[name], (clock() - t0) * 1e3)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts, each measured in turn")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: perf_counter; cpu: process CPU time (needs --threads 1)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the best call of each is kept")
    p.add_argument("--quick", action="store_true", help="batch 8, 2 rounds (a smoke test)")
    p.add_argument("--out", default=str(common.SCRATCH))
    args = p.parse_args(argv)
    if not 0 < args.density <= 1:
        p.error(f"--density must be in (0, 1], got {args.density}")
    threads = common.thread_counts(p, args.threads, args.clock)
    if args.quick:
        args.batch, args.rounds = 8, 2

    import torch

    from sparse_engine.ops import backends

    torch.manual_seed(0)
    env = common.environment("quick" if args.quick else "full", "cpu")
    backend = backends.select("sparse_conv2d_fwd", torch.device("cpu"), torch.float32)[0]  # the csr kernel
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rows = []
    for nthreads in threads:
        torch.set_num_threads(nthreads)
        for cin, cout, hw in SHAPES:
            load = " ".join(f"{v:.2f}" for v in os.getloadavg())
            best = measure_shape(cin, cout, hw, args, clock)
            base = best["nn.Conv2d"]
            for name, ms in best.items():
                rows.append(dict(shape=f"{cin}->{cout} {hw}x{hw} b{args.batch}", density=args.density, provider=name,
                                 time_ms=round(ms, 3), vs_dense=round(base / ms, 3), threads=nthreads,
                                 clock=args.clock, loadavg=load, backend=backend, **env))
            print(f"{nthreads}t {cin:>3}->{cout:<3} {hw:>2}x{hw:<2} " + " | ".join(
                f"{name} {best[name]:.2f} ms ({base / best[name]:.2f}x)" for name in best) + f" | load {load}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "sparse_conv_cpu" + ("_quick" if args.quick else "") + ("_cpuclock" if args.clock == "cpu" else "")
    path = out / f"{name}.csv"
    common.write_csv(rows, path)
    print(f"(fwd+bwd, best call of {args.rounds} rounds, {args.clock} clock; x = speed vs nn.Conv2d)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
