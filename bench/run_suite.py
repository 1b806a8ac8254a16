"""Run the benchmark suite of bench/ and collect it into one CSV (the engine of ``sparse-engine bench``).

    python bench/run_suite.py --quick          # a few minutes: trimmed grids (CI smoke uses --smoke)
    python bench/run_suite.py                  # the full grids of every benchmark
    python bench/run_suite.py --only compact_linear train_breakdown
    python bench/run_suite.py --quick --out bench/results   # replace the committed results

Outputs go to ``runs/bench/`` (a scratch folder git ignores) unless ``--out`` says otherwise.

Each benchmark script runs in its own process (they set interpreter / thread state at import) with the
arguments of the chosen level; its own CSV goes to ``<out>/raw/``. The rows are then mapped onto one
schema and written to ``<out>/suite_<device>.csv``:

    bench, mode, device_name, machine, torch, triton, commit, date, shape, batch, dtype, density, provider,
    pass, median_ms, min_ms, max_ms, tflops, gbps, baseline, ratio_vs_baseline, note

``ratio_vs_baseline`` = baseline time / this time, both measured in the same run (> 1: faster), the
baseline being dense torch (``baseline`` names it); ``ratio_best_vs_baseline`` the same from the best runs
where the script records them (more robust than medians on a shared machine). ``crossover_<device>.csv`` gives, per benchmark,
shape, batch and provider, the highest density at and below which the provider beats dense at every
measured density. A script that is missing or fails is reported (and listed in ``status_<device>.json``),
never silently dropped. On a machine without a GPU the Triton benchmarks would run in the Triton
interpreter, whose timings mean nothing: they are skipped with that reason unless
``--include-interpreter``.

Besides the scripts, the suite measures one thing itself (``train_breakdown``): the forward / backward /
optimizer split of one training step of LeNet-300-100 at density 0.1 for dense torch, the naive
masked-dense way and the engine (Sign-In, sparse_engine.optim.SGD).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A user's run writes here (ignored by git); the committed results are only updated with --out bench/results.
SCRATCH = ROOT / "runs" / "bench"
LEVELS = ("smoke", "quick", "full")

FIELDS = ["bench", "mode", "device_name", "machine", "torch", "triton", "commit", "date", "shape", "batch", "dtype",
          "density", "provider", "pass", "median_ms", "min_ms", "max_ms", "tflops", "gbps", "baseline",
          "ratio_vs_baseline", "ratio_best_vs_baseline", "note"]


@dataclass
class Bench:
    """One benchmark script: how to call it at each level and where its CSV lands."""

    name: str
    script: str
    args: dict[str, list[str]]           # level -> extra arguments
    csv_name: str                         # CSV file name inside the raw dir
    out_is_dir: bool                      # --out takes a directory (else the CSV path)
    triton: bool = False                  # needs a GPU for meaningful timings
    device_arg: bool = False              # accepts --device cpu|cuda
    extra_by_device: dict[str, list[str]] = field(default_factory=dict)


BENCHES: dict[str, Bench] = {
    "compact_linear": Bench(
        "compact_linear", "bench_compact_linear.py",
        # (the script's own --quick fixes its grid, so the levels give the grid explicitly)
        {"smoke": ["--layers", "3072x768", "--batches", "16", "--sparsities", "0.9", "--min-time", "0.02"],
         "quick": ["--layers", "3072x768", "4096x4096", "--batches", "1", "64", "--sparsities", "0.8", "0.9", "0.95",
                   "0.98", "--min-time", "0.1"],
         "full": []},
        "compact_linear.csv", out_is_dir=False, device_arg=True),
    "train_step": Bench(
        "train_step", "bench_train_step.py",
        {"smoke": ["--quick", "--providers", "engine", "dense"], "quick": ["--quick"], "full": []},
        "train_step.csv", out_is_dir=False),
    "extract": Bench(
        "extract", "bench_extract.py",
        {"smoke": ["--quick", "--models", "mlp", "--densities", "0.1"],
         "quick": ["--quick", "--models", "mlp,cnn", "--densities", "0.2,0.1,0.05"], "full": []},
        "bench_extract.csv", out_is_dir=True),
    "masked_linear": Bench("masked_linear", "bench_masked_linear.py", {"smoke": ["--quick"], "quick": ["--quick"],
                                                                       "full": []},
                           "masked_linear.csv", out_is_dir=True, triton=True),
    "block_sparse_linear": Bench("block_sparse_linear", "bench_block_sparse_linear.py",
                                 {"smoke": ["--quick"], "quick": ["--quick"], "full": []},
                                 "block_sparse_linear.csv", out_is_dir=True, triton=True),
    "fused_step": Bench("fused_step", "bench_fused_step.py", {"smoke": ["--quick"], "quick": ["--quick"], "full": []},
                        "fused_step.csv", out_is_dir=True, triton=True),
}
BUILTIN = ("train_breakdown",)
ALL = (*BENCHES, *BUILTIN)


# ------------------------------------------------------------------------------------------ environment


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict[str, str]:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    try:
        commit = subprocess.run(check=False, args=["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    name = torch.cuda.get_device_name() if device == "cuda" else _cpu_name()
    return {"device_name": name, "machine": f"{platform.node()} {_cpu_name()} ({os.cpu_count()} cpus)",
            "torch": torch.__version__, "triton": triton_version, "commit": commit,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S")}


# ------------------------------------------------------------------------------------ mapping the CSVs


def _f(x) -> str:
    """A number as text (empty for missing)."""
    if x is None or x == "":
        return ""
    try:
        return f"{float(x):.6g}"
    except (TypeError, ValueError):
        return str(x)


def _ratio(base, this) -> str:
    try:
        b, t = float(base), float(this)
    except (TypeError, ValueError):
        return ""
    return f"{b / t:.4g}" if t > 0 else ""


def map_compact_linear(rows: list[dict], env: dict, mode: str) -> list[dict]:
    out = []
    for r in rows:
        prov = r["provider"] + (f":{r['variant']}" if r.get("variant") and r["variant"] != r["provider"] else "")
        g = r.get("gflops")
        out.append({**env, "bench": "compact_linear", "mode": mode, "machine": r.get("machine", env["machine"]),
                    "commit": r.get("commit", env["commit"]), "shape": f"{r['N']}x{r['K']}", "batch": r["batch"],
                    "dtype": "float32", "density": _f(1 - float(r["sparsity"])), "provider": prov, "pass": "fwd",
                    "median_ms": _f(r["median_ms"]), "min_ms": _f(r.get("min_ms")), "max_ms": "",
                    "tflops": _f(float(g) / 1e3) if g not in (None, "") else "", "gbps": "", "baseline": "dense",
                    "ratio_vs_baseline": _f(r.get("speedup_vs_dense")),
                    "ratio_best_vs_baseline": _f(r.get("speedup_vs_dense_min")),
                    "note": f"threads {r.get('threads', '')} isa {r.get('isa', '')} load {r.get('loadavg', '')}"})
    return out


def map_train_step(rows: list[dict], env: dict, mode: str) -> list[dict]:
    best = {r["model"]: r.get("step_ms_min") for r in rows if r["provider"] == "dense"}
    return [{**env, "ratio_best_vs_baseline": _ratio(best.get(r["model"]), r.get("step_ms_min")), "bench": "train_step", "mode": mode, "machine": r.get("machine", env["machine"]),
             "commit": r.get("commit", env["commit"]), "shape": r["model"], "batch": r["batch"], "dtype": "float32",
             "density": _f(r["density"]), "provider": r["provider"], "pass": "train_step",
             "median_ms": _f(r["step_ms"]), "min_ms": _f(r.get("step_ms_min")), "max_ms": "", "tflops": "", "gbps": "",
             "baseline": "dense", "ratio_vs_baseline": _f(r.get("speedup_vs_dense")),
             "note": f"vs naive {_f(r.get('speedup_vs_naive'))}; state bytes {r.get('state_bytes', '')}; "
                     f"load {r.get('loadavg', '')}"} for r in rows]


def map_extract(rows: list[dict], env: dict, mode: str) -> list[dict]:
    dense = {(r["model"], r["density"]): r["latency_b1_ms"] for r in rows if r["provider"] == "dense"}
    dense_min = {(r["model"], r["density"]): r.get("latency_b1_min_ms") for r in rows if r["provider"] == "dense"}
    return [{**env, "bench": "extract",
             "ratio_best_vs_baseline": _ratio(dense_min.get((r["model"], r["density"])), r.get("latency_b1_min_ms")), "mode": mode, "machine": r.get("machine", env["machine"]),
             "commit": r.get("commit", env["commit"]), "shape": r["model"], "batch": 1, "dtype": "float32",
             "density": _f(r["density"]), "provider": r["provider"], "pass": "infer",
             "median_ms": _f(r["latency_b1_ms"]), "min_ms": _f(r.get("latency_b1_min_ms")), "max_ms": "",
             "tflops": "", "gbps": "", "baseline": "dense",
             "ratio_vs_baseline": _ratio(dense.get((r["model"], r["density"])), r["latency_b1_ms"]),
             "note": f"file ratio {_f(r.get('file_ratio'))}; formats {r.get('formats', '')}"} for r in rows]


def map_common(rows: list[dict], env: dict, mode: str) -> list[dict]:
    """The kernel benchmarks write bench/common.py's schema already; keep their environment columns."""
    out = []
    for r in rows:
        batch = ""
        for part in str(r.get("shape", "")).split():
            if part.startswith(("T=", "B=", "M=")):
                batch = part[2:]
        out.append({k: r.get(k, "") for k in FIELDS} | {
            "bench": r.get("bench", ""), "mode": r.get("mode", mode), "batch": batch, "median_ms": r.get("time_ms", ""),
            "min_ms": "", "max_ms": "", "baseline": "dense", "ratio_vs_baseline": r.get("vs_dense", ""),
            "pass": r.get("pass", ""), "note": (f"{r.get('case', '')}; " + r.get("note", "")).strip("; ")})
    return out


