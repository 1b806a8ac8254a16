"""Shared helpers of the kernel benchmarks (bench_masked_linear, bench_block_sparse_linear, bench_fused_step).

* :func:`setup` parses the common flags and picks the mode *before* any Triton kernel is imported:
  ``--quick`` (automatic without a GPU) runs tiny sizes, on CPU through the Triton interpreter
  (``TRITON_INTERPRET=1``) — a smoke test for CI whose timings mean nothing and are marked so.
* :func:`kernels` imports ``sparse_engine.kernels.<op>`` even from a source checkout that was never
  pip-installed (the package-dir mapping kernels/ -> sparse_engine.kernels exists only after install).
* :func:`timeit`: warm-up (which also triggers autotuning), then the median of repeated runs, timed with
  CUDA events on a GPU and ``perf_counter`` on CPU.
* :class:`Registry` of providers: each names a way to run a case and returns the callable to time,
  or raises :class:`Unavailable` with the reason (printed and written to the CSV, never hidden).
* :class:`Results`: rows with machine / GPU / versions / commit columns, ratios against the baselines
  measured in the same run, a printed table and a CSV.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: where a run writes unless --out says otherwise (git ignores it); --out bench/results replaces the committed results
SCRATCH = ROOT / "runs" / "bench"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: columns every CSV row carries, after the measurement columns
ENV_FIELDS = ["mode", "device_name", "machine", "torch", "triton", "cuda", "python", "commit", "date"]
ROW_FIELDS = [
    "bench",
    "case",
    "model",
    "shape",
    "dtype",
    "density",
    "provider",
    "pass",
    "time_ms",
    "tflops",
    "gbps",
    "vs_dense",
    "vs_naive",
    "note",
]


class Unavailable(Exception):
    """A provider cannot run this case (the message says why; it goes to the CSV's note)."""


# ------------------------------------------------------------------------------------------- setup


def setup(
    description: str,
    argv: list[str] | None = None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """Parse --quick / --out / --reps (+ ``extra`` flags) and fix the mode; call before importing kernels."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes; on CPU under the Triton interpreter (automatic when no GPU is visible)",
    )
    p.add_argument(
        "--out", default=str(SCRATCH), help="directory for the CSV (default %(default)s)"
    )
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (also trigger autotuning)")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    import torch

    args.cuda = torch.cuda.is_available()
    if not args.cuda:
        args.quick = True
        # the kernels read TRITON_INTERPRET when their module is imported: set it first
        os.environ.setdefault("TRITON_INTERPRET", "1")
    args.device = "cuda" if args.cuda else "cpu"
    args.interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    args.mode = ("quick-" if args.quick else "") + ("interpreter" if args.interpreted else args.device)
    args.reps = args.reps or (2 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return args


def kernels(op: str):
    """``sparse_engine.kernels.<op>``, mapping the top-level kernels/ folder in when not installed."""
    name = f"sparse_engine.kernels.{op}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name not in ("sparse_engine.kernels", name):
            raise
    import sparse_engine

    spec = importlib.util.spec_from_file_location(
        "sparse_engine.kernels",
        ROOT / "kernels" / "__init__.py",
        submodule_search_locations=[str(ROOT / "kernels")],
    )
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["sparse_engine.kernels"] = pkg
    spec.loader.exec_module(pkg)
    sparse_engine.kernels = pkg  # type: ignore[attr-defined]
    return importlib.import_module(name)


# ------------------------------------------------------------------------------------------ timing


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    reps: int


def timeit(fn: Callable[[], Any], device: str, reps: int, warmup: int) -> Timing:
    """Median time of ``fn()`` in ms: CUDA events around each run on a GPU, perf_counter on CPU."""
    import torch

    for _ in range(max(1, warmup)):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), min(times), max(times), reps)


def copy_bandwidth_gbps(device: str, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Measured device-memory bandwidth: a large device-to-device copy, bytes read + written / time."""
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device, reps, 2)
    return 2 * src.numel() * 4 / (t.median_ms * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------- providers


@dataclass
class Provider:
    name: str
    doc: str
    make: Callable[..., Callable[[], Any]]


class Registry:
    """Named ways to run a case. ``make(case, pass_)`` returns the callable to time or raises Unavailable."""

    def __init__(self) -> None:
        self.providers: dict[str, Provider] = {}

    def add(self, name: str, doc: str):
        def deco(make):
            self.providers[name] = Provider(name, doc, make)
            return make

        return deco

    def __iter__(self):
        return iter(self.providers.values())

    def describe(self) -> str:
        return "\n".join(f"  {p.name:<16} {p.doc}" for p in self)


def linear_dense(c, pass_: str):
    """Baseline provider of the linear benchmarks: F.linear on a dense weight ``c.w`` (cuBLAS / MKL),
    autograd; ``pass_`` "fwd" or forward + backward of ``c.gy``."""
    import torch.nn.functional as F

    w = c.w.detach().clone().requires_grad_(True)
    x = c.x.detach().clone().requires_grad_(pass_ != "fwd")
    if pass_ == "fwd":
        return lambda: F.linear(x, w)

    def run():
        w.grad = x.grad = None
        F.linear(x, w).backward(c.gy)

    return run


def linear_naive(c, pass_: str):
    """What a user writes without the engine: θ = m * w * mask built in the forward, F.linear, autograd."""
    import torch.nn.functional as F

    m = c.m.detach().clone().requires_grad_(True)
    w = c.w.detach().clone().requires_grad_(True)
    x = c.x.detach().clone().requires_grad_(True)

    def fwd():
        return F.linear(x, m * w * c.mask)

    if pass_ == "fwd":
        return fwd

    def run():
        m.grad = w.grad = x.grad = None
        fwd().backward(c.gy)

    return run


# ------------------------------------------------------------------------------------------ results


def cpu_name() -> str:
    """The CPU's model name, with its family / model numbers and widest vector extension where
    /proc/cpuinfo says them: a virtual machine may report only "AMD EPYC", and the same name then covers
    cores with and without AVX-512, whose timings differ."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            fields = {}
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return cpu
    name = fields.get("model name", cpu)
    flags = set(fields.get("flags", "").split())
    isa = next((f for f in ("avx512f", "avx2", "avx", "sse4_2") if f in flags), "")
    detail = []
    if "cpu family" in fields and "model" in fields:
        detail.append(f"family {fields['cpu family']} model {fields['model']}")
    if isa:
        detail.append(isa.replace("avx512f", "avx512"))
    return f"{name} [{', '.join(detail)}]" if detail else name


def git_commit() -> str:
    """The checkout's short commit, with "-dirty" when tracked files are modified ("unknown" outside git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return (out.stdout.strip() or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(mode: str, device: str) -> dict[str, str]:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    name = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    return dict(
        mode=mode,
        device_name=name,
        machine=f"{platform.node()} {cpu_name()} ({os.cpu_count()} cpus)",
        torch=torch.__version__,
        triton=triton_version,
        cuda=str(torch.version.cuda),
        python=platform.python_version(),
        commit=git_commit(),
        date=datetime.datetime.now().isoformat(timespec="seconds"),
    )


@dataclass
class Results:
    bench: str
    args: argparse.Namespace
    rows: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.env = environment(self.args.mode, self.args.device)
        self.errors = 0

    def add(
        self,
        *,
        case: str,
        model: str,
        shape: str,
        dtype: str,
        density: str | float,
        provider: str,
        pass_: str,
        timing: Timing | None = None,
        flops: float | None = None,
        nbytes: float | None = None,
        note: str = "",
    ) -> dict:
        row = dict(
            bench=self.bench,
            case=case,
            model=model,
            shape=shape,
            dtype=dtype,
            density=density,
            provider=provider,
            **{"pass": pass_},
            time_ms="",
            tflops="",
            gbps="",
            vs_dense="",
            vs_naive="",
            note=note,
        )
        if timing is not None:
            row["time_ms"] = f"{timing.median_ms:.4f}"
            if flops:
                row["tflops"] = f"{flops / (timing.median_ms * 1e-3) / 1e12:.2f}"
            if nbytes:
                row["gbps"] = f"{nbytes / (timing.median_ms * 1e-3) / 1e9:.1f}"
        if self.args.interpreted:
            row["note"] = ("interpreter: timings meaningless; " + note).strip("; ")
        self.rows.append(row)
        return row

    def measure(
        self,
        registry: Registry,
        providers: Iterable[str],
        case_kw: dict,
        pass_: str,
        make_args: tuple,
        flops: Callable[[str], float | None] = lambda p: None,
        nbytes: Callable[[str], float | None] = lambda p: None,
    ) -> None:
        """Time every provider on one case / pass; unavailable ones get a row with the reason."""
        for name in providers:
            provider = registry.providers[name]
            try:
                fn = provider.make(*make_args, pass_)
                timing = timeit(fn, self.args.device, self.args.reps, self.args.warmup)
            except Unavailable as e:
                self.add(**case_kw, provider=name, pass_=pass_, note=f"unavailable: {e}")
                continue
            except Exception as e:  # one broken provider must not cost the other rows: record and go on
                import traceback

                traceback.print_exc()
                msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                self.add(**case_kw, provider=name, pass_=pass_, note=f"ERROR {type(e).__name__}: {msg}")
                self.errors += 1
                _release()
                continue
            self.add(
                **case_kw, provider=name, pass_=pass_, timing=timing, flops=flops(name), nbytes=nbytes(name)
            )
            _release()

    def ratios(self, dense: str = "dense", naive: str = "naive") -> None:
        """vs_dense / vs_naive = baseline time / this time (> 1: faster than the baseline), per case, pass."""
        index = {}
        for r in self.rows:
            if r["time_ms"]:
                index[(r["case"], r["pass"], r["provider"])] = float(r["time_ms"])
        for r in self.rows:
            if not r["time_ms"]:
                continue
            for base, col in ((dense, "vs_dense"), (naive, "vs_naive")):
                t = index.get((r["case"], r["pass"], base))
                if t:
                    r[col] = f"{t / float(r['time_ms']):.3f}"

    def flush(self) -> Path:
        """(Re)write the CSV with the rows so far: a run cut short by a timeout still leaves its rows."""
        self.ratios()
        path = Path(self.args.out) / f"{self.bench}.csv"
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=ROW_FIELDS + ENV_FIELDS)
            writer.writeheader()
            for r in self.rows:
                writer.writerow({**r, **self.env})
        tmp.replace(path)
        return path

    def write(self) -> Path:
        """Final CSV, the printed table and a one-line total."""
        path = self.flush()
        self.print_table()
        print(
            f"\nwrote {len(self.rows)} rows to {path}"
            + (f" ({self.errors} provider errors)" if self.errors else "")
        )
        return path

    def print_table(self) -> None:
        env = self.env
        print(
            f"\n{self.bench}: {env['device_name']} | torch {env['torch']} triton {env['triton']}"
            f" cuda {env['cuda']}"
            f" | {env['commit']} | mode {env['mode']}"
        )
        head = (
            f"{'case':<34} {'pass':<8} {'provider':<16} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} {'vs dense':>8} "
            f"{'vs naive':>8}  note"
        )
        print(head)
        print("-" * len(head))
        for r in self.rows:
            print(
                f"{r['case'][:34]:<34} {r['pass']:<8} {r['provider']:<16} {r['time_ms']:>9} {r['tflops']:>8} "
                f"{r['gbps']:>8} {r['vs_dense']:>8} {r['vs_naive']:>8}  {r['note'][:60]}"
            )


