"""The training loop behind ``sparse-engine train`` and the experiments.

    from sparse_engine.app.train import TrainConfig, train
    result = train(TrainConfig(model="mlp", method="signin", density=0.1, epochs=5))
    result["final"]["test_acc"]

One run: load the data, build the model (seeded: every method starts from the same dense init), let the
method sparsify it, build the fused optimizer, train with a per-step cosine learning rate, evaluate on
the test set after every epoch, run the method's hooks, and return (and write) a JSON-able result.
:func:`compare` runs several methods on the same seed and data and prints them side by side.

Checkpoints: with an output directory, the end of every epoch writes ``checkpoint.pt`` there (atomically:
a temporary file renamed over the old one): model (m, w, masks, β), optimizer (buffers, step counts, lr),
the lr schedule's position, the method's state (Sign-In reset schedule, PILoT α controller, prune rounds
and snapshot, weight-decay switch-off and its dose), the random generators, and the result so far.
Its contents load with ``torch.load(weights_only=True)`` and carry a SHA-256 of themselves.
``train(cfg, resume=path)`` (``sparse-engine train --resume``) continues from it: the model is rebuilt
from the seed as in a fresh run, every saved state is loaded over it, and the run goes on after the saved
epoch exactly as if it had not stopped. ``compare(..., resume=True)`` does the same for a comparison.

User errors raise :class:`ConfigError` (bad option, or a checkpoint that cannot be resumed:
:class:`CheckpointError`) or ``data.DataError`` (bad files); a diverging run raises
:class:`TrainingDiverged` after writing what it has; Ctrl-C writes the partial result (status
"interrupted") and keeps the last checkpoint. The CLI turns those into one-line messages.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pickle
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import nn

from . import data as data_mod
from ..methods import METHODS, make_method
from .models import MODELS, build_model
from ..optim import NONFINITE_POLICIES, NonFiniteGradError, parameterizations
from ..param import sparse_layers

DATASETS = ("auto", "fashion-mnist", "teacher", "sequences")
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "constant")


class ConfigError(ValueError):
    """A training option is invalid (the message names it)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the partial result is in ``.result`` (and on disk if an out dir was set)."""

    def __init__(self, message: str, result: dict | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class TrainConfig:
    """Everything a run needs. ``None`` for a method option means: the method's own default.

    Method options apply only to the methods that have them (so one config can drive ``compare``):
    Sign-In: beta, reset_every, reset_unit, reset_until, reset_policy, factor_lr_scale;
    PILoT: beta, alpha, alpha_schedule, prune_scope, iterative, rewind, retrain_epochs, factor_lr_scale.
    """

    model: str = "mlp"
    method: str = "signin"
    density: float = 0.1
    distribution: str = "erk"
    layout: str = "dense"
    data: str = "auto"
    data_dir: str | None = None
    n_train: int | None = None
    n_test: int | None = None
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    step_in_backward: bool = False
    nonfinite: str = "skip"
    wd_switchoff: float | None = None
    # method options (None: method default)
    beta: float | None = None
    factor_lr_scale: float | None = None
    reset_every: int | None = None
    reset_unit: str | None = None
    reset_until: float | None = None
    reset_policy: str | None = None
    alpha: float | None = None
    alpha_schedule: str | None = None
    prune_scope: str | None = None
    iterative: bool | None = None
    rewind: str | None = None
    retrain_epochs: int | None = None
    # output
    progress: bool = True
    out_dir: str | None = None

    def validate(self) -> TrainConfig:
        def choice(name, choices):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {tuple(choices)}, got {getattr(self, name)!r}")

        def positive_int(name, allow_none=False):
            v = getattr(self, name)
            if allow_none and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")

        def number(name, low=0.0, low_open=False, high=None, allow_none=False):
            v = getattr(self, name)
            if allow_none and v is None:
                return
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            ok = ok and (v > low if low_open else v >= low) and (high is None or v <= high)
            if not ok:
                rng = f"{'>' if low_open else '>='} {low}" + ("" if high is None else f" and <= {high}")
                raise ConfigError(f"{name} must be a finite number {rng}, got {v!r}")

        choice("model", MODELS)
        choice("method", METHODS)
        choice("data", DATASETS)
        choice("optimizer", OPTIMIZERS)
        choice("lr_schedule", LR_SCHEDULES)
        choice("nonfinite", NONFINITE_POLICIES)
        d = self.density
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < d <= 1.0:
            raise ConfigError(f"density must be in (0, 1], got {d!r}")
        for name in ("epochs", "batch_size"):
            positive_int(name)
        for name in ("n_train", "n_test", "threads", "reset_every", "retrain_epochs"):
            positive_int(name, allow_none=True)
        number("lr", low_open=True)
        number("momentum", high=1.0)
        number("weight_decay")
        number("wd_switchoff", high=1.0, allow_none=True)
        number("beta", low_open=True, allow_none=True)
        number("factor_lr_scale", low_open=True, allow_none=True)
        number("alpha", allow_none=True)
        number("reset_until", high=1.0, allow_none=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an int, got {self.seed!r}")
        if self.data == "sequences" and self.model != "transformer":
            raise ConfigError(f"data='sequences' (token ids) needs model='transformer', got model={self.model!r}")
        if self.data in ("fashion-mnist", "teacher") and self.model == "transformer":
            raise ConfigError(f"model='transformer' reads token sequences (data='sequences'), got data={self.data!r}")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"device must be a torch device such as 'cpu' or 'cuda', got {self.device!r} ({e})")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={self.device!r} requested but no CUDA GPU is visible to torch")
        return self

    def method_options(self) -> dict[str, Any]:
        """The options for ``make_method(self.method, ...)`` that this method's config has."""
        fields = {f.name for f in dataclasses.fields(METHODS[self.method].config_class)}
        opts: dict[str, Any] = {"density": self.density, "distribution": self.distribution, "layout": self.layout,
                                "seed": self.seed}
        if self.method in ("dense", "wd_switchoff"):
            opts["density"] = 1.0
        if self.method == "wd_switchoff" and self.wd_switchoff is not None:
            opts["at"] = self.wd_switchoff
        for name in ("beta", "factor_lr_scale", "reset_every", "reset_unit", "reset_until", "reset_policy", "alpha",
                     "alpha_schedule", "prune_scope", "iterative", "rewind", "retrain_epochs"):
            value = getattr(self, name)
            if value is not None and name in fields:
                opts[name] = value
        return {k: v for k, v in opts.items() if k in fields}


