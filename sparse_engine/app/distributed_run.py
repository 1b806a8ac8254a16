"""What a ``sparse-engine train`` run does differently on several processes (``--nproc N``, torchrun).

* wrapping: DistributedDataParallel (replicas), or with ``--fsdp`` FSDP2's ``fully_shard`` (each layer
  with parameters, then the root: each rank holds a shard of every parameter);
* each step: this rank's share of the global batch (:func:`rank_step`);
* statistics: signs of θ on the local shards, counts summed over the ranks;
* the checkpoint: rank 0 writes ``checkpoint.pt`` with the whole model (gathered once under FSDP2, so
  that ``sparse-engine export`` reads it as any other) and every rank's random generators; under FSDP2
  the optimizer and method state, sharded, go to a ``torch.distributed.checkpoint`` folder next to it
  (``checkpoint.shards/<epoch>``, named by ``checkpoint.pt``, which is renamed into place after the
  folder is complete). A resume needs as many processes as the run had.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..nn.diagnostics import layer_type
from ..optim import parameterizations
from . import checkpoint as ck
from .config import ConfigError

#: the folder, next to checkpoint.pt, of the sharded (FSDP2) optimizer and method state
SHARDS_DIR = "checkpoint.shards"


def rank() -> int:
    return torch.distributed.get_rank() if distributed.world_size() > 1 else 0


def shard(model: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2 in place: every sparse layer (with its parameterization) and every other module holding
    parameters of its own, innermost first, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..param import sparse_layers

    mesh = init_device_mesh(device.type, (distributed.world_size(),))
    layers = {id(m): m for _, m in sparse_layers(model)}
    inside = {id(sub) for layer in layers.values() for sub in layer.modules()}
    for module in reversed(list(model.modules())):  # reversed pre-order: children before their parents
        if module is model:
            continue
        own = any(True for _ in module.parameters(recurse=False)) and id(module) not in inside
        if own or id(module) in layers:
            fully_shard(module, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def wrap(cfg, model: nn.Module, device: torch.device) -> nn.Module | None:
    """Before the optimizer is built: the model that runs the steps of a multi-process run (None in one
    process). Checks first that every rank built the same masks."""
    if distributed.world_size() == 1:
        if cfg.fsdp:
            raise ConfigError("fsdp: shards the model over several processes: add --nproc N (N >= 2) or run "
                              "under torchrun")
        return None
    distributed.check_masks(model)
    if cfg.fsdp:
        return shard(model, device)
    return None  # DDP wraps after the optimizer and the method are set up (ddp())


def apply_method(cfg, method, model: nn.Module, optimizer, steps_per_epoch: int) -> None:
    """``method.apply``; under FSDP2 a method (or an option of it) that refuses sharded parameters is a
    user error, one line (e.g. PILoT's weight rewinding)."""
    try:
        method.apply(model, optimizer, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch)
    except ValueError as e:
        if not (cfg.fsdp and distributed.world_size() > 1):
            raise
        raise ConfigError(f"fsdp: {str(e).removeprefix('model: ')}") from None


def ddp(model: nn.Module, forward: nn.Module | None) -> nn.Module | None:
    if distributed.world_size() > 1 and forward is None:
        return nn.parallel.DistributedDataParallel(model)
    return forward


def rank_step(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> tuple:
    """This rank's share (contiguous rows) of a global batch and the loss scaled so that the average over
    the ranks (DDP's all-reduce, FSDP2's reduce-scatter) is the global batch's mean loss (shares may differ
    by one row); returns (y share, output, loss, the global mean loss as a float (one collective per step),
    this share's loss sum)."""
    world, r = distributed.world_size(), rank()
    bounds = [len(yb) * i // world for i in range(world + 1)]
    xs, ys = xb[bounds[r]:bounds[r + 1]], yb[bounds[r]:bounds[r + 1]]
    out = model(xs)
    loss_sum = F.cross_entropy(out, ys, reduction="sum")
    loss_value = float(distributed.sum_over_ranks([loss_sum.detach().item()])[0]) / len(yb)
    return ys, out, loss_sum * (world / len(yb)), loss_value, loss_sum.detach().double()


# ------------------------------------------------------------------------------------------- signs


@torch.no_grad()
def signs(model: nn.Module) -> dict[str, torch.Tensor]:
    """The sign of θ per sparse layer (int8, storage form); under FSDP2 of this rank's shard."""
    return {name: torch.sign(pz.local_values().detach()).to(torch.int8) for name, pz in parameterizations(model)}


def sign_counts(model: nn.Module, signs0: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(signs of θ changed since ``signs0``, nonzero signs now); under FSDP2 summed over the shards."""
    signs1 = signs(model)
    changed = sum(int((signs0[n] * signs1[n] < 0).sum()) for n in signs0 if n in signs1)
    active = sum(int((signs1[n] != 0).sum()) for n in signs1)
    if any(distributed.is_sharded(pz.w) for _, pz in parameterizations(model)):
        changed, active = (int(v) for v in distributed.sum_over_ranks([changed, active]))
    return changed, active


def weight_layers(model: nn.Module, stats: list[dict]) -> list[dict]:
    """Density per weight layer: the sparse layers' stats, plus the dense Linear / Conv layers."""
    sparse = {s["name"]: s for s in stats}
    rows = []
    for name, mod in model.named_modules():
        if name in sparse:
            s = sparse[name]
            rows.append({"name": name, "type": s["type"], "kind": s["kind"], "shape": list(s["shape"]),
                         "numel": s["numel"], "nnz": s["nnz"], "density": s["density"]})
        elif isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            n = mod.weight.numel()  # a DTensor's numel is the whole tensor's
            rows.append({"name": name, "type": layer_type(mod), "kind": "dense", "shape": list(mod.weight.shape),
                         "numel": n, "nnz": n, "density": 1.0})
    return rows


# -------------------------------------------------------------------------------------- checkpoint


def write_checkpoint(run, finished: bool, path: Path) -> None:
    """Write ``path`` (checkpoint.pt) from rank 0; a collective in a multi-process run (every rank calls
    it: the random generators are gathered, and under FSDP2 the model and the sharded state)."""
    sharded = run.cfg.fsdp and distributed.world_size() > 1
    parts: dict[str, Any] = {}
    if distributed.world_size() > 1:
        # the signs differ per rank only where each holds its own shard
        mine = {"rng": ck.rng_state(run.device), "signs0": {k: v.cpu() for k, v in run.signs0.items()} if sharded else {}}
        ranks: list[Any] = [None] * distributed.world_size()
        torch.distributed.all_gather_object(ranks, mine)
        parts = {"world_size": distributed.world_size(), "ranks": ranks}
    if sharded:
        folder = f"{SHARDS_DIR}/epoch{run.epoch_no}{'-end' if finished else ''}"
        distributed.save(path.parent / folder, run.model, run.optimizer, run.method)
        parts.update(shards=folder, model_state=distributed.full_state_dict(run.model), optimizer_state=None,
                     method_state=None, signs0={})
    if rank() != 0:
        return
    ck.save_atomic(ck.training_state(run.cfg, run.ds, run.fingerprint, run.position(finished), run.model,
                                     run.optimizer, run.sched, run.method, run.signs0, run.flips_total,
                                     run.result, run.device, parts), path)
    if sharded:  # the folders of earlier epochs (checkpoint.pt no longer names them)
        for old in (path.parent / SHARDS_DIR).iterdir():
            if old.name != Path(parts["shards"]).name:
                shutil.rmtree(old, ignore_errors=True)


def check_world(saved: dict[str, Any], where: Any, have: int | None = None) -> None:
    """A checkpoint resumes on as many processes (``have``: this job's) as wrote it (each rank continues
    its own share of every batch, its own shards and random streams)."""
    had, have = int(saved.get("world_size", 1)), have or distributed.world_size()
    if had != have:
        how = f"--nproc {had}" if had > 1 else "one process (no --nproc, not under torchrun)"
        raise ck.CheckpointError(f"cannot resume {where}: the run was written by {had} process(es), this one has "
                                 f"{have}; resume with {how}")


def restore(saved: dict[str, Any], model: nn.Module, optimizer, method) -> None:
    """Load the optimizer's and method's state: from checkpoint.pt, or its sharded folder (FSDP2)."""
    if not saved.get("shards"):
        ck.restore_training(saved, optimizer, method)
        return
    folder = Path(saved["path"]).parent / saved["shards"]
    if not (folder / ".metadata").is_file():
        raise ck.CheckpointError(f"{saved['path']}: its sharded state {folder} is missing or incomplete")
    ck.load_part(saved, "optimizer", lambda: distributed.load(folder, model, optimizer, method))
    ck.load_part(saved, "method", lambda: ck.set_method_logs(method, saved["method_logs"]))


def rank_state(saved: dict[str, Any]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(random generators, signs at the start) of this rank in a checkpoint."""
    if "ranks" not in saved:
        return saved["rng"], saved["signs0"]
    mine = saved["ranks"][rank()]
    return mine["rng"], mine["signs0"] if saved.get("shards") else saved["signs0"]


def copy_shards(saved: dict[str, Any], out: Path) -> None:
    """Copying a finished run's checkpoint.pt elsewhere: its sharded folder goes with it."""
    if saved.get("shards"):
        shutil.copytree(Path(saved["path"]).parent / saved["shards"], out / saved["shards"], dirs_exist_ok=True)
