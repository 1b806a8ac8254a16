"""The training loop behind ``sparse-engine train`` and the experiments.

    from sparse_engine.app.config import TrainConfig
    from sparse_engine.app.loop import train
    result = train(TrainConfig(model="mlp", method="signin", density=0.1, epochs=5))
    result["final"]["test_acc"]

One run: load the data, build the model (seeded: every method starts from the same dense init), let the
method sparsify it, build the fused optimizer, train with a per-step cosine learning rate, evaluate on
the test set after every epoch, run the method's hooks, and return (and write) a JSON-able result.
With an output directory the run writes ``result.json`` and its checkpoint (checkpoint.py) there.
``train(cfg, resume=path)`` (``sparse-engine train --resume``) continues from a checkpoint: the model is
rebuilt from the seed as in a fresh run, every saved state is loaded over it, and the run goes on after
the saved epoch exactly as if it had not stopped. On several processes (distributed_run.py: DDP, or
FSDP2 with ``cfg.fsdp``) every rank runs this loop on its share of each batch; rank 0 writes the files.

User errors raise ``config.ConfigError`` (bad option, or a checkpoint that cannot be resumed:
``checkpoint.CheckpointError``) or ``data.DataError`` (bad files); a diverging run raises
:class:`TrainingDiverged` after writing what it has; Ctrl-C writes the partial result (status
"interrupted") and keeps the last checkpoint. The CLI turns those into one-line messages.
"""
from __future__ import annotations

import dataclasses
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..nn.diagnostics import layer_stats
from ..methods import Method
from ..optim import NonFiniteGradError, parameterizations
from ..tuning import MARGIN
from . import checkpoint as ck
from . import distributed_run as D
from .progress import Progress
from . import data as data_mod
from .config import TrainConfig, build_model_and_method, default_threads, load_data


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the partial result is in ``.result`` (and on disk if an out dir was set)."""

    def __init__(self, message: str, result: dict | None = None) -> None:
        super().__init__(message)
        self.result = result


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on (x, y), in eval mode."""
    was = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, x.shape[0], batch_size):
        out = model(x[i:i + batch_size])
        yb = y[i:i + batch_size]
        loss_sum += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    model.train(was)
    n = max(int(x.shape[0]), 1)
    return loss_sum / n, correct / n


def _cosine(total: int):
    return lambda k: 0.5 * (1.0 + math.cos(math.pi * min(k, total) / total))


# ----------------------------------------------------------------------------------------- one run


@dataclass
class _Run:
    """What the steps of one run share: the configuration, data, model, optimizer, the result so far and
    the position (epochs done, the rounds: [phase, epochs] each, retrain rounds appended)."""

    cfg: TrainConfig
    ds: data_mod.Dataset
    device: torch.device
    model: nn.Module
    method: Method
    optimizer: Any
    progress: Progress
    steps_per_epoch: int
    fingerprint: str
    ckpt_file: Path | None
    data: tuple[torch.Tensor, ...] = ()  # x_train, y_train, x_test, y_test on the run's device
    result: dict[str, Any] = field(default_factory=dict)
    signs0: dict[str, torch.Tensor] = field(default_factory=dict)
    flips_total: dict[str, int] = field(default_factory=dict)
    rounds: list[list] = field(default_factory=list)
    epoch_no: int = 0  # epochs done, all rounds together
    round_done: int = 0  # epochs done in the current (last) round
    elapsed_before: float = 0.0
    t_start: float = field(default_factory=time.perf_counter)
    sched: Any = None
    forward: nn.Module | None = None  # the DDP wrapper, or the FSDP2 model, of a multi-process run
    writer: bool = True  # this process writes the files (rank 0)

    def position(self, finished: bool = False) -> dict[str, Any]:
        return {"epoch": self.epoch_no, "rounds": [list(r) for r in self.rounds], "round_epochs_done": self.round_done,
                "elapsed_s": self.elapsed_before + time.perf_counter() - self.t_start, "finished": finished}

    def write_checkpoint(self, finished: bool = False) -> None:
        if self.ckpt_file is not None:  # several processes: every rank calls it, rank 0 writes
            D.write_checkpoint(self, finished, self.ckpt_file)