# ---------------------------------------------------------------------------------------------- data


def load_data(cfg: TrainConfig) -> data_mod.Dataset:
    """The dataset of ``cfg`` (``data="auto"``: Fashion-MNIST, or token sequences for the transformer)."""
    kind = cfg.data if cfg.data != "auto" else ("sequences" if cfg.model == "transformer" else "fashion-mnist")
    if kind == "fashion-mnist":
        ds = data_mod.load_fashion_mnist(cfg.data_dir, flatten=cfg.model != "cnn")
    elif kind == "teacher":
        ds = data_mod.synthetic_teacher(cfg.n_train or 8192, cfg.n_test or 2048, seed=cfg.seed)
    else:
        ds = data_mod.synthetic_sequences(cfg.n_train or 8192, cfg.n_test or 2048, seed=cfg.seed)
    if cfg.n_train is not None and cfg.n_train < ds.n_train:
        ds.x_train, ds.y_train = ds.x_train[: cfg.n_train], ds.y_train[: cfg.n_train]
    if cfg.n_test is not None and cfg.n_test < ds.n_test:
        ds.x_test, ds.y_test = ds.x_test[: cfg.n_test], ds.y_test[: cfg.n_test]
    return ds


# ------------------------------------------------------------------------------------------ progress


class Progress:
    """A plain progress line on stderr: in place on a terminal, one line per epoch otherwise."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None, prefix: str = "") -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.prefix = prefix
        self._last = 0.0

    def update(self, epoch: int, epochs: int, i: int, n: int, loss: float, acc: float, rate: float) -> None:
        if not self.tty:
            return
        now = time.perf_counter()
        if now - self._last < 0.1 and i < n:
            return
        self._last = now
        width = 20
        fill = int(width * i / max(n, 1))
        bar = "#" * fill + "." * (width - fill)
        self.stream.write(f"\r{self.prefix}epoch {epoch}/{epochs} [{bar}] {i}/{n} loss {loss:.4f} "
                          f"acc {100 * acc:.2f}% {rate:,.0f} samples/s ")
        self.stream.flush()

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(self.prefix + text + "\n")
        self.stream.flush()


# ------------------------------------------------------------------------------------------ the loop


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


def _sparse_stats(model: nn.Module) -> list[dict]:
    from ..diagnostics import layer_stats

    return layer_stats(model)


def _weight_layers(model: nn.Module, stats: list[dict]) -> list[dict]:
    """Density per weight layer: the sparse layers' stats, plus the dense Linear / Conv layers."""
    sparse = {s["name"]: s for s in stats}
    rows = []
    for name, mod in model.named_modules():
        if name in sparse:
            s = sparse[name]
            rows.append({"name": name, "type": s["type"], "kind": s["kind"], "shape": list(s["shape"]),
                         "numel": s["numel"], "nnz": s["nnz"], "density": s["density"]})
        elif isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            n = mod.weight.numel()
            rows.append({"name": name, "type": type(mod).__name__, "kind": "dense", "shape": list(mod.weight.shape),
                         "numel": n, "nnz": n, "density": 1.0})
    return rows


def _signs(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: torch.sign(pz.values().detach()).to(torch.int8) for name, pz in parameterizations(model)}


def default_threads(cfg: TrainConfig) -> int | None:
    """CPU threads for a run when ``cfg.threads`` is None: 1 for the MLP, torch's default otherwise.

    The MLP's matmuls are too small for intra-op parallelism to pay, and OpenMP threads that spin-wait
    collapse as soon as another process wants the CPU: on the 2-core development machine under load, an
    epoch of static + signin took 38-42 s with 2 threads and 13-14 s with 1 (`--threads` to override).
    """
    if cfg.threads is not None:
        return cfg.threads
    return 1 if cfg.model == "mlp" and torch.device(cfg.device).type == "cpu" else None