def print_tuning(label: str, tuners: dict) -> None:
    """The config each autotuner picked per key (what to keep in the config lists)."""
    for name, tuner in tuners.items():
        cache = getattr(tuner, "cache", None) or {}
        for key, cfg in cache.items():
            print(f"tuning {label}.{name} key={key}: {cfg}")
        if getattr(tuner, "configs_timings", None):
            ranked = sorted(
                tuner.configs_timings.items(), key=lambda kv: kv[1][0] if isinstance(kv[1], list) else kv[1]
            )
            print(f"tuning {label}.{name} last ranking: " + " | ".join(f"{c}: {t}" for c, t in ranked))


def _release() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rand(*shape, dtype, device, requires_grad: bool = False):
    """Random normal data (never zeros: they can run faster than real data)."""
    import torch

    t = torch.randn(*shape, device=device, dtype=torch.float32).to(dtype)
    return t.requires_grad_(requires_grad)


# ------------------------------------------------------------------------------------------- plots


def thread_counts(p: argparse.ArgumentParser, text: str, clock: str = "wall") -> list[int]:
    """The thread counts of a ``--threads 1,2`` option (``p.error`` naming the option otherwise); a CPU-clock
    measurement (``clock="cpu"``) needs one thread: the CPU time of several threads adds up."""
    try:
        threads = [int(t) for t in text.split(",")]
    except ValueError:
        p.error(f"--threads must be comma-separated ints, got {text!r}")
    if not threads or min(threads) < 1:
        p.error(f"--threads must be ints >= 1, got {text!r}")
    if clock == "cpu" and threads != [1]:
        p.error(f"--clock cpu needs --threads 1 (CPU time of several threads adds up), got {text!r}")
    return threads


def write_csv(rows: list[dict], path: Path) -> Path:
    """Write ``rows`` (dicts; the columns are every key, in order of appearance) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    print(f"# wrote {path}")
    return path


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None (one line on stderr) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'sparse-engine[plot]'): no PNG", file=sys.stderr)
        return None
    return plt


def save_fig(fig, path: Path, dpi: int = 80) -> Path:
    """Lay ``fig`` out, write it to ``path`` (small PNGs: they are committed) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
