"""The small ResNet's (``--model cnn``) Sign-In training epoch at 90 % sparsity against dense training, CPU.

    python bench/bench_resnet_epoch.py [--threads 1,2] [--images 6000] [--rounds 3] [--layouts csr,auto]
                                       [--clock wall] [--channels-last none|dense|all] [--out DIR]

Each provider is built exactly as ``sparse-engine train --model cnn`` builds it (same seed, same
sparsify, the method's optimizer: SGD, momentum 0.9, weight decay 5e-4, batch 128) and trains on the
first ``--images`` Fashion-MNIST training images, shuffled, one loss ``.item()`` per step as the training
loop does:

* ``dense``              method dense: the plain model (nn.Conv2d) and the library SGD;
* ``signin layout=csr``  Sign-In, density 0.1 (ERK over the layers), every conv and linear layer csr (the
  direct sparse convolution on CPU);
* ``signin layout=auto`` the same, each layer's layout measured at this batch size and thread count
  (dense where csr is not more than 5 % faster: the stem and the 1×1 shortcuts usually stay dense);
* ``... channels_last`` a provider with its model and batches in ``torch.channels_last`` memory format,
  the faster way to train a conv net on CPU with torch (its batch norms and oneDNN convolutions run NHWC;
  the library's csr convs read and write that format too). ``dense channels_last`` is measured by
  default as a second baseline (column vs_dense_channels_last_best); ``--channels-last all`` adds every
  provider in that format, ``none`` leaves it out. vs_dense_* are against ``dense``, which trains as
  ``sparse-engine train`` does.

The providers take turns, epoch by epoch (``--rounds`` epochs each per thread count, in an order drawn
anew each round), so that the load of the machine falls on all of them alike. Rows: the fastest epoch, the
median epoch, and the speed-up against dense in the same run (fastest against fastest, and the median of
the per-round ratios). ``--clock cpu`` times with the process CPU clock instead of the wall clock (one
thread only: it leaves out the time the process waits for a core on a busy machine). Writes
resnet_epoch_cpu.csv and .png (resnet_epoch_cpu_cpuclock.* with --clock cpu; to runs/bench unless --out)
with machine / versions / commit / load.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

BATCH = 128
CL = " channels_last"  # the suffix of a provider whose model and batches are in channels_last format


def build(provider: str, density: float, x, y):
    """(model, optimizer) of one provider, built as the training command builds it."""
    from sparse_engine.app.config import TrainConfig, build_model_and_method
    from sparse_engine.nn import autolayout

    channels_last = provider.endswith(CL)
    method_name, _, layout = provider.removesuffix(CL).partition(" layout=")
    cfg = TrainConfig(model="cnn", method=method_name, density=density, layout=layout or "dense",
                      batch_size=BATCH, progress=False).validate()
    model, method, _ = build_model_and_method(cfg, tuple(x.shape[1:]), 10, None, (x[:BATCH], y[:BATCH]))
    if layout == "auto":
        autolayout.tune(model, x[:BATCH])
    opt = method.make_optimizer(model, cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    method.apply(model, opt, epochs=1, steps_per_epoch=-(-len(x) // BATCH))
    if channels_last:
        import torch

        model.to(memory_format=torch.channels_last)  # in place: the optimizer keeps its parameters
    return model, opt


def layouts(model) -> str:
    """Each sparse layer's layout, e.g. 'stem:dense layer1.conv1:csr ...'."""
    return " ".join(f"{n}:{m.param.layout}" for n, m in model.named_modules() if hasattr(m, "param"))


def epoch(model, opt, x, y, seed: int, clock=time.perf_counter, channels_last: bool = False) -> float:
    """Seconds of one pass over (x, y) in batches of 128: forward, loss, backward, step (batches in
    channels_last memory format with ``channels_last``)."""
    import torch
    import torch.nn.functional as F

    from sparse_engine.app import data

    model.train()
    t0 = clock()
    for xb, yb in data.batches(x, y, BATCH, shuffle=True, seed=0, epoch=seed):
        if channels_last:  # the batch's conversion is part of such a model's step
            xb = xb.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(xb), yb)
        loss.detach().item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clock() - t0