def train(cfg: TrainConfig, dataset: data_mod.Dataset | None = None, *, stream: TextIO | None = None,
          write: bool = True, resume: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run one training job; returns the result dict (also written to ``cfg.out_dir``/result.json).

    With ``write`` and ``cfg.out_dir``, the full training state is written to ``cfg.out_dir``/checkpoint.pt
    at the end of every epoch (atomically). ``resume``: such a checkpoint (or its run directory) to
    continue from: ``cfg`` must equal the checkpoint's configuration except for the options in
    :data:`RESUME_MAY_CHANGE` (a mismatch raises :class:`ConfigError` naming the option), and the run
    continues after the checkpoint's epoch exactly as if it had not stopped (same parameters, optimizer
    state and logged metrics; bit for bit on CPU with the same number of threads). An epoch that was
    interrupted is run again from its start.

    Sets torch's CPU thread count for the run (:func:`default_threads`) and restores it afterwards.
    """
    cfg.validate()
    ckpt = None
    if resume is not None:
        ckpt_path, ckpt = read_checkpoint(resume)
        check_resume_config(cfg, ckpt["config"], ckpt_path)
        ckpt["path"] = str(ckpt_path)
    before = torch.get_num_threads()
    threads = default_threads(cfg)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(cfg, dataset, stream, write, ckpt)
    finally:
        torch.set_num_threads(before)


def _method_of(cfg: TrainConfig):
    """The method ``cfg`` asks for; its options are checked here (ConfigError: they come from the user)."""
    try:
        wd_off = None if cfg.method == "wd_switchoff" else cfg.wd_switchoff  # for that method it is its `at`
        return make_method(cfg.method, wd_switchoff=wd_off, **cfg.method_options())
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _train(cfg: TrainConfig, dataset: data_mod.Dataset | None, stream: TextIO | None, write: bool,
           ckpt: dict[str, Any] | None = None) -> dict[str, Any]:
    device = torch.device(cfg.device)
    ds = dataset if dataset is not None else load_data(cfg)
    fingerprint = _data_fingerprint(ds)
    if ckpt is not None:
        _check_resume_data(ds, fingerprint, ckpt)
    progress = Progress(cfg.progress, stream, prefix=f"[{cfg.method}] ")
    method = _method_of(cfg)

    # A resumed run rebuilds the model exactly as the fresh run did (seeded init, same masks), then
    # overwrites every tensor from the checkpoint.
    torch.manual_seed(cfg.seed)  # same dense init for every method
    model = build_model(cfg.model, ds.input_shape, ds.n_classes, ds.vocab_size)
    report = method.prepare(model)
    model.to(device)
    x_train, y_train = ds.x_train.to(device), ds.y_train.to(device)
    x_test, y_test = ds.x_test.to(device), ds.y_test.to(device)
    if cfg.layout == "auto" and method.sparsify_as is not None:
        if ckpt is None:
            from ..nn import autolayout

            autolayout.tune(model, x_train[: cfg.batch_size])  # before the optimizer: layouts may rebuild params
        else:  # the layouts the interrupted run measured, not a new measurement that may choose otherwise
            _restore_layouts(model, ckpt)
    if ckpt is not None:
        _load_part(ckpt, "model", lambda: model.load_state_dict(ckpt["model_state"]))

    opt_kwargs: dict[str, Any] = {"weight_decay": cfg.weight_decay, "nonfinite": cfg.nonfinite}
    if cfg.optimizer == "sgd":
        opt_kwargs["momentum"] = cfg.momentum
    policy = getattr(method.config, "reset_policy", None)
    if policy is not None:
        opt_kwargs["reset_policy"] = policy
    optimizer = method.make_optimizer(model, cfg.optimizer, lr=cfg.lr, **opt_kwargs)
    steps_per_epoch = math.ceil(ds.n_train / cfg.batch_size)
    method.apply(model, optimizer, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch)
    if ckpt is not None:
        # after apply: its setup() sets α, snapshots and schedules that the saved state replaces
        _load_part(ckpt, "optimizer", lambda: optimizer.load_state_dict(ckpt["optimizer_state"]))
        _load_part(ckpt, "method", lambda: method.load_state_dict(ckpt["method_state"]))
        _load_part(ckpt, "method", lambda: _set_method_logs(method, ckpt["method_logs"]))
    if cfg.step_in_backward:
        optimizer.attach()

    stats0 = _sparse_stats(model)  # sets the sign-flip reference (on resume: the signs of the saved θ)
    rounds: list[list] = [["train", cfg.epochs]]  # [phase, epochs] per round; retrain rounds are appended
    epoch_no = 0  # epochs done, all rounds together
    round_done = 0  # epochs done in the current (last) round
    elapsed_before = 0.0
    if ckpt is None:
        signs0 = _signs(model)
        flips_total = {s["name"]: 0 for s in stats0}
        result: dict[str, Any] = {
            "config": {k: v for k, v in dataclasses.asdict(cfg).items()},
            "method": method.describe(),
            "dataset": {"name": ds.name, "n_train": ds.n_train, "n_test": ds.n_test, "source": ds.info.get("source")},
            "environment": {},
            "sparsify": None if report is None else str(report),
            "parameters": sum(p.numel() for p in model.parameters()),
            "epochs": [],
            "status": "running",
        }
    else:
        pos = ckpt["position"]
        signs0 = {k: v.to(device) for k, v in ckpt["signs0"].items()}
        flips_total = dict(ckpt["flips_total"])
        result = ckpt["result"]
        rounds = [list(r) for r in pos["rounds"]]
        epoch_no, round_done, elapsed_before = int(pos["epoch"]), int(pos["round_epochs_done"]), float(pos["elapsed_s"])
        result["config"] = dataclasses.asdict(cfg)
        result["status"] = "running"
        result.setdefault("resumed", []).append({"checkpoint": ckpt["path"], "after_epoch": epoch_no})
        _set_rng_state(ckpt["rng"], device)
        progress.line(f"resumed from {ckpt['path']} after epoch {epoch_no}")
    result["environment"] = {"torch": str(torch.__version__), "threads": torch.get_num_threads(), "device": str(device),
                             "python": platform.python_version(), "machine": platform.machine()}
    t_start = time.perf_counter()
    ckpt_file = Path(cfg.out_dir) / CHECKPOINT_FILE if write and cfg.out_dir else None

    def checkpoint(sched: torch.optim.lr_scheduler.LRScheduler) -> None:
        state = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "library_version": _library_version(),
            "torch_version": str(torch.__version__),
            # the dataset facts let `sparse-engine export` rebuild the model from this file too
            "config": {**dataclasses.asdict(cfg), "input_shape": list(ds.input_shape), "n_classes": ds.n_classes,
                       "vocab_size": ds.vocab_size},
            "dataset": {"name": ds.name, "n_train": ds.n_train, "n_test": ds.n_test, "fingerprint": fingerprint},
            "position": {"epoch": epoch_no, "rounds": [list(r) for r in rounds], "round_epochs_done": round_done,
                         "elapsed_s": elapsed_before + time.perf_counter() - t_start},
            "model_state": model.state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "scheduler_state": sched.state_dict(),
            "method_state": method.state_dict(),
            "method_logs": _plain(_method_logs(method)),
            "layouts": _layouts(model),
            "rng": _rng_state(device),
            "signs0": {k: v.cpu() for k, v in signs0.items()},
            "flips_total": dict(flips_total),
            "result": _plain(result),
        }
        state["sha256"] = _digest(state)
        _save_atomic(state, ckpt_file)

    def run_epochs(n_epochs: int, phase: str, sched_state: dict | None = None) -> None:
        nonlocal epoch_no, round_done
        total_steps = n_epochs * steps_per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _cosine(total_steps) if cfg.lr_schedule == "cosine" else (lambda k: 1.0))
        if sched_state is not None:
            _load_part(ckpt, "scheduler", lambda: sched.load_state_dict(sched_state))
            for g, lr in zip(optimizer.param_groups, sched.get_last_lr()):  # the constructor's step reset it
                g["lr"].fill_(float(lr))
        for _ in range(round_done + 1, n_epochs + 1):
            epoch_no += 1
            model.train()
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen = 0
            for i, (xb, yb) in enumerate(data_mod.batches(x_train, y_train, cfg.batch_size, shuffle=True,
                                                          seed=cfg.seed, epoch=epoch_no), start=1):
                out = model(xb)
                loss = F.cross_entropy(out, yb)
                loss_value = loss.detach().item()  # one sync per step: the NaN check and the progress line need it
                if not math.isfinite(loss_value):
                    result["status"] = "diverged"
                    msg = (f"training diverged: the loss is {loss_value} at epoch {epoch_no}, step {i} "
                           f"(lr {float(optimizer.param_groups[0]['lr']):g}); lower --lr or check the data")
                    raise TrainingDiverged(msg, result)
                if not optimizer.attached:
                    optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                sched.step()
                loss_sum += loss.detach() * yb.shape[0]
                correct += (out.detach().argmax(1) == yb).sum()
                seen += yb.shape[0]
                dt = time.perf_counter() - t0
                progress.update(epoch_no, sum(r[1] for r in rounds), i, steps_per_epoch, loss_value,
                                int(correct) / seen if progress.tty else 0.0, seen / max(dt, 1e-9))
            train_time = time.perf_counter() - t0
            train_loss, train_acc = float(loss_sum) / seen, int(correct) / seen
            method_log = method.after_epoch(epoch_no, train_acc)
            test_loss, test_acc = evaluate(model, x_test, y_test)
            stats = _sparse_stats(model)
            for s in stats:
                flips_total[s["name"]] = flips_total.get(s["name"], 0) + s["sign_flips"]
            beta = [s["beta_mean"] for s in stats if s["beta_mean"] is not None]
            row = {
                "epoch": epoch_no, "phase": phase, "train_loss": train_loss, "train_acc": train_acc,
                "test_loss": test_loss, "test_acc": test_acc, "time_s": train_time,
                "samples_per_s": seen / train_time, "lr_end": float(optimizer.param_groups[0]["lr"]),
                "sign_flips": sum(s["sign_flips"] for s in stats),
                "beta_mean": sum(beta) / len(beta) if beta else None,
                "l1": sum(s["l1"] for s in stats) if stats else None,
                "skipped_steps": optimizer.skipped_steps,
                **{k: v for k, v in method_log.items() if isinstance(v, (int, float, bool, str)) or v is None},
            }
            result["epochs"].append(row)
            round_done += 1
            if ckpt_file is not None:
                checkpoint(sched)
            progress.line(f"epoch {epoch_no}: loss {train_loss:.4f} train {100 * train_acc:.2f}% "
                          f"test {100 * test_acc:.2f}% ({train_time:.1f}s, {row['samples_per_s']:,.0f} samples/s)"
                          + (f" sign flips {row['sign_flips']}" if stats else ""))

    def write_partial(status: str, error: str | None = None) -> None:
        result["status"] = status
        if error is not None:
            result["error"] = error
        if write and cfg.out_dir:
            _write_json(Path(cfg.out_dir) / "result.json", result)

    try:
        phase, n = rounds[-1]
        run_epochs(n, phase, None if ckpt is None else ckpt["scheduler_state"])
        while (retrain := method.end_of_training()) is not None:
            rounds.append([f"retrain{retrain.round}", retrain.epochs])
            round_done = 0
            progress.line(f"pruned to density {retrain.density:.4f}; retraining {retrain.epochs} epoch(s)")
            run_epochs(retrain.epochs, f"retrain{retrain.round}")
    except (TrainingDiverged, NonFiniteGradError) as e:
        write_partial("diverged", str(e))
        if isinstance(e, TrainingDiverged):
            raise
        raise TrainingDiverged(f"training stopped: {e}", result) from None
    except KeyboardInterrupt:
        write_partial("interrupted")  # the checkpoint of the last finished epoch stays for --resume
        raise
    finally:
        optimizer.detach()
        method.remove()

    test_loss, test_acc = evaluate(model, x_test, y_test)
    stats = _sparse_stats(model)
    signs1 = _signs(model)
    changed = sum(int((signs0[n] * signs1[n] < 0).sum()) for n in signs0 if n in signs1)
    active = sum(int((signs1[n] != 0).sum()) for n in signs1)
    layers = _weight_layers(model, stats)
    for row in layers:
        row["sign_flips"] = flips_total.get(row["name"], 0)
    nnz, numel = sum(r["nnz"] for r in layers), sum(r["numel"] for r in layers)
    result.update({
        "status": "done",
        "final": {"test_acc": test_acc, "test_loss": test_loss,
                  "best_test_acc": max(r["test_acc"] for r in result["epochs"]),
                  "train_acc": result["epochs"][-1]["train_acc"]},
        "density": nnz / numel if numel else 1.0,
        "layers": layers,
        "sign_flips": sum(flips_total.values()),
        "signs_changed_vs_init": changed,
        "active_weights": active,
        "time_per_epoch_s": [r["time_s"] for r in result["epochs"]],
        "total_time_s": elapsed_before + time.perf_counter() - t_start,
        "skipped_steps": optimizer.skipped_steps,
        "skipped_updates": optimizer.skipped_updates,
        "resets": optimizer.num_resets,
        "method_log": {k: v for k, v in method.log.items() if k != "layer_density"},
    })
    if write and cfg.out_dir:
        result["checkpoint"] = str(Path(cfg.out_dir) / "model.pt")
        _write_json(Path(cfg.out_dir) / "result.json", result)
        save_model(model, Path(cfg.out_dir) / "model.pt", cfg, ds)
    return result


# -------------------------------------------------------------------------------- checkpoints, resume

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "sparse_engine.train_checkpoint"
CHECKPOINT_VERSION = 1
#: TrainConfig fields a resumed run may change: they do not change what is computed (the checkpoint's
#: config fixes everything else; step-in-backward computes the same updates, see its test)
RESUME_MAY_CHANGE = ("progress", "out_dir", "threads", "data_dir", "step_in_backward")
_CHECKPOINT_KEYS = ("config", "dataset", "position", "model_state", "optimizer_state", "scheduler_state",
                    "method_state", "method_logs", "rng", "signs0", "flips_total", "result")


class CheckpointError(ConfigError):
    """A file given to resume from is not a usable training checkpoint (the message says why)."""


def _library_version() -> str:
    from .. import __version__

    return __version__


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint file of ``path``: the file itself, or ``<run dir>/checkpoint.pt``."""
    p = Path(path)
    if p.is_dir():
        f = p / CHECKPOINT_FILE
        if f.is_file():
            return f
        if (p / COMPARE_PLAN).is_file():
            raise CheckpointError(f"{p} is a --compare run directory: resume the whole comparison "
                                  f"(`sparse-engine train --resume {p}`, or compare(..., resume=True)), or one "
                                  f"method's run directory, {p}/<method>")
        raise CheckpointError(f"{p} holds no {CHECKPOINT_FILE}: not a `sparse-engine train` run directory, or a "
                              "run that stopped before its first epoch ended")
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    return p


