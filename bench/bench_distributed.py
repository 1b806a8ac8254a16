"""A GPT-2-small-shaped decoder trained on 1 and 2 processes (torch.distributed, gloo, CPU): Sign-In at
90 % sparsity (csr) against dense training, plain / DDP / FSDP2.

    python bench/bench_distributed.py                  # 124M GPT-2 small shape, 3 timed steps per run
    python bench/bench_distributed.py --quick          # a 2-layer, 128-wide model (a smoke test)

Model: transformers' GPT2LMHeadModel from a GPT2Config (12 layers, 768 wide, 12 heads, vocab 50257,
124M parameters), random init; its Conv1D projections become nn.Linear and then sparse layers (the token
embedding, tied to the output layer, and the position embedding stay dense). Data: a token stream made
here from a seeded generator (no download). AdamW (lr 1e-4, weight decay 0.01); each step sees
``--batch`` sequences of ``--seq`` tokens in all, split over the processes.

Per run (each in fresh processes, one thread each) and per rank: tokens/s (all ranks' tokens over the
mean time of the timed steps, after one warm-up step), the bytes of parameters + gradients + optimizer
state this rank holds (counted from its live tensors, local shards under FSDP2, right after a step), its
peak RSS (ru_maxrss: everything the process touched, torch itself included), and the loss after the
last step (mean over the ranks). Rows go to ``--out`` (default runs/bench) as CSV with the machine,
versions, commit and load average; ``--png`` also draws them.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py: machine, versions, commit)

RUNS = [  # (method, processes, wrapping)
    ("dense", 1, "none"), ("signin", 1, "none"),
    ("dense", 2, "ddp"), ("signin", 2, "ddp"),
    ("dense", 2, "fsdp"), ("signin", 2, "fsdp"),
]


def build(args, wrap: str, world: int):
    import transformers

    import sparse_engine as se

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.heads,
                                     n_positions=max(args.seq, 64), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    method = se.methods.make_method(args.method, **({} if args.method == "dense" else
                                                    dict(density=0.1, layout="csr", distribution="uniform")))
    method.prepare(model)
    if wrap == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = method.make_optimizer(model, "adamw", lr=1e-4, weight_decay=0.01)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if wrap == "ddp" else model
    method.apply(wrapped, opt, epochs=1, steps_per_epoch=args.steps + 1)
    return model, wrapped, opt, config


def held_bytes(model, opt) -> int:
    """Parameters + gradients + optimizer state this rank holds (local shards of DTensors)."""
    from sparse_engine.distributed import local

    def nbytes(t):
        t = local(t)
        return t.numel() * t.element_size()

    total = sum(nbytes(p) + (nbytes(p.grad) if p.grad is not None else 0) for p in model.parameters())
    for state in opt.state.values():
        total += sum(nbytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return total


def worker(rank: int, args, wrap: str, world: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=1800))
    model, wrapped, opt, config = build(args, wrap, world)
    g = torch.Generator().manual_seed(1)
    share = args.batch // world
    times, loss, held = [], torch.zeros(()), 0
    for step in range(args.steps + 1):
        tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g)[rank * share:(rank + 1) * share]
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = wrapped(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        if step > 0:
            times.append(time.perf_counter() - start)
        held = held_bytes(model, opt)
    step_s = torch.tensor([sum(times) / len(times)], dtype=torch.float64)
    loss = loss.detach().double().reshape(1)
    dist.all_reduce(step_s, op=dist.ReduceOp.MAX)  # a step ends when its slowest rank does
    dist.all_reduce(loss, op=dist.ReduceOp.SUM)
    row = dict(method=args.method, processes=world, wrap=wrap, rank=rank, seq=args.seq, batch=args.batch,
               params=sum(p.numel() for p in model.parameters()) if wrap != "fsdp" else "",
               step_s=f"{float(step_s):.3f}", tokens_per_s=f"{args.batch * args.seq / float(step_s):.1f}",
               held_mb=f"{held / 2**20:.1f}", peak_rss_mb=f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}",
               loss=f"{float(loss) / world:.4f}", steps=args.steps)
    torch.save(row, out_file)
    dist.destroy_process_group()


def run(args, method: str, world: int, wrap: str, scratch: Path) -> list[dict]:
    args = argparse.Namespace(**{**vars(args), "method": method})
    tag = f"{method}_{world}_{wrap}"
    init_file = scratch.resolve() / f"{tag}.rendezvous"  # file:// needs an absolute path
    init_file.unlink(missing_ok=True)
    outs = [str(scratch / f"{tag}.rank{r}.pt") for r in range(world)]
    mp.spawn(_entry, args=(args, wrap, world, str(init_file), outs), nprocs=world, join=True)
    return [torch.load(o, weights_only=False) for o in outs]


def _entry(rank, args, wrap, world, init_file, outs):
    worker(rank, args, wrap, world, init_file, outs[rank])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2, help="sequences per step, all ranks together (even)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--quick", action="store_true", help="a 2-layer, 128-wide model, 1 timed step")
    p.add_argument("--out", default="runs/bench", help="folder of the CSV (and PNG)")
    p.add_argument("--png", action="store_true", help="also draw the CSV (needs matplotlib)")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.width, args.heads, args.steps, args.seq = 2, 128, 4, 1, 32
    if args.batch % 2:
        p.error(f"--batch must be even (split over 2 processes), got {args.batch}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = common.environment("distributed", "cpu")
    rows = []
    for method, world, wrap in RUNS:
        load = os.getloadavg()[0]
        for row in run(args, method, world, wrap, out):
            row.update(load_before=f"{load:.2f}", **{k: env[k] for k in ("machine", "torch", "commit", "date")})
            rows.append(row)
            print(", ".join(f"{k}={row[k]}" for k in ("method", "processes", "wrap", "rank", "tokens_per_s",
                                                      "held_mb", "peak_rss_mb", "loss")), flush=True)
    path = out / f"distributed_gpt2{'_quick' if args.quick else ''}_cpu.csv"
    common.write_csv(rows, path)
    if args.png:
        plot(rows, path.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rank0 = [r for r in rows if int(r["rank"]) == 0]
    labels = [f"{r['method']}\n{r['processes']}p {r['wrap']}" for r in rank0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(labels, [float(r["tokens_per_s"]) for r in rank0], color=["C0" if r["method"] == "dense" else "C1" for r in rank0])
    axes[0].set_ylabel("tokens / s (all ranks)")
    axes[1].bar(labels, [float(r["held_mb"]) for r in rank0], color=["C0" if r["method"] == "dense" else "C1" for r in rank0])
    axes[1].set_ylabel("params + grads + AdamW state per rank (MiB)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle("GPT-2 small shape (124M), CPU, gloo: dense vs Sign-In 90 % csr")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
