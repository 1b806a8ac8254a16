"""Helpers of the 2-process tests (tests/test_distributed.py): a bounded spawn, and one training case.

The spawned worker runs every case in one job (one process group for all of them, so that CI spawns
once), writes its results to a file, and the test compares them with the same case run in the test's own
process on the concatenated batch. Every collective runs under the process group's timeout, and the spawn
is joined under a deadline: a bug fails the test instead of hanging it.
"""
from __future__ import annotations

import os
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sparse_engine as se
from sparse_engine.methods import make_method

COLLECTIVE_TIMEOUT_S = 60
JOIN_TIMEOUT_S = 240
EPOCHS, STEPS, BATCH = 2, 3, 8  # global batch (both ranks together) of each step


def spawn(worker, world: int, tmp_path, *args) -> list[dict]:
    """Run ``worker(rank, world, init_file, out_file, *args)`` on ``world`` processes; their results."""
    init_file = str(tmp_path / "rendezvous")
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(world)]
    ctx = mp.start_processes(_entry, args=(worker, world, init_file, outs, args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"the {world}-process job did not finish within {JOIN_TIMEOUT_S} s")
    results = [torch.load(o, weights_only=False) for o in outs]
    for r, res in enumerate(results):
        if "error" in res:
            raise AssertionError(f"rank {r} failed:\n{res['error']}")
    return results


def _entry(rank, worker, world, init_file, outs, args):
    torch.set_num_threads(1)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        result = worker(rank, world, *args)
    except Exception:  # reported by the parent with the traceback
        result = {"error": traceback.format_exc()}
    torch.save(result, outs[rank])
    dist.destroy_process_group()


def data(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """EPOCHS × STEPS global batches, the same on every rank (seeded)."""
    g = torch.Generator().manual_seed(1234)
    return [(torch.randn(BATCH, 12, generator=g, dtype=dtype), torch.randint(0, 5, (BATCH,), generator=g))
            for _ in range(EPOCHS * STEPS)]


def model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 5)).to(dtype)


def method_options(name: str, layout: str) -> dict:
    """The options of a case's method; variants: "pilot-layer" (one threshold per layer, ERK densities),
    "<method>-rigl" (RigL mask updates at steps 2 and 4)."""
    base, _, variant = name.partition("-")
    if variant == "layer":
        return {**method_options(base, layout), "prune_scope": "layer", "distribution": "erk"}
    if variant == "global":
        return {**method_options(base, layout), "prune_scope": "global"}
    if variant == "rigl":
        return {**method_options(base, layout), "dynamic": "rigl", "update_every": 2, "drop_fraction": 0.5,
                "stop_at": 0.9}
    opts = {"density": 0.5, "layout": layout, "seed": 3, "distribution": "uniform"}
    if name == "gmp":  # prunes after steps 2, 3, 4 (cubic to 0.5), then trains the final mask
        opts.update(prune_start=0.2, prune_end=0.7, prune_every=1)
    if name == "acdc":  # dense 2 steps, sparse 2, dense 1, sparse 1 (the final sparse phase)
        opts.update(acdc_phase=2, acdc_unit="step", acdc_final=0.2, signin=True, reset_every=1, reset_unit="step")
    if name == "signin":
        opts.update(reset_every=1, reset_unit="step")  # resets inside training, in the step hook
    if name == "pilot":
        opts.update(alpha=1e-2, target_l1_ratio=0.99)
    return opts


def shard(net: nn.Module, world: int) -> nn.Module:
    """FSDP2: every layer with parameters sharded on its own, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in net:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    return fully_shard(net, mesh=mesh)


def build(case: tuple, rank: int = 0, world: int = 1, wrap: str = "ddp") -> dict:
    """Model (sparsified, wrapped for DDP or FSDP2 when ``world`` > 1), method and optimizer of a case."""
    name, layout, opt_name, mode, dtype = case
    net = model(dtype)
    method = make_method(name.partition("-")[0], **method_options(name, layout))
    if layout == "bsr":  # 4×4 blocks: every layer has several, split over the ranks (32×32 would be one)
        options = method.sparsify_options()
        method.sparsify_options = lambda: {**options, "block_shape": (4, 4)}
    method.prepare(net)
    if world > 1 and wrap == "fsdp":
        net = shard(net, world)
    kwargs = {"momentum": 0.9, "weight_decay": 1e-3} if opt_name == "sgd" else {"weight_decay": 1e-2}
    opt = method.make_optimizer(net, opt_name, lr=0.05 if opt_name == "sgd" else 1e-2, **kwargs)
    wrapped = nn.parallel.DistributedDataParallel(net) if world > 1 and wrap == "ddp" else net
    method.apply(wrapped, opt, epochs=EPOCHS, steps_per_epoch=STEPS)
    if mode == "attach":
        opt.attach(wrapped)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1.0 + 0.2 * k))  # saved with DCP
    return {"net": net, "wrapped": wrapped, "method": method, "opt": opt, "sched": sched, "dtype": dtype,
            "rank": rank, "world": world, "alphas": []}


def train(run: dict, epochs: range) -> None:
    """Train ``epochs`` (0-based) of a built case; this rank's share of each global batch."""
    wrapped, opt, method = run["wrapped"], run["opt"], run["method"]
    share, rank = BATCH // run["world"], run["rank"]
    batches = data(run["dtype"])
    for epoch in epochs:
        correct = seen = 0
        for x, y in batches[epoch * STEPS:(epoch + 1) * STEPS]:
            x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
            opt.zero_grad(set_to_none=True)
            out = wrapped(x)
            nn.functional.cross_entropy(out, y).backward()
            opt.step()
            run["sched"].step()
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
        run["alphas"].append(method.after_epoch(epoch + 1, correct / seen).get("alpha"))