def measure(providers: list[str], args, x, y, nthreads: int) -> list[dict]:
    import torch

    torch.set_num_threads(nthreads)
    built = {p: build(p, args.density, x, y) for p in providers}
    for p, (model, opt) in built.items():  # warm-up: allocations, thread pools
        epoch(model, opt, x[: 4 * BATCH], y[: 4 * BATCH], 0, channels_last=p.endswith(CL))
    times: dict[str, list[float]] = {p: [] for p in providers}
    loads = []
    order = random.Random(0)
    for r in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for p in order.sample(providers, len(providers)):  # a new order each round: no fixed neighbours
            times[p].append(epoch(*built[p], x, y, r + 1, args.clock_fn, channels_last=p.endswith(CL)))
        print(f"{nthreads}t round {r + 1}: " + " | ".join(f"{p} {times[p][-1]:.2f} s" for p in providers)
              + f" | load {loads[-1]:.2f}", flush=True)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    rows = []
    dense_cl = times.get("dense" + CL)
    for p in providers:
        ratios = [d / t for d, t in zip(times["dense"], times[p])]
        rows.append(dict(provider=p, threads=nthreads, images=len(x), batch=BATCH, density=args.density,
                         rounds=args.rounds, clock=args.clock, best_s=round(min(times[p]), 3),
                         median_s=round(statistics.median(times[p]), 3),
                         vs_dense_best=round(min(times["dense"]) / min(times[p]), 3),
                         vs_dense_median=round(statistics.median(ratios), 3),
                         vs_dense_channels_last_best=round(min(dense_cl) / min(times[p]), 3) if dense_cl
                         else "",
                         layouts=layouts(built[p][0]) if p.startswith("signin") else "",
                         loadavg_rounds=" ".join(f"{v:.2f}" for v in loads), loadavg=load))
    return rows


def plot(rows: list[dict], path: Path) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    threads = sorted({r["threads"] for r in rows})
    providers = [p for p in dict.fromkeys(r["provider"] for r in rows)]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    width = 0.8 / len(providers)
    for i, p in enumerate(providers):
        vals = [next(r["vs_dense_best"] for r in rows if r["provider"] == p and r["threads"] == t) for t in threads]
        ax.bar([j + i * width for j in range(len(threads))], vals, width, label=p)
    ax.axhline(2.0, color="gray", ls="--", lw=1, label="2× target")
    ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(threads))])
    ax.set_xticklabels([f"{t} thread{'s' if t > 1 else ''}" for t in threads])
    ax.set_ylabel("epoch speed-up vs dense")
    ax.set_title(f"SmallResNet Sign-In 90 %, {rows[0]['images']} images, batch {BATCH}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, not on them
    common.save_fig(fig, path)
    print(f"# wrote {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts, each measured in turn")
    p.add_argument("--images", type=int, default=6000, help="training images per epoch")
    p.add_argument("--rounds", type=int, default=3, help="epochs per provider and thread count, interleaved")
    p.add_argument("--layouts", default="csr,auto", help="the Sign-In layouts to measure (csr, auto, dense)")
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST's folder (default: where the training command looks)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: perf_counter; cpu: process CPU time (needs --threads 1)")
    p.add_argument("--channels-last", choices=("none", "dense", "all"), default="dense",
                   help="which providers also run in channels_last format: none, the dense baseline "
                        "(default), or all")
    p.add_argument("--out", default=str(common.SCRATCH))
    args = p.parse_args(argv)
    threads = common.thread_counts(p, args.threads, args.clock)
    layouts_ = [s for s in args.layouts.split(",") if s]
    if not layouts_ or any(s not in ("csr", "auto", "dense") for s in layouts_):
        p.error(f"--layouts must be a comma-separated subset of csr, auto, dense, got {args.layouts!r}")
    if args.images < BATCH:
        p.error(f"--images must be >= {BATCH} (one batch), got {args.images}")
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if not 0 < args.density <= 1:
        p.error(f"--density must be in (0, 1], got {args.density}")
    args.clock_fn = time.process_time if args.clock == "cpu" else time.perf_counter

    from sparse_engine.app import data

    ds = data.load_fashion_mnist(args.data_dir, flatten=False)
    x, y = ds.x_train[: args.images].contiguous(), ds.y_train[: args.images].contiguous()
    env = common.environment("full", "cpu")
    providers = ["dense"] + [f"signin layout={s}" for s in layouts_]
    providers += {"none": [], "dense": ["dense" + CL], "all": [p + CL for p in providers]}[args.channels_last]
    rows = []
    for nthreads in threads:
        rows += [{**r, **env} for r in measure(providers, args, x, y, nthreads)]
    for r in rows:
        vs_cl = r["vs_dense_channels_last_best"]
        cl = f"  vs dense{CL} {vs_cl:.2f}x" if vs_cl else ""
        print(f"{r['threads']}t {r['provider']:<32} best {r['best_s']:.2f} s  median {r['median_s']:.2f} s  "
              f"vs dense {r['vs_dense_best']:.2f}x (median ratio {r['vs_dense_median']:.2f}x){cl}  "
              f"load {r['loadavg']}")
    out, name = Path(args.out), "resnet_epoch_cpu" + ("_cpuclock" if args.clock == "cpu" else "")
    common.write_csv(rows, out / f"{name}.csv")
    plot(rows, out / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
