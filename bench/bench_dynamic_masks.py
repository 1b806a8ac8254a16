"""What dynamic masks cost (CPU): one RigL update of a 4096×4096 csr layer at 90 % sparsity, and the
training-time overhead of RigL at ``update_every=100`` over the static mask on the 4096-wide MLP of
bench_train_step (4096-4096-4096-10, batch 128, Sign-In, csr, density 0.1, SGD momentum 0.9).

    python bench/bench_dynamic_masks.py                 # both measurements (a few minutes on 1 thread)
    python bench/bench_dynamic_masks.py --quick         # tiny sizes: a smoke test, timings mean nothing

Rows:
* ``rigl_capture``: forming one layer's dense gradient ∂L/∂θ = gᵀx from the batch and reducing it to the
  grow candidates (what the backward of an update step adds per layer);
* ``rigl_update`` / ``set_update``: the drop / grow of one layer, its csr index rebuilt and its optimizer
  state moved (median of ``--reps`` updates, each on the mask the last one left);
* ``step_static`` / ``step_rigl_between`` / ``step_rigl_update``: median time of one training step of the
  MLP: static mask; RigL between updates; a RigL update step (capture + update included). Blocks of
  ``--steps`` steps of the three alternate ``--rounds`` times;
* ``overhead``: the training-time overhead of RigL over static at ``--update-every`` (100), from those
  medians: ((every − 1) · between + update) / (every · static) − 1.
Results go to runs/bench/dynamic_masks.csv unless ``--out`` is given.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_train_step import BATCH, DENSITY, LR, MODELS, MOMENTUM, WD, _module_step  # noqa: E402


def _mlp_method(sizes, dynamic, update_every, total, torch):
    from torch import nn

    from sparse_engine.methods import make_method

    layers = []
    for k, n in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(k, n), nn.ReLU()]
    torch.manual_seed(0)
    model = nn.Sequential(*layers[:-1])
    method = make_method("signin", density=DENSITY, distribution="uniform", layout="csr", dynamic=dynamic,
                         update_every=update_every, stop_at=1.0)
    method.prepare(model)
    opt = method.make_optimizer(model, "sgd", lr=LR, momentum=MOMENTUM, weight_decay=WD)
    method.apply(model, opt, epochs=1, steps_per_epoch=total)
    return model, method, opt


def one_layer_update(n: int, reps: int, dynamic: str, torch) -> dict:
    """Median time of one layer's capture (RigL) and update, for an n×n csr layer."""
    model, method, opt = _mlp_method((n, n), dynamic, 10**9, 10**9, torch)  # updates only by hand here
    updater = method.updater
    name, layer = updater.layers[0]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(BATCH, n, generator=g), torch.randint(0, n, (BATCH,), generator=g)
    step = _module_step(model, opt, torch.nn.CrossEntropyLoss())
    captures, updates = [], []
    for _ in range(reps):
        step(x, y)  # then time the parts by hand: the capture and the update alone
        s = opt.num_steps
        updater._planned = updater._counts(s)
        out = layer(x)
        gout = torch.randn_like(out)
        t0 = time.perf_counter()
        if dynamic == "rigl":
            updater._capture(name, layer, x, gout)
        t1 = time.perf_counter()
        updater.update(s)
        t2 = time.perf_counter()
        captures.append(t1 - t0)
        updates.append(t2 - t1)
        assert layer.nnz() == round(DENSITY * n * n)
    return dict(capture_ms=statistics.median(captures) * 1e3, update_ms=statistics.median(updates) * 1e3,
                regrown=updater.regrown // reps)


def train_steps(sizes, rounds: int, steps: int, torch) -> dict[str, float]:
    """Median step time (s) of: static; RigL between updates (hooks in place, not capturing); RigL update
    steps (update_every=1: forward, backward with the capture, the optimizer step and the update). Blocks
    of ``steps`` steps of the three alternate ``rounds`` times."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(BATCH, sizes[0], generator=g), torch.randint(0, sizes[-1], (BATCH,), generator=g)
    runs = {}
    for kind, dynamic, every in (("static", None, 1), ("rigl_between", "rigl", 10**9), ("rigl_update", "rigl", 1)):
        model, method, opt = _mlp_method(sizes, dynamic, every, 10**9, torch)
        runs[kind] = _module_step(model, opt, torch.nn.CrossEntropyLoss())
        runs[kind](x, y)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for kind, step in runs.items():
            for _ in range(steps):
                t0 = time.perf_counter()
                step(x, y)
                times[kind].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="training steps per timed block")
    p.add_argument("--rounds", type=int, default=3, help="blocks of each kind, alternating")
    p.add_argument("--update-every", type=int, default=100, help="the update period the overhead is computed for")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "dynamic_masks.csv")
    args = p.parse_args(argv)
    import torch

    from bench_compact_linear import loadavg, machine
    from common import git_commit, write_csv

    torch.set_num_threads(args.threads)
    n, sizes = (256, (64, 256, 256, 10)) if args.quick else (4096, MODELS["mlp4096"])
    steps = 2 if args.quick else args.steps
    info = dict(machine=machine(), torch=torch.__version__, commit=git_commit(), threads=args.threads)
    print(f"# {info['machine']} | torch {info['torch']} | commit {info['commit']} | {args.threads} thread(s) | "
          f"load average {loadavg()}" + (" | QUICK: timings mean nothing" if args.quick else ""))
    rows = []

    def emit(row):
        row.update(info, loadavg=loadavg(), quick=args.quick)
        rows.append(row)
        print(f"{row['case']:>17} {row['shape']:>18}: {row['time_ms']:10.2f} ms  {row.get('note', '')}", flush=True)

    for dynamic in ("rigl", "set"):
        r = one_layer_update(n, 2 if args.quick else args.reps, dynamic, torch)
        if dynamic == "rigl":
            emit(dict(case="rigl_capture", shape=f"{n}x{n}", density=DENSITY, time_ms=r["capture_ms"]))
        emit(dict(case=f"{dynamic}_update", shape=f"{n}x{n}", density=DENSITY, time_ms=r["update_ms"],
                         note=f"{r['regrown']} regrown per update"))
    t = train_steps(sizes, args.rounds, steps, torch)
    shape = "-".join(map(str, sizes))
    for kind, v in t.items():
        emit(dict(case=f"step_{kind}", shape=shape, density=DENSITY, time_ms=v * 1e3, note=f"batch {BATCH}"))
    every = args.update_every
    overhead = ((every - 1) * t["rigl_between"] + t["rigl_update"]) / (every * t["static"]) - 1
    emit(dict(case="overhead", shape=shape, density=DENSITY, time_ms=float("nan"),
              note=f"{overhead:+.2%} RigL over static at update_every={every}: ((every-1)*between + update) / "
                   "(every*static) - 1"))
    write_csv(rows, args.out)


if __name__ == "__main__":
    main()