def finish(run: dict) -> dict:
    """End of training (PILoT prunes); what the tests compare."""
    run["method"].end_of_training()
    net = run["net"]
    masks = {n: pz.dense_mask() for n, pz in se.optim.parameterizations(net)}
    updater = getattr(run["method"], "updater", None)
    return {"state": se.distributed.full_state_dict(net), "alphas": run["alphas"], "masks": masks,
            "resets": getattr(run["method"], "beta_before", None),
            "regrown": None if updater is None else updater.regrown}


def run_case(case: tuple, rank: int = 0, world: int = 1, wrap: str = "ddp") -> dict:
    """Train one case; ``world`` > 1: this rank's share of each global batch under DDP or FSDP2."""
    run = build(case, rank, world, wrap)
    train(run, range(EPOCHS))
    return finish(run)


def resumed_case(case: tuple, rank: int, world: int, wrap: str, where: str) -> dict:
    """The case trained one epoch, saved with DCP, rebuilt from scratch, loaded and trained to the end."""
    first = build(case, rank, world, wrap)
    train(first, range(1))
    se.distributed.save(where, first["wrapped"], first["opt"], first["method"], first["sched"])
    second = build(case, rank, world, wrap)
    se.distributed.load(where, second["wrapped"], second["opt"], second["method"], second["sched"])
    second["alphas"] = list(first["alphas"])
    train(second, range(1, EPOCHS))
    return finish(second)

CASES = [(name, layout, opt, mode, torch.float64)
         for name in ("static", "signin", "pilot")
         for layout in ("dense", "csr") if not (name == "pilot" and layout == "csr")  # pilot trains dense
         for opt in ("sgd", "adamw") for mode in ("step", "attach")]
CASES += [("signin", "csr", "adamw", "attach", torch.float32), ("pilot", "dense", "sgd", "step", torch.float32),
          ("signin-rigl", "csr", "sgd", "step", torch.float64), ("static-rigl", "csr", "adamw", "attach", torch.float64),
          ("signin-rigl", "dense", "adamw", "step", torch.float64), ("signin", "bsr", "sgd", "attach", torch.float64)]


def user_errors(rank: int, world: int) -> dict:
    """The errors a user can cause in a distributed job, as each rank sees them (message or None)."""
    out = {}
    net = model(torch.float64)
    se.sparsify(net, method="signin", density=0.5, seed=rank, distribution="uniform")  # masks differ
    try:
        se.distributed.check_masks(net)
        out["check_masks"] = None
    except se.distributed.MaskMismatchError as e:
        out["check_masks"] = str(e)
    opt = se.SGD(net, lr=0.1)
    net(torch.randn(4, 12, dtype=torch.float64)).sum().backward()
    try:
        opt.step()
        out["first_step"] = None
    except se.distributed.MaskMismatchError as e:
        out["first_step"] = str(e)
    try:
        opt.attach(net)
        out["attach_plain"] = None
    except RuntimeError as e:
        out["attach_plain"] = str(e)
    return out


def controller_alphas(rank: int, world: int, accs: list[list[float]]) -> list[float]:
    """PILoT's α sequence when rank r reports accuracy accs[epoch][r] after each epoch (a DDP model)."""
    net = model(torch.float64)
    method = make_method("pilot", **method_options("pilot", "dense"))
    method.prepare(net)
    opt = method.make_optimizer(net, "sgd", lr=0.0)
    wrapped = nn.parallel.DistributedDataParallel(net) if world > 1 else net
    method.apply(wrapped, opt, epochs=2 * len(accs), steps_per_epoch=1)
    return [method.after_epoch(e + 1, acc[rank])["alpha"] for e, acc in enumerate(accs)]


#: rank 0's accuracy drops in epoch 2, rank 1's rises more: the mean rises (α grows on both ranks)
CONTROLLER_ACCS = [[0.5, 0.5], [0.4, 0.7]]


#: the cases resumed from a distributed checkpoint (with the wrapping each is trained under)
RESUME_CASES = {"ddp": [("signin", "csr", "adamw", "step", torch.float64), ("pilot", "dense", "sgd", "attach", torch.float64)],
                "fsdp": [("signin", "dense", "sgd", "attach", torch.float64), ("static", "csr", "adamw", "step", torch.float64),
                         ("pilot", "dense", "adamw", "step", torch.float64)]}


