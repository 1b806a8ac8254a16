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
* ``train_static`` / ``train_rigl``: total time of ``--steps`` training steps (the last one an update
  step for RigL), static and RigL run alternately ``--rounds`` times, the fastest round of each kept;
  ``overhead`` = train_rigl / train_static − 1.
Results go to runs/bench/dynamic_masks.csv unless ``--out`` is given.
"""
from __future__ import annotations

import argparse
import csv
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


def train_block(sizes, dynamic, steps: int, torch) -> float:
    model, method, opt = _mlp_method(sizes, dynamic, steps, 100 * steps, torch)  # one update per ``steps``
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(BATCH, sizes[0], generator=g), torch.randint(0, sizes[-1], (BATCH,), generator=g)
    step = _module_step(model, opt, torch.nn.CrossEntropyLoss())
    for _ in range(2):  # warm-up, not timed; the update (step number ``steps``) falls in the timed block
        step(x, y)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    elapsed = time.perf_counter() - t0
    if method.updater is not None:
        assert method.updater.updates == 1, method.updater.updates
    return elapsed


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=100, help="training steps per timed block (= update_every)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "dynamic_masks.csv")
    args = p.parse_args(argv)
    import torch

    from bench_compact_linear import loadavg, machine
    from common import git_commit

    torch.set_num_threads(args.threads)
    n, sizes = (256, (64, 256, 256, 10)) if args.quick else (4096, MODELS["mlp4096"])
    steps = 10 if args.quick else args.steps
    info = dict(machine=machine(), torch=torch.__version__, commit=git_commit(), threads=args.threads)
    print(f"# {info['machine']} | torch {info['torch']} | commit {info['commit']} | {args.threads} thread(s) | "
          f"load average {loadavg()}" + (" | QUICK: timings mean nothing" if args.quick else ""))
    rows = []
    for dynamic in ("rigl", "set"):
        r = one_layer_update(n, 2 if args.quick else args.reps, dynamic, torch)
        if dynamic == "rigl":
            rows.append(dict(case="rigl_capture", shape=f"{n}x{n}", density=DENSITY, time_ms=r["capture_ms"]))
        rows.append(dict(case=f"{dynamic}_update", shape=f"{n}x{n}", density=DENSITY, time_ms=r["update_ms"],
                         note=f"{r['regrown']} regrown per update"))
    best = {"static": float("inf"), "rigl": float("inf")}
    for _ in range(args.rounds):  # alternate, keep each one's fastest round
        for kind in best:
            best[kind] = min(best[kind], train_block(sizes, None if kind == "static" else "rigl", steps, torch))
    shape = "-".join(map(str, sizes))
    for kind, t in best.items():
        rows.append(dict(case=f"train_{kind}", shape=shape, density=DENSITY, time_ms=t * 1e3,
                         note=f"{steps} steps, batch {BATCH}" + (f", 1 update (update_every={steps})"
                                                                 if kind == "rigl" else "")))
    rows.append(dict(case="overhead", shape=shape, density=DENSITY, time_ms=float("nan"),
                     note=f"{best['rigl'] / best['static'] - 1:+.2%} (rigl over static)"))
    load = loadavg()
    for r in rows:
        r.update(info, loadavg=load, quick=args.quick)
        print(f"{r['case']:>14} {r['shape']:>18}: {r['time_ms']:10.2f} ms  {r.get('note', '')}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
