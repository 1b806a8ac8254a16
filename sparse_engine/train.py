"""The training loop behind ``sparse-engine train`` and the experiments.

    from sparse_engine.train import TrainConfig, train
    result = train(TrainConfig(model="mlp", method="signin", density=0.1, epochs=5))
    result["final"]["test_acc"]

One run: load the data, build the model (seeded: every method starts from the same dense init), let the
method sparsify it, build the fused optimizer, train with a per-step cosine learning rate, evaluate on
the test set after every epoch, run the method's hooks, and return (and write) a JSON-able result.
:func:`compare` runs several methods on the same seed and data and prints them side by side.

User errors raise :class:`ConfigError` (bad option) or ``data.DataError`` (bad files); a diverging run
raises :class:`TrainingDiverged` after writing what it has. The CLI turns those into one-line messages.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
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
from .methods import METHODS, make_method
from .models import MODELS, build_model
from .optim import NONFINITE_POLICIES, NonFiniteGradError, parameterizations

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
    from .diagnostics import layer_stats

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
          write: bool = True) -> dict[str, Any]:
    """Run one training job; returns the result dict (also written to ``cfg.out_dir``/result.json).

    Sets torch's CPU thread count for the run (:func:`default_threads`) and restores it afterwards.
    """
    cfg.validate()
    before = torch.get_num_threads()
    threads = default_threads(cfg)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(cfg, dataset, stream, write)
    finally:
        torch.set_num_threads(before)


def _train(cfg: TrainConfig, dataset: data_mod.Dataset | None, stream: TextIO | None, write: bool) -> dict[str, Any]:
    device = torch.device(cfg.device)
    ds = dataset if dataset is not None else load_data(cfg)
    progress = Progress(cfg.progress, stream, prefix=f"[{cfg.method}] ")
    try:
        wd_off = None if cfg.method == "wd_switchoff" else cfg.wd_switchoff  # for that method it is its `at`
        method = make_method(cfg.method, wd_switchoff=wd_off, **cfg.method_options())
    except ValueError as e:  # the option values come from the user
        raise ConfigError(str(e)) from None

    torch.manual_seed(cfg.seed)  # same dense init for every method
    model = build_model(cfg.model, ds.input_shape, ds.n_classes, ds.vocab_size)
    report = method.prepare(model)
    model.to(device)
    x_train, y_train = ds.x_train.to(device), ds.y_train.to(device)
    x_test, y_test = ds.x_test.to(device), ds.y_test.to(device)
    if cfg.layout == "auto" and method.sparsify_as is not None:
        from .nn import autolayout

        autolayout.tune(model, x_train[: cfg.batch_size])  # before the optimizer: layouts may rebuild params

    opt_kwargs: dict[str, Any] = {"weight_decay": cfg.weight_decay, "nonfinite": cfg.nonfinite}
    if cfg.optimizer == "sgd":
        opt_kwargs["momentum"] = cfg.momentum
    policy = getattr(method.config, "reset_policy", None)
    if policy is not None:
        opt_kwargs["reset_policy"] = policy
    optimizer = method.make_optimizer(model, cfg.optimizer, lr=cfg.lr, **opt_kwargs)
    steps_per_epoch = math.ceil(ds.n_train / cfg.batch_size)
    method.apply(model, optimizer, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch)
    if cfg.step_in_backward:
        optimizer.attach()

    stats0 = _sparse_stats(model)  # sets the sign-flip reference
    signs0 = _signs(model)
    result: dict[str, Any] = {
        "config": {k: v for k, v in dataclasses.asdict(cfg).items()},
        "method": method.describe(),
        "dataset": {"name": ds.name, "n_train": ds.n_train, "n_test": ds.n_test, "source": ds.info.get("source")},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
                        "python": platform.python_version(), "machine": platform.machine()},
        "sparsify": None if report is None else str(report),
        "parameters": sum(p.numel() for p in model.parameters()),
        "epochs": [],
        "status": "running",
    }
    flips_total = {s["name"]: 0 for s in stats0}
    epoch_no = 0
    rounds = [("train", cfg.epochs)]
    t_start = time.perf_counter()

    def run_epochs(n_epochs: int, phase: str) -> None:
        nonlocal epoch_no
        total_steps = n_epochs * steps_per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _cosine(total_steps) if cfg.lr_schedule == "cosine" else (lambda k: 1.0))
        for local_epoch in range(1, n_epochs + 1):
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
            progress.line(f"epoch {epoch_no}: loss {train_loss:.4f} train {100 * train_acc:.2f}% "
                          f"test {100 * test_acc:.2f}% ({train_time:.1f}s, {row['samples_per_s']:,.0f} samples/s)"
                          + (f" sign flips {row['sign_flips']}" if stats else ""))

    try:
        run_epochs(cfg.epochs, "train")
        while (retrain := method.end_of_training()) is not None:
            rounds.append(("retrain", retrain.epochs))
            progress.line(f"pruned to density {retrain.density:.4f}; retraining {retrain.epochs} epoch(s)")
            run_epochs(retrain.epochs, f"retrain{retrain.round}")
    except (TrainingDiverged, NonFiniteGradError) as e:
        result["status"] = "diverged"
        result["error"] = str(e)
        if write and cfg.out_dir:
            _write_json(Path(cfg.out_dir) / "result.json", result)
        if isinstance(e, TrainingDiverged):
            raise
        raise TrainingDiverged(f"training stopped: {e}", result) from None
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
        "total_time_s": time.perf_counter() - t_start,
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


def save_model(model: nn.Module, path: Path, cfg: TrainConfig, ds: data_mod.Dataset) -> None:
    """Write the trained model where ``sparse-engine export`` finds it (``<run dir>/model.pt``).

    A sparse model is extracted (θ = M ⊙ m ⊙ w collapsed, dense storage) and written as a sparse_engine
    file with the input description in its metadata; a model without sparse layers (the dense baseline)
    as a torch checkpoint ``{"config": ..., "model_state": ...}``.
    """
    from .extract import extract, sparse_layers

    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    if sparse_layers(model):
        from . import io

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


def compare(cfg: TrainConfig, methods: list[str], *, stream: TextIO | None = None,
            out: TextIO | None = None) -> dict[str, Any]:
    """Train ``methods`` on the same seed and data; print the tables to ``out`` (stdout) and write
    ``cfg.out_dir``/compare.json (plus one result.json per method under ``cfg.out_dir``/<method>)."""
    if not methods:
        raise ConfigError("compare needs at least one method")
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"method must be one of {tuple(METHODS)}, got {m!r}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"compare lists a method twice: {methods}")
    cfg.validate()
    ds = load_data(cfg)
    results: dict[str, dict] = {}
    for m in methods:
        sub = dataclasses.replace(cfg, method=m, out_dir=str(Path(cfg.out_dir) / m) if cfg.out_dir else None)
        results[m] = train(sub, ds, stream=stream)
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


def default_out_dir(cfg: TrainConfig, methods: list[str] | None = None, root: str = "runs") -> str:
    what = "compare-" + "-".join(methods) if methods else cfg.method
    return str(Path(root) / f"{cfg.model}-{what}-d{cfg.density:g}-s{cfg.seed}")


__all__ = [
    "ConfigError",
    "Progress",
    "TrainConfig",
    "TrainingDiverged",
    "compare",
    "default_out_dir",
    "epoch_table",
    "evaluate",
    "load_data",
    "summary_table",
    "train",
]