def read_checkpoint(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """(file, contents) of a training checkpoint; :class:`CheckpointError` for anything else.

    Loaded with ``torch.load(weights_only=True)``: tensors and plain containers only, never pickled code.
    """
    p = find_checkpoint(path)
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise CheckpointError(f"{p} cannot be read ({e.strerror})") from None
    if head == b"SPENGv1\n":
        raise CheckpointError(f"{p} is an exported model (θ only, no training state), not a training "
                              f"checkpoint: resume from the run's {CHECKPOINT_FILE}")
    if head[:4] != b"PK\x03\x04":  # torch.save writes a zip archive
        raise CheckpointError(f"{p} is not a training checkpoint (not a torch.save file; it starts with {head!r})")
    try:
        ck = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global: foreign or unsafe contents
        lines = [ln.strip() for ln in str(e).splitlines() if "WeightsUnpickler error" in ln] or [type(e).__name__]
        raise CheckpointError(f"{p} holds objects that a safe load (weights_only) refuses, so it was not written "
                              f"by `sparse-engine train`: {lines[0][:200]}") from None
    except Exception as e:  # noqa: BLE001  (truncated or corrupt: a user error here)
        first = (str(e).strip().split(". ") or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{p} is a corrupt or truncated training checkpoint ({first})") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        what = ("the trained model of a dense run (model.pt)" if isinstance(ck, dict) and "model_state" in ck
                else "a torch file of another kind")
        raise CheckpointError(f"{p} is {what}, not a `sparse-engine train` checkpoint ({CHECKPOINT_FILE})")
    version = ck.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(f"{p} has checkpoint format version {version!r}; this sparse_engine "
                              f"({_library_version()}) reads version {CHECKPOINT_VERSION}: upgrade it")
    missing = [k for k in (*_CHECKPOINT_KEYS, "sha256") if k not in ck]
    if missing or not isinstance(ck["config"], dict):
        raise CheckpointError(f"{p} is an incomplete training checkpoint (missing {', '.join(missing) or 'config'})")
    saved_digest = ck.pop("sha256")
    if _digest(ck) != saved_digest:  # torch.load does not notice flipped bytes inside tensor data
        raise CheckpointError(f"{p} is corrupt: its contents do not match the checksum written with them")
    return p, ck


def config_from_checkpoint(saved: dict[str, Any]) -> TrainConfig:
    """The TrainConfig a checkpoint was written with (its ``config`` entry)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in names})
    try:
        return cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"the checkpoint's configuration is invalid ({e})") from None


def check_resume_config(cfg: TrainConfig, saved: dict[str, Any], where: str | os.PathLike = "the checkpoint",
                        option: Any = None) -> None:
    """Raise :class:`ConfigError` naming each option of ``cfg`` that differs from the checkpoint's ``saved``
    configuration (except :data:`RESUME_MAY_CHANGE`). ``option(field) -> str`` spells an option's name
    (the CLI passes one that gives ``--n-train``)."""
    option = option or (lambda name: name)
    diffs = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in RESUME_MAY_CHANGE:
            continue
        have, had = getattr(cfg, f.name), saved.get(f.name, "<missing>")
        if have != had or type(have) is bool and type(had) is not bool:
            diffs.append(f"{option(f.name)} is {have!r} here but {had!r} in the checkpoint")
    if diffs:
        raise ConfigError(f"cannot resume {where}: {'; '.join(diffs)} (a resumed run keeps its configuration: "
                          "drop the option, or start a new run in another --out directory)")


def _check_resume_data(ds: data_mod.Dataset, fingerprint: str, ckpt: dict[str, Any]) -> None:
    saved = ckpt["dataset"]
    have = {"name": ds.name, "n_train": ds.n_train, "n_test": ds.n_test, "fingerprint": fingerprint}
    diff = [k for k in have if saved.get(k) != have[k]]
    if diff:
        raise ConfigError(f"cannot resume {ckpt['path']}: the data differs from the run's ({', '.join(diff)}: "
                          f"{', '.join(f'{saved.get(k)!r} -> {have[k]!r}' for k in diff)}); --data / --data-dir "
                          "must give the same samples")


def _data_fingerprint(ds: data_mod.Dataset) -> str:
    """A cheap digest of the samples (all labels, shapes, and a strided subset of the inputs), so that a
    resumed run refuses different data behind the same options (another --data-dir)."""
    h = hashlib.sha256()
    for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)} {t.dtype};".encode())
        rows = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)
        step = 1 if t.dim() == 1 else max(1, rows.shape[0] // 256)
        h.update(rows[::step].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _load_part(ckpt: dict[str, Any], what: str, load) -> None:
    try:
        load()
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(f"{ckpt['path']}: the saved {what} state does not fit the run rebuilt from its "
                              f"configuration ({first})") from None


def _digest(obj: Any) -> str:
    """SHA-256 over every tensor's bytes and every plain value of a checkpoint, in order."""
    h = hashlib.sha256()

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(o, dict):
            h.update(f"D{len(o)};".encode())
            for k, v in o.items():
                h.update(f"{type(k).__name__}:{k!r}=".encode())
                walk(v)
        elif isinstance(o, (list, tuple)):
            h.update(f"L{len(o)};".encode())
            for v in o:
                walk(v)
        else:
            h.update(f"{type(o).__name__}:{o!r};".encode())

    walk(obj)
    return h.hexdigest()


def _plain(obj: Any) -> Any:
    """``obj`` as result.json holds it (JSON types only), so that weights_only loading accepts it."""
    return json.loads(json.dumps(obj, default=str))


def _method_logs(method) -> dict[str, Any]:
    return {"log": dict(method.log), "members": [dict(m.log) for m in getattr(method, "methods", [])]}


def _set_method_logs(method, logs: dict[str, Any]) -> None:
    method.log = dict(logs["log"])
    for m, log in zip(getattr(method, "methods", []), logs["members"]):
        m.log = dict(log)


def _auto_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in sparse_layers(model) if getattr(m, "layout", None) == "auto"]


