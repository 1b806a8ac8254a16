"""One full training step (forward, backward, optimizer) of a 3-layer MLP trained with Sign-In at 90 %
sparsity: compact layout vs the naive masked-dense way vs plain dense training. CPU.

    python bench/bench_train_step.py            # both MLPs, every provider (~2-3 min on 2 cores)
    python bench/bench_train_step.py --quick    # the small MLP only

Models (batch 128, cross-entropy on random labels):
* ``mlp784``  784-300-100-10: the classic LeNet-300-100 of the pruning literature (Fashion-MNIST size);
* ``mlp4096`` 4096-4096-4096-10: a wide MLP whose layers are the size of a transformer projection.
Every weight layer has a uniform random mask of density 0.1; Sign-In (θ = m ⊙ w, β = 1), SGD with
momentum 0.9, weight decay 5e-4, lr 0.05. (Sign-In's periodic reset runs every p epochs, not every step,
so it is not part of a step; its cost is printed separately for the compact layout.)

Providers:
* ``engine``     sparse_engine.nn.SparseLinear(kind="signin", layout="csr") + sparse_engine.optim.SGD:
                 m, w and the momentum exist only at the active coordinates (the library path);
* ``engine_ops`` the same math in a hand-written loop: ops.compact_linear + ops.fused_step per tensor
                 (what the library costs below its module/optimizer layer);
* ``naive``      what a user writes today: dense m, w, a bool mask, θ = m * w * mask in the forward,
                 torch.optim.SGD over the dense m, w;
* ``dense``      plain nn.Linear + torch.optim.SGD (no sparsity at all).

Memory, two measures, both printed and written:
* ``state_bytes`` analytic: parameters + gradients + optimizer state + index/mask buffers, counted from the
  live tensors after the timed steps;
* ``peak_rss_delta`` measured: each provider runs in its own process. RSS is read after imports and data
  are in place; the model is built, construction transients are returned to the OS (malloc_trim), the
  kernel's peak-RSS counter is reset (``/proc/self/clear_refs``), and the steps run: the peak (VmHWM)
  minus that first RSS is the memory the model, optimizer, activations and temporaries of training took.
torch's CPU allocator has no statistics to read (and tracemalloc does not see it), hence these two.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = {"mlp784": (784, 300, 100, 10), "mlp4096": (4096, 4096, 4096, 10)}
PROVIDERS = ("engine", "engine_ops", "naive", "dense")
#: the A/B rows of --ab: the engine as shipped vs the engine without the lean eager layer entry
#: (``engine_checked``: each SparseLinear call through the fully checked ops.compact_linear, the same C++
#: op behind it) vs the engine with the per-call paths it replaced (``engine_percall``: the Python custom
#: op per layer and direction, one optimizer call per tensor) vs the engine with the former batch-panel
#: budget (``engine_wide``: 64-lane panels up to 8 MiB, where the default now cuts them at one core's L2,
#: at most 512 KiB) vs the engine with the optimizer's two C++ calls through torch.ops (``engine_opop``:
#: fused_step_multi and all_finite through the dispatcher, as before their CPython entries)
AB_PROVIDERS = ("dense", "engine", "engine_checked", "engine_percall", "engine_wide", "engine_opop")
DENSITY, BATCH, LR, MOMENTUM, WD = 0.1, 128, 0.05, 0.9, 5e-4


# ------------------------------------------------------------------------------------- worker side


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return -1


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not hasattr(t, "untyped_storage"):
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen or t.device.type == "meta":
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def _masks(sizes, torch):
    g = torch.Generator().manual_seed(0)
    out = []
    for k, n in zip(sizes[:-1], sizes[1:]):
        nnz = round(DENSITY * n * k)
        flat = torch.zeros(n * k, dtype=torch.bool)
        flat[torch.randperm(n * k, generator=g)[:nnz]] = True
        out.append(flat.reshape(n, k))
    return out


def _module_step(model, opt, loss_fn):
    """One training step of ``model`` with ``opt``: zero the gradients, forward, loss, backward, update."""
    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def build(provider: str, sizes, torch):
    """(step function, tensors to count as training state)."""
    import torch.nn.functional as F
    from torch import nn

    from sparse_engine import layout, ops
    from sparse_engine.ops.reference import factorize_ref

    masks = _masks(sizes, torch)
    loss_fn = nn.CrossEntropyLoss()

    if provider == "dense":
        model = nn.Sequential(*[m for k, n in zip(sizes[:-1], sizes[1:]) for m in (nn.Linear(k, n), nn.ReLU())][:-1])
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)

        step = _module_step(model, opt, loss_fn)

        return step, lambda: [*model.parameters(), *(p.grad for p in model.parameters()),
                              *(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))]

    if provider == "naive":
        params, bufs = [], []
        for (k, n), mask in zip(zip(sizes[:-1], sizes[1:]), masks):
            theta = torch.where(mask, nn.init.kaiming_uniform_(torch.empty(n, k), a=5 ** 0.5), torch.zeros(()))
            m, w = factorize_ref(theta, 1.0)
            params += [nn.Parameter(m), nn.Parameter(w), nn.Parameter(torch.zeros(n))]
            bufs.append(mask)
        opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD)

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            h = x
            for i, mask in enumerate(bufs):
                m, w, b = params[3 * i: 3 * i + 3]
                h = F.linear(h, m * w * mask, b)
                if i < len(bufs) - 1:
                    h = F.relu(h)
            loss = loss_fn(h, y)
            loss.backward()
            opt.step()
            return loss

        return step, lambda: [*params, *bufs, *(p.grad for p in params),
                              *(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))]

    if provider == "engine_percall":
        step, state = build("engine", sizes, torch)
        return _per_call(step), state

    if provider == "engine_checked":
        step, state = build("engine", sizes, torch)
        return _checked(step), state

    if provider == "engine_wide":
        step, state = build("engine", sizes, torch)
        return _wide_panels(step), state

    if provider == "engine_opop":
        step, state = build("engine", sizes, torch)
        return _optimizer_by_op(step), state

    if provider == "engine":
        from sparse_engine.nn import SparseLinear
        from sparse_engine.optim import SGD

        layers = []
        for (k, n), mask in zip(zip(sizes[:-1], sizes[1:]), masks):
            layers += [SparseLinear(k, n, kind="signin", mask=mask, beta=1.0, layout="csr"), nn.ReLU()]
        model = nn.Sequential(*layers[:-1])
        opt = SGD(model, lr=LR, momentum=MOMENTUM, weight_decay=WD)

        step = _module_step(model, opt, loss_fn)

        def state():
            tensors = [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters())]
            for mod in model.modules():
                p = getattr(mod, "param", None)
                idx = getattr(p, "index", None)
                if idx is not None:
                    tensors += [getattr(idx, f) for f in ("crow", "col", "row", "ccol", "row_t", "perm")]
                mask = getattr(p, "mask", None)
                if torch.is_tensor(mask):
                    tensors.append(mask)
            tensors += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
            return tensors

        def reset():  # one Sign-In reset of every layer (timed separately)
            opt.signin_reset() if hasattr(opt, "signin_reset") else None

        step.reset = reset
        return step, state

    if provider == "engine_ops":
        layers = []
        for (k, n), mask in zip(zip(sizes[:-1], sizes[1:]), masks):
            idx = layout.CSRIndex.from_mask(mask)
            theta = torch.where(mask, nn.init.kaiming_uniform_(torch.empty(n, k), a=5 ** 0.5), torch.zeros(()))
            m, w = factorize_ref(idx.gather(theta), 1.0)
            m, w, b = (t.requires_grad_() for t in (m, w, torch.zeros(n)))
            del theta
            layers.append((idx, m, w, b, [torch.zeros_like(t) for t in (m, w, b)]))
        lr = torch.tensor(LR)
        count = [0]

        def step(x, y):
            count[0] += 1
            h = x
            for i, (idx, m, w, b, _) in enumerate(layers):
                h = ops.compact_linear(h, m, w, idx, b)
                if i < len(layers) - 1:
                    h = F.relu(h)
            loss = loss_fn(h, y)
            loss.backward()
            with torch.no_grad():
                for idx, m, w, b, bufs in layers:
                    for t, buf in zip((m, w, b), bufs):
                        ops.fused_step(t, t.grad, buf, None, None, lr, count[0], "sgd", momentum=MOMENTUM,
                                       weight_decay=WD)
                        t.grad = None
            return loss

        def reset():
            with torch.no_grad():
                for idx, m, w, b, _ in layers:
                    m_new, w_new = ops.signin_reset(m, w, None, 1.0)
                    m.copy_(m_new)
                    w.copy_(w_new)

        step.reset = reset
        return step, lambda: [t for idx, m, w, b, bufs in layers
                              for t in (m, w, b, m.grad, w.grad, b.grad, *bufs,
                                        idx.crow, idx.col, idx.row, idx.ccol, idx.row_t, idx.perm)]
    raise ValueError(f"unknown provider {provider!r}")


def _declining(fn, owner, name: str):
    """``fn`` (and its ``reset``) run with ``owner.name`` replaced by a function that finds nothing (None)."""
    def run(*args):
        real = getattr(owner, name)
        setattr(owner, name, lambda *a, **k: None)
        try:
            return fn(*args)
        finally:
            setattr(owner, name, real)

    if hasattr(fn, "reset"):
        run.reset = _declining(fn.reset, owner, name)
    return run


def _per_call(fn):
    """``fn`` run with the whole-call entry points hidden (ops.backends.extra finds none): every layer
    goes through the Python custom op in each direction and the optimizer steps tensor by tensor, as
    before they existed. The A side of the --ab rows."""
    from sparse_engine.ops import backends

    return _declining(fn, backends, "extra")


def _checked(fn):
    """``fn`` run with ops.compact_linear_eager declining every call: each layer takes the fully checked
    ops.compact_linear (same C++ op), as before the lean entry. The A side of the engine_checked rows."""
    from sparse_engine import ops

    return _declining(fn, ops, "compact_linear_eager")


def _wide_panels(fn):
    """``fn`` run with the C++ kernels' former panel budget (8 MiB). The A side of the engine_wide rows."""
    from sparse_engine.ops import _cpp

    def run(*args):
        with _cpp.use_panel_budget(_cpp.FORMER_PANEL_BUDGET):
            return fn(*args)

    return run