def checkpoints(wrap: str, ckpt_dir: str) -> dict:
    return {case: os.path.join(ckpt_dir, f"{wrap}{i}") for i, case in enumerate(RESUME_CASES[wrap])}


def resumed(rank: int, world: int, wrap: str, ckpt_dir: str) -> dict:
    return {case: resumed_case(case, rank, world, wrap, where) for case, where in checkpoints(wrap, ckpt_dir).items()}


#: the FSDP2 case whose gathered model is extracted
EXTRACT_CASE = ("signin", "csr", "sgd", "step", torch.float64)
EXTRACT_INPUT = torch.randn(7, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def extracted_output(case: tuple, state: dict) -> torch.Tensor:
    """Load a gathered state into a fresh unsharded model of the case, extract it, run it on a fixed input."""
    net = model(case[-1])
    make_method(case[0], **method_options(case[0], case[1])).prepare(net)
    net.load_state_dict(state)
    with torch.no_grad():
        return se.extract(net).eval()(EXTRACT_INPUT)


def ddp_worker(rank: int, world: int, cases: list, ckpt_dir: str) -> dict:
    return {"cases": {case: run_case(case, rank, world) for case in cases}, "errors": user_errors(rank, world),
            "controller": controller_alphas(rank, world, CONTROLLER_ACCS),
            "resumed": resumed(rank, world, "ddp", ckpt_dir), "checkpoints": checkpoints("ddp", ckpt_dir)}


FSDP_CASES = [(name, layout, opt, mode, torch.float64)
              for name in ("static", "signin", "pilot") for layout in ("dense", "csr")
              if not (name == "pilot" and layout == "csr")  # pilot trains dense
              for opt in ("sgd", "adamw") for mode in ("step", "attach")]
FSDP_CASES += [("signin", "csr", "adamw", "step", torch.float32), ("pilot", "dense", "adamw", "attach", torch.float32),
               ("signin", "bsr", "adamw", "step", torch.float64), ("static", "bsr", "sgd", "attach", torch.float64),
               ("pilot-layer", "dense", "sgd", "step", torch.float64), ("gmp", "dense", "adamw", "step", torch.float64),
               ("gmp-global", "dense", "sgd", "attach", torch.float64), ("acdc", "dense", "adamw", "attach", torch.float64)]


def nonfinite_step(rank: int, world: int, mode: str) -> dict:
    """One FSDP2 step whose gradients are NaN on rank 0's half of the batch only: nothing may move."""
    run = build(("static", "dense", "adamw", mode, torch.float64), rank, world, "fsdp")  # no reset: θ is w
    before = se.distributed.full_state_dict(run["net"])
    x, y = data(torch.float64)[0]
    x = x[rank * (BATCH // world):(rank + 1) * (BATCH // world)].clone()
    if rank == 0:
        x[0, 0] = float("nan")
    run["opt"].zero_grad(set_to_none=True)
    nn.functional.cross_entropy(run["wrapped"](x), y[:len(x)]).backward()
    run["opt"].step()
    after = se.distributed.full_state_dict(run["net"])
    moved = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    return {"moved": moved, "skipped": run["opt"].skipped_steps + run["opt"].skipped_updates}


def tie_scores(seed: int) -> list[torch.Tensor]:
    """Whole score tensors with many ties (small integers), one of them with fewer rows than ranks' chunks."""
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float32 if seed % 2 else torch.float64
    return [torch.randint(0, 4, shape, generator=g).to(dtype) for shape in ((9, 5), (1, 7), (6, 3))]


def select_over_ranks(rank: int, world: int) -> dict:
    """This rank's rows of the k-largest masks of :func:`tie_scores`, for several k (no model involved)."""
    from sparse_engine.distributed.select import topk_masks

    out = {}
    for seed in range(6):
        rows = [torch.chunk(t, world)[rank] if rank < len(torch.chunk(t, world)) else t[:0] for t in tie_scores(seed)]
        for k in (0, 1, 17, 40, 80, 200):
            out[seed, k] = topk_masks(rows, k)
    return out


def fsdp_worker(rank: int, world: int, cases: list, ckpt_dir: str) -> dict:
    out = {"cases": {case: run_case(case, rank, world, wrap="fsdp") for case in cases},
           "resumed": resumed(rank, world, "fsdp", ckpt_dir)}
    out["extracted"] = extracted_output(EXTRACT_CASE, out["cases"][EXTRACT_CASE]["state"])
    out["select"] = select_over_ranks(rank, world)
    out["nonfinite"] = {mode: nonfinite_step(rank, world, mode) for mode in ("step", "attach")}
    out["refused"] = {}
    for name, opts in (("signin", {**method_options("signin", "dense"), "dynamic": "rigl"}),
                       ("pilot", {**method_options("pilot", "dense"), "iterative": True, "rewind": "weight"})):
        method = make_method(name, **opts)
        net = model(torch.float64)
        method.prepare(net)
        net = shard(net, world)
        try:
            method.apply(net, method.make_optimizer(net, "sgd", lr=0.1))
            out["refused"][name] = None
        except ValueError as e:
            out["refused"][name] = str(e)
    return out
