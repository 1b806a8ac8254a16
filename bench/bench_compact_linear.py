"""Inference (forward only) of a compact sparse Linear layer against torch's dense and sparse baselines.

    python bench/bench_compact_linear.py               # CPU, full grid (~2-4 min on 2 cores)
    python bench/bench_compact_linear.py --quick       # one layer, two sparsities
    python bench/bench_compact_linear.py --device cuda # the CUDA kernels vs cuBLAS / cuSPARSE

Layers (weight (N, K) = (out, in)):
* 4096x4096: a hidden projection of a 7B-class transformer / a wide MLP;
* 3072x768:  BERT-base's FFN up-projection, nn.Linear(768, 3072);
* 300x784:   LeNet-300-100's first layer (where a fixed per-call cost shows at batch 1).
Sparsity 80/90/95/98 % (uniform random mask), batch 1, 16, 64, 256.

Providers, all on the same masked weight and input:
* ``dense``        torch F.linear on the dense masked weight (MKL / cuBLAS): what ships today;
* ``torch_sparse`` torch.sparse CSR: the faster of ``torch.sparse.mm(W_csr, xᵀ)ᵀ`` and ``F.linear(x, W_csr)``
                   (measured per case; the CSV says which);
* ``cpp`` / ``cuda``  sparse_engine's compact_linear forward on the collapsed inference weight θ (values
                   (nnz,) + int32 CSR index): what ``extract`` ships;
* ``cpp_mw`` / ``cuda_mw``  the same with θ = m ⊙ w formed on the fly (the training-time forward);
* ``cpp_wide``     ``cpp`` under the former batch-panel budget (8 MiB; the default is one core's L2, at
                   most 512 KiB): the A side of that change.
Time: median (headline) and minimum (best run: least disturbed by other processes on a shared
machine) of repeated calls after warm-up; providers interleaved round by round so that load from
other processes hits all of them alike. GFLOP/s counts 2·nnz·B for the sparse providers (only the work a
sparse kernel must do) and 2·N·K·B for dense. Rows go to runs/bench/compact_linear_<device>.csv (unless --out) with
machine, torch version, commit, threads and load average.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import cpu_name, git_commit, write_csv  # noqa: E402  (bench/, the script's folder)

from sparse_engine import layout  # noqa: E402

LAYERS = {"4096x4096": (4096, 4096), "3072x768": (3072, 768), "300x784": (300, 784)}
SPARSITIES = (0.80, 0.90, 0.95, 0.98)
BATCHES = (1, 16, 64, 256)


# --------------------------------------------------------------------------------------- helpers


def machine() -> str:
    return f"{cpu_name()} ({os.cpu_count()} cpus)"


def loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_interleaved(fns: dict, device: str, *, min_time: float, min_reps: int = 5, max_reps: int = 200,
                      burst: int = 1, clock=time.perf_counter) -> dict:
    """Median seconds per call of each fn; one sample of every fn per round, rounds until min_time. A sample
    is the mean of ``burst`` back-to-back calls: 1 times each call after the other providers ran (cold
    caches); more times the steady state of a loop of calls (warm caches, as a serving loop runs)."""
    for fn in fns.values():  # warm-up (caches, lazy init, thread pools)
        fn()
        fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_reps and (rounds < min_reps or time.perf_counter() - start < min_time):
        for name, fn in fns.items():
            sync(device)
            t0 = clock()
            for _ in range(burst):
                fn()
            sync(device)
            times[name].append((clock() - t0) / burst)
        rounds += 1
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


# --------------------------------------------------------------------------------------------- run


def make_case(n: int, k: int, sparsity: float, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    nnz = round((1.0 - sparsity) * n * k)
    flat = torch.zeros(n * k, dtype=torch.bool)
    flat[torch.randperm(n * k, generator=g)[:nnz]] = True
    mask = flat.reshape(n, k)
    idx = layout.CSRIndex.from_mask(mask)
    m_dense = torch.rand(n, k, generator=g) + 0.5
    w_dense = torch.randn(n, k, generator=g) / k**0.5
    theta = torch.where(mask, m_dense * w_dense, torch.zeros(()))
    bias = torch.randn(n, generator=g)
    return (idx.to(device), idx.gather(m_dense).to(device), idx.gather(w_dense).to(device),
            idx.gather(theta).to(device), theta.to(device), bias.to(device))


def run(args) -> list[dict]:
    device = args.device
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA GPU visible to torch")
        import sparse_engine.ops._cuda as backend
        ours = "cuda"
    else:
        import sparse_engine.ops._cpp as backend
        ours = "cpp"
    if backend.UNAVAILABLE:
        raise SystemExit(f"the {ours} extension is unavailable: {backend.UNAVAILABLE}")
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = {k: v for k, v in LAYERS.items() if k in args.layers}
    info = dict(machine=machine() if device == "cpu" else torch.cuda.get_device_name(),
                torch=torch.__version__, commit=git_commit(), threads=torch.get_num_threads(),
                isa=backend.isa() if ours == "cpp" else "sm_%d%d" % torch.cuda.get_device_capability())
    print(f"# {info['machine']} | torch {info['torch']} | commit {info['commit']} | threads {info['threads']} | "
          f"{ours} kernels: {info['isa']} | load average {loadavg()}")
    rows = []
    for lname, (n, k) in layers.items():
        for sp in args.sparsities:
            idx, mv, wv, tv, theta, bias = make_case(n, k, sp, device)
            fields = (idx.crow, idx.col, idx.row, idx.ccol, idx.row_t, idx.perm)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                theta_csr = theta.to_sparse_csr()
            for b in args.batches:
                x = torch.randn(b, k, device=device)
                fns = {
                    "dense": lambda: F.linear(x, theta, bias),
                    "torch_sparse_mm": lambda: torch.sparse.mm(theta_csr, x.t()).t() + bias,
                    "torch_sparse_linear": lambda: F.linear(x, theta_csr, bias),
                    ours: lambda: backend.compact_linear_fwd(x, None, tv, bias, *fields, n, k),
                    f"{ours}_mw": lambda: backend.compact_linear_fwd(x, mv, wv, bias, *fields, n, k),
                }
                if ours == "cpp":
                    fns["cpp_wide"] = lambda: wide_panels(backend, x, tv, bias, fields, n, k)
                    fns.update(module_providers(x, theta, bias, idx, tv, backend))
                # same result from every provider (a benchmark of a wrong kernel is worthless)
                want = fns["dense"]()
                for name, fn in fns.items():
                    got = fn()
                    if not torch.allclose(got, want, rtol=1e-3, atol=1e-3):
                        raise SystemExit(f"{name} disagrees with dense on {lname} sp={sp} B={b}: "
                                         f"max err {(got - want).abs().max().item():.3g}")
                both = bench_interleaved(fns, device, min_time=args.min_time, burst=args.burst,
                                         clock=time.process_time if args.clock == "cpu" else time.perf_counter)
                t = {k: v[0] for k, v in both.items()}  # medians: the headline numbers
                tmin = {k: v[1] for k, v in both.items()}  # best run: least disturbed by other processes
                sparse_name = min(("torch_sparse_mm", "torch_sparse_linear"), key=t.get)
                t_sparse, t_sparse_min = t[sparse_name], tmin[sparse_name]
                nnz = tv.numel()
                for prov in ("dense", "torch_sparse", ours, f"{ours}_mw", "cpp_wide", *MODULE_PROVIDERS):
                    if prov not in t and prov != "torch_sparse":
                        continue
                    secs = t_sparse if prov == "torch_sparse" else t[prov]
                    best = t_sparse_min if prov == "torch_sparse" else tmin[prov]
                    flops = 2.0 * (n * k if prov in ("dense", "dense_module") else nnz) * b
                    rows.append(dict(info, device=device, clock=args.clock, burst=args.burst, layer=lname, N=n, K=k, sparsity=sp, batch=b, provider=prov,
                                     variant=sparse_name if prov == "torch_sparse" else "",
                                     median_ms=secs * 1e3, min_ms=best * 1e3, gflops=flops / secs / 1e9,
                                     speedup_vs_dense=t["dense"] / secs, speedup_vs_torch_sparse=t_sparse / secs,
                                     speedup_vs_dense_min=tmin["dense"] / best,
                                     speedup_vs_torch_sparse_min=t_sparse_min / best, loadavg=loadavg()))
                print(f"{lname:>9} sp={sp:.2f} B={b:>3}: dense {t['dense'] * 1e3:8.3f} ms | torch.sparse "
                      f"{t_sparse * 1e3:8.3f} ms | {ours} {t[ours] * 1e3:8.3f} ms "
                      f"(x{t['dense'] / t[ours]:5.2f} vs dense, x{t_sparse / t[ours]:5.2f} vs torch.sparse) | "
                      f"{ours}_mw {t[f'{ours}_mw'] * 1e3:8.3f} ms | best-run ratios x{tmin['dense'] / tmin[ours]:5.2f} / "
                      f"x{t_sparse_min / tmin[ours]:5.2f}")
                if "cpp_wide" in t:
                    print(f"{'':>9} former 8 MiB panel budget: {t['cpp_wide'] * 1e3:8.3f} ms "
                          f"(the default x{t['cpp_wide'] / t[ours]:5.2f} faster)")
                if "infer_module" in t:
                    print(f"{'':>9} modules: nn.Linear {t['dense_module'] * 1e3:8.4f} ms | extracted InferLinear csr "
                          f"{t['infer_module'] * 1e3:8.4f} ms (x{t['dense_module'] / t['infer_module']:5.2f}, best "
                          f"run x{tmin['dense_module'] / tmin['infer_module']:5.2f}) | with int32 columns "
                          f"{t['infer_module_int32'] * 1e3:8.4f} ms (x{t['dense_module'] / t['infer_module_int32']:5.2f}; "
                          f"16-bit x{t['infer_module_int32'] / t['infer_module']:5.2f} faster, best run "
                          f"x{tmin['infer_module_int32'] / tmin['infer_module']:5.2f})"
                          f" | lean entry {t['cpp_infer'] * 1e3:8.4f} ms vs registered op {t[ours] * 1e3:8.4f} ms")
    return rows


def wide_panels(backend, x, tv, bias, fields, n, k):
    """The ``cpp`` provider under the former panel budget (8 MiB; the default is now one core's L2, at most
    512 KiB): the A side of the panel A/B (``cpp_wide``)."""
    with backend.use_panel_budget(backend.FORMER_PANEL_BUDGET):
        return backend.compact_linear_fwd(x, None, tv, bias, *fields, n, k)


#: CPU providers at the module level (what a user of ``extract`` calls), no gradient wanted:
#: ``dense_module`` nn.Linear on θ; ``infer_module`` the extracted csr InferLinear (its eager path: the
#: backend's lean entry); ``cpp_infer`` that entry alone (sparse_engine._C.compact_linear_infer: a CPython
#: call, no dispatcher), to set beside ``cpp`` (the registered op through torch.ops, the former path);
#: ``infer_module_int32`` the same InferLinear without its 16-bit copy of the columns (its forward then
#: reads the int32 ones, as before that copy): the A side of that change. (An earlier row,
#: ``infer_module_environ``, timed the former ``os.environ.get`` lookup; its CSVs stay in bench/results.)
MODULE_PROVIDERS = ("dense_module", "infer_module", "infer_module_int32", "cpp_infer")


def module_providers(x, theta, bias, idx, tv, backend) -> dict:
    from sparse_engine.export.infer import InferLinear

    n, k = theta.shape
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(theta)
        lin.bias.copy_(bias)
    lin.requires_grad_(False)
    mod = InferLinear(theta, bias, "csr", idx.to_mask())
    mod32 = InferLinear(theta, bias, "csr", idx.to_mask())
    mod32.col16 = None
    # no gradient anywhere (x, θ and the parameters need none): both modules take their no-grad paths, and
    # the lean entry computes (it answers None, timing nothing, for what is the registered op's case)
    if backend.compact_linear_infer(x, tv, bias, idx.crow, idx.col, n, k) is None:
        raise RuntimeError("compact_linear_infer declined these inputs: the cpp_infer row would time nothing")
    return {"dense_module": lambda: lin(x), "infer_module": lambda: mod(x), "infer_module_int32": lambda: mod32(x),
            "cpp_infer": lambda: backend.compact_linear_infer(x, tv, bias, idx.crow, idx.col, n, k)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="4096x4096 at 90 and 98 %% only")
    p.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    p.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    p.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--min-time", type=float, default=0.4, help="seconds of timed rounds per case")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: perf_counter; cpu: process CPU time, which leaves out the time the process waits "
                        "for a core on a busy machine (CPU, --threads 1 only)")
    p.add_argument("--burst", type=int, default=1,
                   help="calls per timed sample (1: each call cold after the other providers; more: warm loop)")
    p.add_argument("--out", type=Path, default=None, help="CSV path (default runs/bench/compact_linear_<device>.csv)")
    args = p.parse_args(argv)
    if args.clock == "cpu" and (args.device != "cpu" or args.threads != 1):
        p.error("--clock cpu needs --device cpu and --threads 1 (CPU time of several threads adds up)")
    if args.burst < 1:
        p.error(f"--burst must be >= 1, got {args.burst}")
    if args.quick:
        args.layers, args.sparsities = ["4096x4096"], [0.90, 0.98]
    rows = run(args)
    write_csv(rows, args.out or ROOT / "runs" / "bench" / f"compact_linear_{args.device}.csv")


if __name__ == "__main__":
    main()