def train(cfg: TrainConfig, dataset: data_mod.Dataset | None = None, *, stream: TextIO | None = None,
          write: bool = True, resume: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run one training job; returns the result dict (also written to ``cfg.out_dir``/result.json).

    With ``write`` and ``cfg.out_dir``, the full training state is written to ``cfg.out_dir``/checkpoint.pt
    at the end of every epoch and of the run (atomically). ``resume``: such a checkpoint (or its run
    directory) to continue from: ``cfg`` must equal the checkpoint's configuration except for the options
    in ``checkpoint.RESUME_MAY_CHANGE`` (a mismatch raises ConfigError naming the option), and the run
    continues after the checkpoint's epoch exactly as if it had not stopped (same parameters, optimizer
    state and logged metrics; bit for bit on CPU with the same number of threads). An epoch that was
    interrupted is run again from its start; a run that had finished is not run again.

    Sets torch's CPU thread count for the run (:func:`config.default_threads`) and restores it afterwards.
    """
    cfg.validate()
    saved = None
    if resume is not None:
        ckpt_path, saved = ck.read_checkpoint(resume)
        ck.check_resume_config(cfg, saved["config"], ckpt_path)
        D.check_world(saved, ckpt_path)
        saved["path"] = str(ckpt_path)
    before = torch.get_num_threads()
    threads = default_threads(cfg)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(cfg, dataset, stream, write, saved)
    finally:
        torch.set_num_threads(before)


def _train(cfg: TrainConfig, dataset: data_mod.Dataset | None, stream: TextIO | None, write: bool,
           saved: dict[str, Any] | None) -> dict[str, Any]:
    ds = dataset if dataset is not None else load_data(cfg)
    fingerprint = ck.data_fingerprint(ds)
    if saved is not None:
        ck.check_resume_data(ds, fingerprint, saved)
        if saved["position"].get("finished"):
            return _finished_before(cfg, saved, stream, write)
    run = _start(cfg, ds, fingerprint, stream, write, saved)
    try:
        _run_rounds(run, saved)
    except (TrainingDiverged, NonFiniteGradError) as e:
        _write_partial(run, run.writer, "diverged", str(e))
        if isinstance(e, TrainingDiverged):
            raise
        raise TrainingDiverged(f"training stopped: {e}", run.result) from None
    except KeyboardInterrupt:
        _write_partial(run, run.writer, "interrupted")  # the checkpoint of the last finished epoch stays for --resume
        raise
    finally:
        run.optimizer.detach()
        run.method.remove()
    _finish(run)
    if write and cfg.out_dir:
        if run.writer:
            ck.write_json(Path(cfg.out_dir) / "result.json", run.result)
        run.write_checkpoint(finished=True)
    return run.result


def _finished_before(cfg: TrainConfig, saved: dict[str, Any], stream: TextIO | None, write: bool) -> dict[str, Any]:
    """Resuming a run that had finished: its result (copied, with its checkpoint, to ``cfg.out_dir``)."""
    result = saved["result"]
    Progress(cfg.progress, stream, prefix=f"[{cfg.method}] ").line(f"finished before: {saved['path']}")
    if write and cfg.out_dir and D.rank() == 0:
        out = Path(cfg.out_dir)
        ck.write_json(out / "result.json", result)
        if not (out / ck.CHECKPOINT_FILE).exists() or not (out / ck.CHECKPOINT_FILE).samefile(saved["path"]):
            shutil.copyfile(saved["path"], out / ck.CHECKPOINT_FILE)
            D.copy_shards(saved, out)
    return result


def _start(cfg: TrainConfig, ds: data_mod.Dataset, fingerprint: str, stream: TextIO | None, write: bool,
           saved: dict[str, Any] | None) -> _Run:
    """The model, method and optimizer of a fresh run, or of a resumed one with every saved state loaded."""
    device = torch.device(cfg.device)
    # A resumed run rebuilds the model exactly as the fresh run did (seeded init, same masks), then
    # overwrites every tensor from the checkpoint.
    first = (ds.x_train[: cfg.batch_size], ds.y_train[: cfg.batch_size])
    model, method, report = build_model_and_method(cfg, ds.input_shape, ds.n_classes, ds.vocab_size, first)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)  # 4-D tensors only (conv weights, the csr convs' markers)
    data = tuple(t.to(device) for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test))
    if cfg.channels_last:  # (the shuffled batches, x[perm[i:j]], and the test slices keep the format)
        data = tuple(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in data)
    if cfg.layout == "auto" and method.sparsify_as is not None:
        if saved is None:
            from ..nn import autolayout

            decisions = autolayout.tune(model, data[0][: cfg.batch_size])  # before the optimizer: may rebuild params
            say = Progress(cfg.progress, stream, prefix=f"[{cfg.method}] ").line
            for name, d in decisions.items():
                times = ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in d.times.items())
                rule = f": {times}; a sparse layout only when more than {MARGIN:.0%} faster than dense" if times else ""
                say(f"layout auto: {name} -> {d.layout} ({d.source}{rule})")
        else:  # the layouts the interrupted run measured, not a new measurement that may choose otherwise
            ck.restore_layouts(model, saved)
    if saved is not None:  # the whole model (gathered under FSDP2), before it is wrapped
        ck.load_part(saved, "model", lambda: model.load_state_dict(saved["model_state"]))
    forward = D.wrap(cfg, model, device)  # FSDP2 shards before the optimizer is built
    optimizer = _make_optimizer(cfg, model, method)
    steps_per_epoch = math.ceil(ds.n_train / cfg.batch_size)
    D.apply_method(cfg, method, model, optimizer, steps_per_epoch)
    if saved is not None:
        D.restore(saved, model, optimizer, method)
    forward = D.ddp(model, forward)  # every rank built the same model from the same seed (checked in wrap)
    if cfg.step_in_backward:
        optimizer.attach(forward)
    run = _Run(cfg, ds, device, model, method, optimizer, Progress(cfg.progress, stream, prefix=f"[{cfg.method}] "),
               steps_per_epoch, fingerprint, Path(cfg.out_dir) / ck.CHECKPOINT_FILE if write and cfg.out_dir else None,
               data, forward=forward, writer=write and D.rank() == 0)
    stats0 = layer_stats(model)  # sets the sign-flip reference (on resume: the signs of the saved θ)
    if saved is None:
        _fresh_result(run, report, stats0)
    else:
        _resumed_result(run, saved)
    run.result["environment"] = {"torch": str(torch.__version__), "threads": torch.get_num_threads(),
                                 "device": str(device), "python": platform.python_version(),
                                 "machine": platform.machine()}
    return run


def _make_optimizer(cfg: TrainConfig, model: nn.Module, method: Method):
    kwargs: dict[str, Any] = {"weight_decay": cfg.weight_decay, "nonfinite": cfg.nonfinite}
    if cfg.optimizer == "sgd":
        kwargs["momentum"] = cfg.momentum
    policy = getattr(method.config, "reset_policy", None)
    if policy is not None:
        kwargs["reset_policy"] = policy
    return method.make_optimizer(model, cfg.optimizer, lr=cfg.lr, **kwargs)


def _fresh_result(run: _Run, report: Any, stats0: list[dict]) -> None:
    ds = run.ds
    run.signs0 = D.signs(run.model)
    run.flips_total = {s["name"]: 0 for s in stats0}
    run.rounds = [["train", run.cfg.epochs]]
    run.result = {
        "config": dataclasses.asdict(run.cfg),
        "method": run.method.describe(),
        "dataset": {"name": ds.name, "n_train": ds.n_train, "n_test": ds.n_test, "source": ds.info.get("source")},
        "environment": {},
        "sparsify": None if report is None else str(report),
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "epochs": [],
        "status": "running",
    }


def _resumed_result(run: _Run, saved: dict[str, Any]) -> None:
    pos = saved["position"]
    rng, signs0 = D.rank_state(saved)
    run.signs0 = {k: v.to(run.device) for k, v in signs0.items()}
    run.flips_total = dict(saved["flips_total"])
    run.result = saved["result"]
    run.rounds = [list(r) for r in pos["rounds"]]
    run.epoch_no, run.round_done = int(pos["epoch"]), int(pos["round_epochs_done"])
    run.elapsed_before = float(pos["elapsed_s"])
    run.result["config"] = dataclasses.asdict(run.cfg)
    run.result["status"] = "running"
    run.result.setdefault("resumed", []).append({"checkpoint": saved["path"], "after_epoch": run.epoch_no})
    ck.set_rng_state(rng, run.device)
    run.progress.line(f"resumed from {saved['path']} after epoch {run.epoch_no}")


def _run_rounds(run: _Run, saved: dict[str, Any] | None) -> None:
    """The training round (from its saved position), then the retraining rounds the method asks for."""
    phase, n = run.rounds[-1]
    _run_epochs(run, n, phase, None if saved is None else saved["scheduler_state"], saved)
    while (retrain := run.method.end_of_training()) is not None:
        run.rounds.append([f"retrain{retrain.round}", retrain.epochs])
        run.round_done = 0
        run.progress.line(f"pruned to density {retrain.density:.4f}; retraining {retrain.epochs} epoch(s)")
        _run_epochs(run, retrain.epochs, f"retrain{retrain.round}")


def _run_epochs(run: _Run, n_epochs: int, phase: str, sched_state: dict | None = None,
                saved: dict[str, Any] | None = None) -> None:
    """The epochs of one round not done yet, each followed by its evaluation, log row and checkpoint."""
    cfg, optimizer = run.cfg, run.optimizer
    total_steps = n_epochs * run.steps_per_epoch
    run.sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _cosine(total_steps) if cfg.lr_schedule == "cosine" else (lambda k: 1.0))
    if sched_state is not None:
        ck.load_part(saved, "scheduler", lambda: run.sched.load_state_dict(sched_state))
        for g, lr in zip(optimizer.param_groups, run.sched.get_last_lr()):  # the constructor's step reset it
            g["lr"].fill_(float(lr))
    for _ in range(run.round_done + 1, n_epochs + 1):
        run.epoch_no += 1
        seen, loss_sum, correct, train_time = _train_epoch(run)
        row = _epoch_row(run, phase, seen, float(loss_sum) / seen, int(correct) / seen, train_time)
        run.result["epochs"].append(row)
        run.round_done += 1
        run.write_checkpoint()
        run.progress.line(f"epoch {run.epoch_no}: loss {row['train_loss']:.4f} train {100 * row['train_acc']:.2f}% "
                          f"test {100 * row['test_acc']:.2f}% ({train_time:.1f}s, {row['samples_per_s']:,.0f} "
                          "samples/s)" + (f" sign flips {row['sign_flips']}" if row["l1"] is not None else ""))


def _train_epoch(run: _Run) -> tuple[int, torch.Tensor, torch.Tensor, float]:
    """One pass over the training data: (samples, loss sum, correct count, seconds)."""
    cfg, model, optimizer = run.cfg, run.forward or run.model, run.optimizer
    model.train()
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    correct = torch.zeros((), dtype=torch.int64, device=run.device)
    seen = 0
    x_train, y_train = run.data[:2]
    for i, (xb, yb) in enumerate(data_mod.batches(x_train, y_train, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                                  epoch=run.epoch_no), start=1):
        if run.forward is None:
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            loss_value = loss.detach().item()  # one sync per step: the NaN check and the progress line need it
            batch_loss = loss.detach() * yb.shape[0]
        else:
            yb, out, loss, loss_value, batch_loss = D.rank_step(model, xb, yb)
        if not math.isfinite(loss_value):
            run.result["status"] = "diverged"
            msg = (f"training diverged: the loss is {loss_value} at epoch {run.epoch_no}, step {i} "
                   f"(lr {float(optimizer.param_groups[0]['lr']):g}); lower --lr or check the data")
            raise TrainingDiverged(msg, run.result)
        if not optimizer.attached:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.sched.step()
        loss_sum += batch_loss
        correct += (out.detach().argmax(1) == yb).sum()
        seen += yb.shape[0]
        dt = time.perf_counter() - t0
        run.progress.update(run.epoch_no, sum(r[1] for r in run.rounds), i, run.steps_per_epoch, loss_value,
                            int(correct) / seen if run.progress.tty else 0.0, seen / max(dt, 1e-9))
    if run.forward is not None:  # the epoch's numbers over all ranks
        total = distributed.sum_over_ranks([seen, float(loss_sum), float(correct)])
        seen, loss_sum, correct = int(total[0]), total[1], total[2].to(torch.int64)
    return seen, loss_sum, correct, time.perf_counter() - t0


def _epoch_row(run: _Run, phase: str, seen: int, train_loss: float, train_acc: float, train_time: float) -> dict:
    """The method's end-of-epoch hook, the test evaluation and the log row of the epoch."""
    method_log = run.method.after_epoch(run.epoch_no, train_acc)
    test_loss, test_acc = evaluate(run.model, *run.data[2:])
    stats = layer_stats(run.model)
    for s in stats:
        run.flips_total[s["name"]] = run.flips_total.get(s["name"], 0) + s["sign_flips"]
    beta = [s["beta_mean"] for s in stats if s["beta_mean"] is not None]
    return {
        "epoch": run.epoch_no, "phase": phase, "train_loss": train_loss, "train_acc": train_acc,
        "test_loss": test_loss, "test_acc": test_acc, "time_s": train_time,
        "samples_per_s": seen / train_time, "lr_end": float(run.optimizer.param_groups[0]["lr"]),
        "sign_flips": sum(s["sign_flips"] for s in stats),
        "beta_mean": sum(beta) / len(beta) if beta else None,
        "l1": sum(s["l1"] for s in stats) if stats else None,
        "skipped_steps": run.optimizer.skipped_steps,
        **{k: v for k, v in method_log.items() if isinstance(v, (int, float, bool, str)) or v is None},
    }