MAPPERS: dict[str, Callable[[list[dict], dict, str], list[dict]]] = {
    "compact_linear": map_compact_linear, "train_step": map_train_step, "extract": map_extract,
    "masked_linear": map_common, "block_sparse_linear": map_common, "fused_step": map_common,
}


# ------------------------------------------------------------------------------- built-in: breakdown


def train_breakdown(level: str, env: dict, device: str) -> list[dict]:
    """Forward / backward / optimizer time of one LeNet-300-100 training step, batch 128, density 0.1."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from sparse_engine.nn import sparsify
    from sparse_engine.optim import SGD

    reps = {"smoke": 3, "quick": 15, "full": 50}[level]
    density, batch = 0.1, 128
    torch.manual_seed(0)
    x = torch.randn(batch, 784, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)).to(device)

    class Naive(nn.Module):
        """What a user writes today: dense m, w and a mask; θ = m * w * mask in the forward."""

        def __init__(self, base: nn.Sequential) -> None:
            super().__init__()
            self.base = base
            self.m = nn.ParameterList()
            self.w = nn.ParameterList()
            self.masks = []
            for lin in base:
                if isinstance(lin, nn.Linear):
                    self.m.append(nn.Parameter(torch.ones_like(lin.weight)))
                    self.w.append(nn.Parameter(lin.weight.detach().clone()))
                    self.masks.append(torch.rand_like(lin.weight) < density)
                    lin.weight.requires_grad_(False)

        def forward(self, inp):
            i, h = 0, inp
            for lin in self.base:
                if isinstance(lin, nn.Linear):
                    h = F.linear(h, self.m[i] * self.w[i] * self.masks[i], lin.bias)
                    i += 1
                else:
                    h = lin(h)
            return h

    def providers():
        m = mlp()
        yield "dense", m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        n = Naive(mlp())
        yield "naive", n, torch.optim.SGD([p for p in n.parameters() if p.requires_grad], lr=0.05, momentum=0.9,
                                          weight_decay=5e-4)
        for layout in ("dense", "csr"):
            e = mlp()
            try:
                sparsify(e, method="signin", density=density, distribution="uniform", layout=layout)
            except Exception as exc:  # noqa: BLE001 - a layout this build cannot run: reported, not hidden
                yield f"engine_{layout}", exc, None
                continue
            yield f"engine_{layout}", e, SGD(e, lr=0.05, momentum=0.9, weight_decay=5e-4)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    rows = []
    for name, model, opt in providers():
        if opt is None:
            rows.append({**env, "bench": "train_breakdown", "mode": level, "shape": "mlp784", "batch": batch,
                         "dtype": "float32", "density": density, "provider": name, "pass": "step",
                         "note": f"unavailable: {type(model).__name__}: {model}"})
            continue
        times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
        for i in range(reps + 2):  # two warm-up steps
            opt.zero_grad(set_to_none=True)
            sync()
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            sync()
            t1 = time.perf_counter()
            loss.backward()
            sync()
            t2 = time.perf_counter()
            opt.step()
            sync()
            t3 = time.perf_counter()
            if i >= 2:
                for k, dt in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2)):
                    times[k].append(dt * 1e3)
        for k, ts in times.items():
            rows.append({**env, "bench": "train_breakdown", "mode": level, "shape": "mlp784", "batch": batch,
                         "dtype": "float32", "density": density, "provider": name, "pass": k,
                         "median_ms": _f(statistics.median(ts)), "min_ms": _f(min(ts)), "max_ms": _f(max(ts)),
                         "baseline": "dense", "note": f"{reps} steps, threads {torch.get_num_threads()}"})
    # ratio of each phase against dense's same phase
    base = {r["pass"]: r["median_ms"] for r in rows if r["provider"] == "dense" and r.get("median_ms")}
    for r in rows:
        if r.get("median_ms"):
            r["ratio_vs_baseline"] = _ratio(base.get(r["pass"]), r["median_ms"])
    return rows


# ------------------------------------------------------------------------------------------ crossover


def crossover(rows: list[dict]) -> list[dict]:
    """Per (bench, device, shape, batch, pass, provider): the densities measured, and the highest density d
    such that the provider beats the baseline (ratio > 1) at d and at every lower measured density."""
    groups: dict[tuple, dict[float, float]] = {}
    best_groups: dict[tuple, dict[float, float]] = {}
    for r in rows:
        if not r.get("ratio_vs_baseline") or r["provider"] == r.get("baseline") or r["bench"] == "train_breakdown":
            continue
        if "interpreter" in str(r.get("mode", "")):
            continue  # interpreter timings say nothing about speed
        try:
            d, ratio = float(r["density"]), float(r["ratio_vs_baseline"])
        except (TypeError, ValueError):
            continue
        key = (r["bench"], r["device_name"], r["shape"], str(r["batch"]), r["pass"], r["provider"])
        groups.setdefault(key, {})[d] = ratio
        best = _num(r.get("ratio_best_vs_baseline"))
        if best is not None:
            best_groups.setdefault(key, {})[d] = best
    out = []
    for key, by_d in sorted(groups.items()):
        bench, dev, shape, batch, pass_, prov = key
        ds = sorted(by_d)
        beats = _beats(by_d)
        best = best_groups.get(key, {})
        beats_best = _beats(best) if best else None
        out.append({"bench": bench, "device_name": dev, "shape": shape, "batch": batch, "pass": pass_,
                    "provider": prov, "densities": " ".join(f"{d:g}" for d in ds),
                    "ratios": " ".join(f"{by_d[d]:.2f}" for d in ds),
                    "ratios_best": " ".join(f"{best[d]:.2f}" for d in ds if d in best),
                    "beats_dense_up_to_density": "" if beats is None else f"{beats:g}",
                    "beats_dense_up_to_density_best": "" if beats_best is None else f"{beats_best:g}",
                    "verdict": ("never faster at the measured densities" if beats is None else
                                f"faster at density <= {beats:g}")})
    return out


def _num(x) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _beats(by_d: dict[float, float]) -> float | None:
    """The highest density of the run of wins (ratio > 1) that starts at the lowest measured density."""
    beats = None
    for d in sorted(by_d):
        if by_d[d] > 1.0:
            beats = d
        else:
            break
    return beats


CROSS_FIELDS = ["bench", "device_name", "shape", "batch", "pass", "provider", "densities", "ratios", "ratios_best",
                "beats_dense_up_to_density", "beats_dense_up_to_density_best", "verdict"]


# ------------------------------------------------------------------------------------------------ run


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in fields})


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_script(b: Bench, level: str, raw: Path, device: str, timeout: float) -> tuple[str, list[dict], float]:
    script = ROOT / "bench" / b.script
    if not script.is_file():
        return f"missing: {script.relative_to(ROOT)} is not in this checkout", [], 0.0
    csv_path = raw / b.csv_name
    if csv_path.exists():
        csv_path.unlink()  # never pick up a previous run's rows
    # the scripts run in the checkout: a relative --out keeps machine paths out of their logs
    cmd = [sys.executable, str(script), *b.args[level], "--out", shown(raw if b.out_is_dir else csv_path)]
    if b.device_arg:
        cmd += ["--device", device]
    log = raw / f"{b.name}.log"
    t0 = time.perf_counter()
    try:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, check=False, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timeout after {timeout:.0f}s (log {shown(log)})", [], time.perf_counter() - t0
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        return f"failed (exit {proc.returncode}): {' | '.join(tail)}", [], dt
    if not csv_path.is_file():
        return f"failed: exited 0 but wrote no {csv_path.name}", [], dt
    with open(csv_path, newline="") as f:
        return "ok", list(csv.DictReader(f)), dt


def shown(path: Path) -> str:
    """``path`` relative to the checkout when inside it: what the logs show (no machine paths in them)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparse-engine bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="trimmed grids: a few minutes")
    g.add_argument("--smoke", action="store_true", help="the smallest grids: a CI smoke test, numbers meaningless")
    p.add_argument("--only", nargs="+", choices=ALL, default=None, help="run only these benchmarks")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", type=Path, default=SCRATCH,
                   help="directory for the suite CSVs and raw/ (a scratch folder by default; --out bench/results "
                        "replaces the committed results)")
    p.add_argument("--include-interpreter", action="store_true",
                   help="without a GPU, still run the Triton benchmarks in the interpreter (smoke only)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per script (default: by level)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNGs (also skipped without matplotlib)")
    p.add_argument("--collect-only", action="store_true",
                   help="run nothing: rebuild the suite CSV, crossover and plots from the raw CSVs of the last run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    level = "smoke" if args.smoke else "quick" if args.quick else "full"

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("sparse-engine bench: error: --device cuda but no CUDA GPU is visible to torch", file=sys.stderr)
        return 2
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    env = environment(device)
    if args.collect_only and (args.out / f"status_{device}.json").is_file():  # the measuring run's environment
        env = json.loads((args.out / f"status_{device}.json").read_text()).get("environment", env)
    raw = args.out / "raw" / device
    raw.mkdir(parents=True, exist_ok=True)
    timeout = args.timeout or {"smoke": 300.0, "quick": 900.0, "full": 3600.0}[level]
    names = args.only or list(ALL)
    rows: list[dict] = []
    status: dict[str, dict] = {}
    t_all = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        if name == "train_breakdown":
            raw_bd = raw / "train_breakdown.csv"
            if args.collect_only:
                got, st = _read_csv(raw_bd), "collected" if raw_bd.is_file() else "no raw CSV"
            else:
                try:
                    got = train_breakdown(level, env, device)
                    st = "ok"
                    write_csv(raw_bd, got, FIELDS)
                except Exception as e:  # noqa: BLE001 - reported in the status file and on stdout, not hidden
                    got, st = [], f"failed: {type(e).__name__}: {e}"
            status[name] = {"status": st, "rows": len(got), "seconds": round(time.perf_counter() - t0, 1)}
            rows += got
            print(f"[bench] {name}: {st} ({len(got)} rows, {time.perf_counter() - t0:.0f}s)", flush=True)
            continue
        b = BENCHES[name]
        if b.triton and device == "cpu" and not args.include_interpreter:
            why = "skipped: Triton kernels need a GPU; the CPU interpreter's timings are meaningless " \
                  "(--include-interpreter runs it anyway as a smoke test)"
            status[name] = {"status": why, "rows": 0, "seconds": 0.0}
            print(f"[bench] {name}: {why}", flush=True)
            continue
        if args.collect_only:
            raw_rows, dt = _read_csv(raw / b.csv_name), 0.0
            st = "collected" if raw_rows else f"no raw CSV {raw / b.csv_name}"
        else:
            st, raw_rows, dt = run_script(b, level, raw, device, timeout)
        mode = level if device == "cuda" or not b.triton else f"{level}-interpreter"
        mapped = MAPPERS[name](raw_rows, env, mode) if raw_rows else []
        rows += mapped
        status[name] = {"status": st, "rows": len(mapped), "seconds": round(dt, 1),
                        "command": " ".join([Path(sys.executable).name, f"bench/{b.script}", *b.args[level]])}
        print(f"[bench] {name}: {st} ({len(mapped)} rows, {dt:.0f}s)", flush=True)
    suite_csv = args.out / f"suite_{device}.csv"
    write_csv(suite_csv, rows, FIELDS)
    cross = crossover(rows)
    cross_csv = args.out / f"crossover_{device}.csv"
    write_csv(cross_csv, cross, CROSS_FIELDS)
    status_path = args.out / f"status_{device}.json"
    if not args.collect_only:  # the status file records the run that measured
        status_path.write_text(json.dumps(
            {"level": level, "device": device, "environment": env, "benches": status,
             "seconds": round(time.perf_counter() - t_all, 1)}, indent=1))
    print(f"[bench] wrote {len(rows)} rows to {shown(suite_csv)} and {len(cross)} crossover rows to "
          f"{shown(cross_csv)}")
    if not args.no_plot:
        sys.path.insert(0, str(ROOT / "bench"))
        import plot

        for path in plot.plot_suite(suite_csv, args.out):
            print(f"[bench] plot {shown(Path(path))}")
    failed = [n for n, s in status.items() if s["status"].startswith(("failed", "timeout"))]
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
