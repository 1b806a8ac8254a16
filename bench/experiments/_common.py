"""Shared pieces of the experiment scripts: a training loop that keeps the model, seeds, JSON output,
mean ± std, and optional plotting.

Why a loop of our own instead of ``sparse_engine.app.loop.train``: the experiments need the trained model
(PILoT is pruned at several densities after one training run), per-layer sign flips per epoch, and
hooks between method preparation and training (the β = 0 "spred" start). The loop does exactly what
``loop.train`` does (same data, same seeded init, same method life cycle, per-step cosine learning
rate, evaluation after every epoch), through the same public API: ``build_model_and_method``,
``Method.make_optimizer`` / ``apply`` / ``after_epoch`` / ``end_of_training``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT, ROOT / "bench"):  # run as a script from a checkout: the package, and bench/common.py
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch
import torch.nn.functional as F
from common import cpu_name, git_commit, pyplot, save_fig  # noqa: F401 (save_fig: for the experiments)

from sparse_engine.app import data as data_mod
from sparse_engine.nn.diagnostics import layer_stats
from sparse_engine.optim import parameterizations
from sparse_engine.app.config import TrainConfig, build_model_and_method, load_data
from sparse_engine.app.loop import evaluate

RESULTS = ROOT / "bench" / "results" / "experiments"


# ------------------------------------------------------------------------------------------ CLI


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (seconds, meaningless numbers)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0 1 2; --quick: 0)")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON and PNG")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (also skipped without matplotlib)")
    return p


def add_output_options(p: argparse.ArgumentParser, name: str, merged: str) -> None:
    """--name (the output file stem) and --merge (combine the result files of runs made apart, e.g. in
    parallel: ``merged`` says what is merged into <out>/<name>.json)."""
    p.add_argument("--name", default=name, help="output file stem")
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                   help=f"no training: merge {merged} into <out>/<name>.json and draw the PNG")


def seeds_of(args) -> list[int]:
    if args.seeds is not None:
        return list(args.seeds)
    return [0] if args.quick else [0, 1, 2]


# ------------------------------------------------------------------------------------- environment


def environment() -> dict[str, Any]:
    cpu, commit = cpu_name(), git_commit()
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "commit": commit, "loadavg": load,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def mean_std(values: list[float]) -> dict[str, Any]:
    """mean, sample std (0 for one value), n, and the values themselves."""
    vals = [float(v) for v in values]
    return {"mean": statistics.fmean(vals) if vals else float("nan"),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals), "values": vals}


def exceeds_spread(a: dict, b: dict) -> bool:
    """|mean_a − mean_b| larger than std_a + std_b (a deliberately simple, conservative reading)."""
    return abs(a["mean"] - b["mean"]) > a["std"] + b["std"]


# ----------------------------------------------------------------------------------------- training


def run(cfg: TrainConfig, ds: data_mod.Dataset, *, before_training: Callable | None = None,
        after_training: Callable | None = None, per_layer_flips: bool = False) -> dict[str, Any]:
    """Train ``cfg`` on ``ds``; returns a JSON-able result. ``before_training(model, method)`` runs after
    the method sparsified the model and before the optimizer is built; ``after_training(model, method,
    result)`` runs after the last epoch, before the method's end-of-training prune, and may add to
    ``result``."""
    cfg.validate()
    torch.set_num_threads(cfg.threads or 1)
    # the same dense init for every method of a seed
    first = (ds.x_train[: cfg.batch_size], ds.y_train[: cfg.batch_size])  # what a SNIP mask is scored on, as in train
    model, method, _ = build_model_and_method(cfg, ds.input_shape, ds.n_classes, ds.vocab_size, first)
    if before_training is not None:
        before_training(model, method)
    opt_kwargs: dict[str, Any] = {"weight_decay": cfg.weight_decay, "momentum": cfg.momentum}
    policy = getattr(method.config, "reset_policy", None)
    if policy is not None:
        opt_kwargs["reset_policy"] = policy
    optimizer = method.make_optimizer(model, "sgd", lr=cfg.lr, **opt_kwargs)
    steps = math.ceil(ds.n_train / cfg.batch_size)
    method.apply(model, optimizer, epochs=cfg.epochs, steps_per_epoch=steps)
    total = cfg.epochs * steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: 0.5 * (1.0 + math.cos(math.pi * min(k, total) / total)))
    layer_stats(model)  # sets the sign reference of every layer
    signs0 = {_layer(n): torch.sign(pz.values().detach()) for n, pz in parameterizations(model)}
    epochs: list[dict] = []
    t0 = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for xb, yb in data_mod.batches(ds.x_train, ds.y_train, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                       epoch=epoch):
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            loss_value = loss.detach().item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"{cfg.method} seed {cfg.seed}: loss {loss_value} at epoch {epoch}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sched.step()
            loss_sum += loss_value * yb.shape[0]
            correct += int((out.detach().argmax(1) == yb).sum())
            seen += yb.shape[0]
        train_acc = correct / seen
        log = method.after_epoch(epoch, train_acc)
        test_loss, test_acc = evaluate(model, ds.x_test, ds.y_test)
        stats = layer_stats(model)  # flips since the previous epoch's check (a reset never flips: θ is kept)
        row = {"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": train_acc, "test_loss": test_loss,
               "test_acc": test_acc, "sign_flips": sum(s["sign_flips"] for s in stats),
               **{k: v for k, v in log.items() if isinstance(v, (int, float, bool)) or v is None}}
        beta = [s["beta_mean"] for s in stats if s["beta_mean"] is not None]
        row["beta_mean"] = statistics.fmean(beta) if beta else None
        if per_layer_flips:
            row["flips_per_layer"] = {s["name"]: s["sign_flips"] for s in stats}
        epochs.append(row)
    signs1 = {_layer(n): torch.sign(pz.values().detach()) for n, pz in parameterizations(model)}
    result: dict[str, Any] = {
        "method": method.describe(), "seed": cfg.seed, "epochs": epochs,
        "final": {"test_acc": epochs[-1]["test_acc"], "train_acc": epochs[-1]["train_acc"],
                  "test_loss": epochs[-1]["test_loss"]},
        "signs_changed_vs_init": {n: int((signs0[n] * signs1[n] < 0).sum()) for n in signs0},
        "active_per_layer": {n: int((signs1[n] != 0).sum()) for n in signs1},
        "time_s": time.perf_counter() - t0,
    }
    if after_training is not None:
        after_training(model, method, result)
    method.end_of_training()
    # what the run ships: after the method's end-of-training step (PILoT's prune), if it changed anything
    result["final"]["test_acc_end"] = evaluate(model, ds.x_test, ds.y_test)[1]
    method.remove()
    return result


def record(out: dict, path: Path, r: dict[str, Any], label: str, **keys: Any) -> None:
    """Append run ``r`` (from :func:`run`) to ``out["runs"]`` under ``keys``, log it and write ``out`` to
    ``path`` (partial results survive an interrupted experiment)."""
    log(f"{label}: test {100 * r['final']['test_acc']:.2f}% ({r['time_s']:.0f}s)")
    out["runs"].append({**keys, "describe": r["method"], "final": r["final"], "epochs": r["epochs"],
                        "signs_changed_vs_init": r["signs_changed_vs_init"],
                        "active_per_layer": r["active_per_layer"], "time_s": r["time_s"]})
    write_json(path, out)


def _layer(name: str) -> str:
    """A parameterization's name ("hidden.0.param") as its layer's module name ("hidden.0")."""
    return name.removesuffix(".param")


def dataset(model: str, n_train: int | None, n_test: int | None, seed: int = 0) -> data_mod.Dataset:
    """Fashion-MNIST (flattened for the MLP), cut to the first n_train / n_test samples."""
    return load_data(TrainConfig(model=model, data="fashion-mnist", n_train=n_train, n_test=n_test, seed=seed))


# --------------------------------------------------------------------------------------------- plots


def finish(args, out: dict, plot: Callable, table: Callable | None, png: str) -> int:
    """The end of an experiment: its figure, ``plot(plt, out, path)`` (not with --no-plot or without
    matplotlib), and its table on stdout."""
    if not args.no_plot and (plt := pyplot()) is not None:
        plot(plt, out, args.out / png)
    if table is not None:
        print(table(out))
    return 0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