def _write_partial(run: _Run, write: bool, status: str, error: str | None = None) -> None:
    run.result["status"] = status
    if error is not None:
        run.result["error"] = error
    if write and run.cfg.out_dir:
        ck.write_json(Path(run.cfg.out_dir) / "result.json", run.result)


def _finish(run: _Run) -> None:
    """The final evaluation and the summary entries of the result."""
    model, optimizer, result = run.model, run.optimizer, run.result
    test_loss, test_acc = evaluate(model, *run.data[2:])
    stats = layer_stats(model)
    changed, active = D.sign_counts(model, run.signs0)
    layers = D.weight_layers(model, stats)
    for row in layers:
        row["sign_flips"] = run.flips_total.get(row["name"], 0)
    nnz, numel = sum(r["nnz"] for r in layers), sum(r["numel"] for r in layers)
    result.update({
        "status": "done",
        "final": {"test_acc": test_acc, "test_loss": test_loss,
                  "best_test_acc": max(r["test_acc"] for r in result["epochs"]),
                  "train_acc": result["epochs"][-1]["train_acc"]},
        "density": nnz / numel if numel else 1.0,
        "layers": layers,
        "sign_flips": sum(run.flips_total.values()),
        "signs_changed_vs_init": changed,
        "active_weights": active,
        "time_per_epoch_s": [r["time_s"] for r in result["epochs"]],
        "total_time_s": run.elapsed_before + time.perf_counter() - run.t_start,
        "skipped_steps": optimizer.skipped_steps,
        "skipped_updates": optimizer.skipped_updates,
        "resets": optimizer.num_resets,
        "method_log": {k: v for k, v in run.method.log.items() if k != "layer_density"},
    })
    if run.ckpt_file is not None:
        result["checkpoint"] = str(run.ckpt_file)
