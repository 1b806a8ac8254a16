"""``compare``: several methods trained on the same seed and data, printed side by side.

    from sparse_engine.app.compare import compare
    compare(TrainConfig(density=0.1, epochs=5, out_dir="runs/cmp"), ["dense", "static", "signin", "pilot"])

Writes ``compare.json``, ``table.txt`` and, before the first method starts, its plan
(``compare-plan.json``) into ``cfg.out_dir``, and each method's run (result.json, checkpoint.pt) into
``cfg.out_dir``/<method>.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from ..methods import METHODS
from .checkpoint import CHECKPOINT_FILE, COMPARE_PLAN, CheckpointError, check_resume_config, write_json
from .config import ConfigError, TrainConfig, load_data, make_method_of
from .loop import train
from .progress import Progress



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
        make_method_of(dataclasses.replace(cfg, method=m))
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
        write_json(Path(cfg.out_dir) / COMPARE_PLAN, {"format": COMPARE_PLAN, "version": 1,
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
        write_json(Path(cfg.out_dir) / "compare.json", summary)
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
    if not isinstance(r, dict) or r.get("status") != "done" or not (run_dir / CHECKPOINT_FILE).is_file():
        return None
    check_resume_config(cfg, r.get("config") or {}, run_dir / "result.json")
    return r