def _optimizer_by_op(fn):
    """``fn`` run with the optimizer's C++ calls through torch.ops (no CPython entries, as a JIT build
    has). The A side of the engine_opop rows."""
    from sparse_engine.ops import _cpp

    def run(*args):
        entries = _cpp._STEP_MULTI, _cpp._ALL_FINITE
        _cpp._STEP_MULTI = _cpp._ALL_FINITE = None
        try:
            return fn(*args)
        finally:
            _cpp._STEP_MULTI, _cpp._ALL_FINITE = entries

    if hasattr(fn, "reset"):
        run.reset = fn.reset
    return run


def ab(models, threads_list, rounds: int, out: Path) -> None:
    """Interleaved A/B in one process: each round times one step of every provider, in an order drawn
    anew each round (seeded), then one Sign-In reset (on copies of their own), so machine load and the
    order hit all sides alike; medians over the rounds."""
    import torch

    from bench_compact_linear import loadavg, machine
    from common import git_commit, write_csv

    info = dict(machine=machine(), torch=torch.__version__, commit=git_commit())
    print(f"# {info['machine']} | torch {info['torch']} | commit {info['commit']} | load average {loadavg()}")
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        for model in models:
            sizes = MODELS[model]
            g = torch.Generator().manual_seed(1)
            x = torch.randn(BATCH, sizes[0], generator=g)
            y = torch.randint(0, sizes[-1], (BATCH,), generator=g)
            steps = {p: build(p, sizes, torch)[0] for p in AB_PROVIDERS}
            # the resets run on copies of their own, so that no timed step follows a reset of its own model
            # (a reset rewrites m, w and the optimizer state)
            resets = {name: build(p, sizes, torch)[0].reset
                      for name, p in (("reset", "engine"), ("reset_percall", "engine_percall"))}
            times: dict[str, list[float]] = {p: [] for p in (*AB_PROVIDERS, "reset", "reset_percall")}
            for p in AB_PROVIDERS:
                for _ in range(3):
                    steps[p](x, y)
            n = rounds if model == "mlp784" else max(3, rounds // 10)
            order = random.Random(0)
            for _ in range(n):
                # a new order each round: a step timed right after dense's ran up to 15 % slower than the
                # same step timed elsewhere, in a fixed order and also in a turning one (which keeps who
                # follows whom: the engine came after dense every round and timed 4-7 % slower than copies)
                for p in order.sample(AB_PROVIDERS, len(AB_PROVIDERS)):
                    t0 = time.perf_counter()
                    steps[p](x, y)
                    times[p].append(time.perf_counter() - t0)
                for name, fn in resets.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            load = loadavg()
            for p in (*AB_PROVIDERS, "reset", "reset_percall"):
                rows.append(dict(model=model, threads=threads, what=p, ms=med[p], reps=n,
                                 vs_dense=med["dense"] / med[p], **info, loadavg=load))
            print(f"{model:>8} {threads}t: dense {med['dense']:8.2f} ms | engine {med['engine']:8.2f} ms "
                  f"(x{med['dense'] / med['engine']:.2f} vs dense) | checked entry {med['engine_checked']:8.2f} ms "
                  f"(x{med['dense'] / med['engine_checked']:.2f}) | per-call {med['engine_percall']:8.2f} ms "
                  f"(x{med['dense'] / med['engine_percall']:.2f}) | 8 MiB panels {med['engine_wide']:8.2f} ms "
                  f"(x{med['dense'] / med['engine_wide']:.2f}) | optimizer by torch.ops {med['engine_opop']:8.2f} ms "
                  f"(x{med['dense'] / med['engine_opop']:.2f}) | reset {med['reset']:.2f} ms "
                  f"(per-call {med['reset_percall']:.2f}) | load {load}")
    write_csv(rows, out)


def _warm_up_torch(torch) -> None:
    """Touch every torch facility a step uses (on a tiny model) so that the RSS baseline includes them."""
    from torch import nn

    from sparse_engine import layout, ops

    lin = nn.Linear(8, 4)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(16, 8)
    nn.functional.cross_entropy(torch.relu(lin(x)), torch.zeros(16, dtype=torch.long)).backward()
    opt.step()
    idx = layout.CSRIndex.from_mask(torch.rand(4, 8) < 0.5)
    m = torch.ones(idx.nnz, requires_grad=True)
    w = torch.ones(idx.nnz, requires_grad=True)
    ops.compact_linear(torch.randn(16, 8), m, w, idx, None).sum().backward()
    ops.fused_step(w.detach(), w.grad, torch.zeros_like(w), None, None, torch.tensor(0.1), 1, "sgd", momentum=0.9)


def worker(provider: str, model: str, steps: int, threads: int) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    sizes = MODELS[model]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, sizes[0], generator=g)
    y = torch.randint(0, sizes[-1], (BATCH,), generator=g)
    import sparse_engine.ops._cpp as cpp  # load the extension before the baseline
    import sparse_engine.nn  # noqa: F401
    import sparse_engine.optim  # noqa: F401
    from sparse_engine.ops import backends

    backend = backends.select("compact_linear_fwd", torch.device("cpu"), torch.float32)[0]
    _warm_up_torch(torch)  # thread pools, autograd engine, lazy libraries: not the model's memory
    rss0 = _proc_status("VmRSS")
    step, state = build(provider, sizes, torch)
    # Peak *training* memory: construction transients (dense init, factorisation) are freed and handed
    # back to the OS before the peak counter is reset, so they do not count.
    _malloc_trim()
    peak_ok = _reset_peak_rss()
    losses = [float(step(x, y)) for _ in range(3)]  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step(x, y)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    peak = _proc_status("VmHWM")
    out = dict(provider=provider, model=model, batch=BATCH, density=DENSITY, steps=steps,
               threads=torch.get_num_threads(), step_ms=statistics.median(times) * 1e3,
               step_ms_min=min(times) * 1e3, state_bytes=_tensor_bytes(state()),
               peak_rss_delta=(peak - rss0) if peak_ok else -1, loss_first=losses[0], loss_last=losses[-1],
               compact_backend=backend, isa=cpp.isa() if not cpp.UNAVAILABLE else "n/a")
    reset = getattr(step, "reset", None)
    if reset is not None:
        reset()
        t0 = time.perf_counter()
        reset()
        out["signin_reset_ms"] = (time.perf_counter() - t0) * 1e3
    return out