def _layouts(model: nn.Module) -> dict[str, str]:
    return {name: m.resolved_layout for name, m in _auto_layers(model) if m.resolved_layout is not None}


def _restore_layouts(model: nn.Module, ckpt: dict[str, Any]) -> None:
    saved = ckpt.get("layouts") or {}
    for name, m in _auto_layers(model):
        if name in saved:
            _load_part(ckpt, "layout", lambda m=m, name=name: m.use_layout(saved[name]))


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Every random generator a run may draw from, as tensors and plain values (weights_only-loadable)."""
    import random

    import numpy as np

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same directory, flushed to disk, then renamed over ``path``:
    an interruption leaves the previous checkpoint intact, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_model(model: nn.Module, path: Path, cfg: TrainConfig, ds: data_mod.Dataset) -> None:
    """Write the trained model where ``sparse-engine export`` finds it (``<run dir>/model.pt``).

    A sparse model is extracted (θ = M ⊙ m ⊙ w collapsed, dense storage) and written as a sparse_engine
    file with the input description in its metadata; a model without sparse layers (the dense baseline)
    as a torch checkpoint ``{"config": ..., "model_state": ...}``.
    """
    from ..export.extract import extract, sparse_layers

    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    if sparse_layers(model):
        from ..export import io

        meta = {"input_shape": json.dumps(list(ds.input_shape)),
                "input_dtype": json.dumps("int64" if ds.vocab_size else "float32"),
                "vocab_size": json.dumps(ds.vocab_size), "model": cfg.model, "method": cfg.method,
                "density": json.dumps(cfg.density), "seed": json.dumps(cfg.seed)}
        io.save(extract(model, "dense"), path, metadata=meta)
        return
    config = {**dataclasses.asdict(cfg), "input_shape": list(ds.input_shape), "n_classes": ds.n_classes,
              "vocab_size": ds.vocab_size}
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"config": config, "model_state": model.state_dict()}, tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- compare


def summary_table(results: dict[str, dict]) -> str:
    """One row per method: density, final test accuracy (PILoT: after its prune), last epoch's train
    accuracy, sign flips of θ (summed epoch to epoch; "-" without factored/sparse layers), s/epoch."""
    head = ("method", "density", "test acc %", "train acc %", "sign flips", "s/epoch")
    rows = []
    for name, r in results.items():
        t = r["time_per_epoch_s"]
        sparse = any(lay["kind"] != "dense" for lay in r["layers"])
        rows.append((name, f"{r['density']:.3f}", f"{100 * r['final']['test_acc']:.2f}",
                     f"{100 * r['final']['train_acc']:.2f}", str(r["sign_flips"]) if sparse else "-",
                     f"{sum(t) / len(t):.1f}"))
    return _table(head, rows)


def epoch_table(results: dict[str, dict]) -> str:
    """Test accuracy (%) after each epoch, methods side by side; the last row is the final model
    (for PILoT: after the prune)."""
    names = list(results)
    n = max(len(r["epochs"]) for r in results.values())
    rows = []
    for i in range(n):
        cells = [str(i + 1)]
        for name in names:
            eps = results[name]["epochs"]
            cells.append(f"{100 * eps[i]['test_acc']:.2f}" if i < len(eps) else "")
        rows.append(tuple(cells))
    rows.append(("final", *(f"{100 * results[m]['final']['test_acc']:.2f}" for m in names)))
    return _table(("epoch", *names), rows)


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths)), *(fmt(r) for r in rows)])


COMPARE_PLAN = "compare-plan.json"


def compare(cfg: TrainConfig, methods: list[str], *, stream: TextIO | None = None,
            out: TextIO | None = None, resume: bool = False) -> dict[str, Any]:
    """Train ``methods`` on the same seed and data; print the tables to ``out`` (stdout) and write
    ``cfg.out_dir``/compare.json (plus one result.json and checkpoint.pt per method under
    ``cfg.out_dir``/<method>, and the plan, ``compare-plan.json``, before the first method starts).

    ``resume``: continue the interrupted compare in ``cfg.out_dir`` (its plan must list the same methods
    and configuration): a method whose result.json says done is not trained again, a method with a
    checkpoint continues from it, the others start from scratch.
    """
    if not methods:
        raise ConfigError("compare needs at least one method")
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"method must be one of {tuple(METHODS)}, got {m!r}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"compare lists a method twice: {methods}")
    cfg.validate()
    for m in methods:  # every method's options, before the first one trains (not minutes later)
        _method_of(dataclasses.replace(cfg, method=m))
    if resume:
        if not cfg.out_dir:
            raise ConfigError("resuming a compare needs its run directory (out_dir)")
        plan = read_compare_plan(cfg.out_dir)
        if list(plan["methods"]) != list(methods):
            raise ConfigError(f"cannot resume {cfg.out_dir}: --compare is {','.join(methods)} here but "
                              f"{','.join(plan['methods'])} in the run")
        check_resume_config(cfg, plan["config"], cfg.out_dir)
    ds = load_data(cfg)
    if cfg.out_dir:
        _write_json(Path(cfg.out_dir) / COMPARE_PLAN, {"format": COMPARE_PLAN, "version": 1,
                                                        "config": dataclasses.asdict(cfg), "methods": methods})
    results: dict[str, dict] = {}
    for m in methods:
        sub = dataclasses.replace(cfg, method=m, out_dir=str(Path(cfg.out_dir) / m) if cfg.out_dir else None)
        sub_resume = None
        if resume:
            run_dir = Path(sub.out_dir)
            done = _finished_result(sub, run_dir)
            if done is not None:
                Progress(cfg.progress, stream, prefix=f"[{m}] ").line(f"finished before: {run_dir}/result.json")
                results[m] = done
                continue
            if (run_dir / CHECKPOINT_FILE).is_file():
                sub_resume = run_dir
        results[m] = train(sub, ds, stream=stream, resume=sub_resume)
    text = (f"{cfg.model} on {ds.name}, density {cfg.density:g} ({cfg.distribution}), {cfg.epochs} epochs, "
            f"seed {cfg.seed}\n\n{summary_table(results)}\n\ntest accuracy per epoch (%)\n{epoch_table(results)}\n")
    out = out or sys.stdout
    out.write(text)
    out.flush()
    summary = {"config": dataclasses.asdict(cfg), "methods": methods, "table": text,
               "results": {m: {"final": r["final"], "density": r["density"], "sign_flips": r["sign_flips"],
                               "time_per_epoch_s": r["time_per_epoch_s"], "method": r["method"],
                               "test_acc_per_epoch": [e["test_acc"] for e in r["epochs"]]}
                           for m, r in results.items()}}
    if cfg.out_dir:
        _write_json(Path(cfg.out_dir) / "compare.json", summary)
        (Path(cfg.out_dir) / "table.txt").write_text(text)
    return {"summary": summary, "results": results}


def read_compare_plan(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The plan (configuration and methods) a ``compare`` wrote into ``run_dir``."""
    p = Path(run_dir) / COMPARE_PLAN
    if not p.is_file():
        raise CheckpointError(f"{run_dir} holds no {COMPARE_PLAN}: not a `sparse-engine train --compare` run directory")
    try:
        plan = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p} cannot be read as JSON ({e})") from None
    if not (isinstance(plan, dict) and plan.get("format") == COMPARE_PLAN and isinstance(plan.get("config"), dict)
            and isinstance(plan.get("methods"), list)):
        raise CheckpointError(f"{p} is not a compare plan written by `sparse-engine train --compare`")
    return plan


def _finished_result(cfg: TrainConfig, run_dir: Path) -> dict[str, Any] | None:
    """The result of a finished run of ``cfg`` in ``run_dir`` (None if it did not finish)."""
    try:
        r = json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(r, dict) or r.get("status") != "done" or not (run_dir / "model.pt").is_file():
        return None
    check_resume_config(cfg, r.get("config") or {}, run_dir / "result.json")
    return r


def default_out_dir(cfg: TrainConfig, methods: list[str] | None = None, root: str = "runs") -> str:
    what = "compare-" + "-".join(methods) if methods else cfg.method
    return str(Path(root) / f"{cfg.model}-{what}-d{cfg.density:g}-s{cfg.seed}")


__all__ = [
    "CHECKPOINT_FILE",
    "COMPARE_PLAN",
    "CheckpointError",
    "ConfigError",
    "Progress",
    "TrainConfig",
    "TrainingDiverged",
    "check_resume_config",
    "compare",
    "config_from_checkpoint",
    "default_out_dir",
    "epoch_table",
    "evaluate",
    "load_data",
    "read_checkpoint",
    "read_compare_plan",
    "summary_table",
    "train",
]