# ------------------------------------------------------------------------------------- parent side


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the small MLP only")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat every (model, provider) run; keep the fastest (--ab: rounds of the small MLP, "
                        "at least 30; the 4096 MLP runs a tenth)")
    p.add_argument("--out", type=Path, default=None,
                   help="CSV to write (default: runs/bench/train_step_cpu.csv, or train_step_ab_cpu.csv with --ab)")
    p.add_argument("--ab", action="store_true",
                   help="interleaved A/B in one process: dense vs engine vs engine with per-call paths")
    p.add_argument("--threads-list", type=int, nargs="+", default=[1, 2], help="thread counts of --ab")
    p.add_argument("--worker", nargs=3, metavar=("PROVIDER", "MODEL", "STEPS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        provider, model, steps = args.worker
        print("RESULT " + json.dumps(worker(provider, model, int(steps), args.threads)))
        return
    scratch = ROOT / "runs" / "bench"
    if args.ab:
        models = ["mlp784"] if args.quick else args.models
        ab(models, args.threads_list, max(args.rounds, 30), args.out or scratch / "train_step_ab_cpu.csv")
        return
    args.out = args.out or scratch / "train_step_cpu.csv"
    from bench_compact_linear import loadavg, machine
    from common import git_commit, write_csv

    import torch

    models = ["mlp784"] if args.quick else args.models
    info = dict(machine=machine(), torch=torch.__version__, commit=git_commit())
    print(f"# {info['machine']} | torch {info['torch']} | commit {info['commit']} | load average {loadavg()}")
    rows = []
    for model in models:
        steps = 30 if model == "mlp784" else 8
        results = {}
        for _ in range(args.rounds):
            for prov in args.providers:
                cmd = [sys.executable, __file__, "--threads", str(args.threads), "--worker", prov, model, str(steps)]
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not line:
                    print(f"{model} {prov}: FAILED\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
                    continue
                r = json.loads(line[0][7:])
                if prov not in results or r["step_ms"] < results[prov]["step_ms"]:
                    results[prov] = r
        base = results.get("naive"), results.get("dense")
        for prov, r in results.items():
            r.update(info, loadavg=loadavg(),
                     speedup_vs_naive=base[0]["step_ms"] / r["step_ms"] if base[0] else float("nan"),
                     speedup_vs_dense=base[1]["step_ms"] / r["step_ms"] if base[1] else float("nan"),
                     state_vs_naive=r["state_bytes"] / base[0]["state_bytes"] if base[0] else float("nan"),
                     peak_rss_vs_naive=(r["peak_rss_delta"] / base[0]["peak_rss_delta"]
                                        if base[0] and base[0]["peak_rss_delta"] > 0 else float("nan")))
            rows.append(r)
            extra = f" | signin_reset {r['signin_reset_ms']:.2f} ms" if "signin_reset_ms" in r else ""
            print(f"{model:>8} {prov:>10}: step {r['step_ms']:9.2f} ms (x{r['speedup_vs_naive']:5.2f} vs naive, "
                  f"x{r['speedup_vs_dense']:5.2f} vs dense) | state {r['state_bytes'] / 2**20:8.2f} MiB "
                  f"({r['state_vs_naive']:.3f}x naive) | peak RSS delta {r['peak_rss_delta'] / 2**20:8.2f} MiB "
                  f"({r['peak_rss_vs_naive']:.3f}x naive) | loss {r['loss_first']:.3f}->{r['loss_last']:.3f}{extra}")
    if rows:
        write_csv(rows, args.out)


if __name__ == "__main__":
    main()
