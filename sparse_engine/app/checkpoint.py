"""The training checkpoint of a run directory (``checkpoint.pt``): writing, reading, checking, resuming.

The end of every epoch writes ``checkpoint.pt`` (atomically: a temporary file renamed over the old one):
model (m, w, masks, β), optimizer (buffers, step counts, lr), the lr schedule's position, the method's
state (Sign-In reset schedule, PILoT α controller, prune rounds and snapshot, weight-decay switch-off and
its dose), the random generators, and the result so far; the end of the run writes it once more with
``position["finished"]``. Its contents load with ``torch.load(weights_only=True)`` and carry a SHA-256
of themselves. It is the run's one record of its model: ``sparse-engine export RUN`` rebuilds the model
from it (:func:`model_from_checkpoint`) and extracts it once.

A run on several processes (``--nproc N``) adds ``world_size`` and ``ranks`` (each rank's random
generators); under FSDP2 (``--fsdp``) the model entry is the whole model, gathered, and the optimizer and
method state are in the folder that ``shards`` names (written by every rank, see distributed_run.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..methods import Method
from ..param import sparse_layers
from . import data as data_mod
from .config import ConfigError, TrainConfig, build_model_and_method

#: the compare plan a ``--compare`` run directory holds (compare.py)
COMPARE_PLAN = "compare-plan.json"

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
        raise CheckpointError(f"{p} is a torch file of another kind, not a `sparse-engine train` checkpoint "
                              f"({CHECKPOINT_FILE})")
    version = ck.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(f"{p} has checkpoint format version {version!r}; this sparse_engine "
                              f"({_library_version()}) reads version {CHECKPOINT_VERSION}: upgrade it")
    missing = [k for k in (*_CHECKPOINT_KEYS, "sha256") if k not in ck]
    if missing or not isinstance(ck["config"], dict):
        raise CheckpointError(f"{p} is an incomplete training checkpoint (missing {', '.join(missing) or 'config'})")
    saved_digest = ck.pop("sha256")
    if digest(ck) != saved_digest:  # torch.load does not notice flipped bytes inside tensor data
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
        # an option the checkpoint does not know did not exist yet: the run had its default
        have, had = getattr(cfg, f.name), saved.get(f.name, f.default)
        if have != had or type(have) is bool and type(had) is not bool:
            diffs.append(f"{option(f.name)} is {have!r} here but {had!r} in the checkpoint")
    if diffs:
        raise ConfigError(f"cannot resume {where}: {'; '.join(diffs)} (a resumed run keeps its configuration: "
                          "drop the option, or start a new run in another --out directory)")


def check_resume_data(ds: data_mod.Dataset, fingerprint: str, ckpt: dict[str, Any]) -> None:
    saved = ckpt["dataset"]
    have = {"name": ds.name, "n_train": ds.n_train, "n_test": ds.n_test, "fingerprint": fingerprint}
    diff = [k for k in have if saved.get(k) != have[k]]
    if diff:
        raise ConfigError(f"cannot resume {ckpt['path']}: the data differs from the run's ({', '.join(diff)}: "
                          f"{', '.join(f'{saved.get(k)!r} -> {have[k]!r}' for k in diff)}); --data / --data-dir "
                          "must give the same samples")


def data_fingerprint(ds: data_mod.Dataset) -> str:
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


def load_part(ckpt: dict[str, Any], what: str, load) -> None:
    try:
        load()
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(f"{ckpt['path']}: the saved {what} state does not fit the run rebuilt from its "
                              f"configuration ({first})") from None


def digest(obj: Any) -> str:
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


def plain(obj: Any) -> Any:
    """``obj`` as result.json holds it (JSON types only), so that weights_only loading accepts it."""
    return json.loads(json.dumps(obj, default=str))


def method_logs(method) -> dict[str, Any]:
    return {"log": dict(method.log), "members": [dict(m.log) for m in getattr(method, "methods", [])]}


def set_method_logs(method, logs: dict[str, Any]) -> None:
    method.log = dict(logs["log"])
    for m, log in zip(getattr(method, "methods", []), logs["members"]):
        m.log = dict(log)


def _auto_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in sparse_layers(model) if getattr(m, "layout", None) == "auto"]


def layouts(model: nn.Module) -> dict[str, str]:
    return {name: m.resolved_layout for name, m in _auto_layers(model) if m.resolved_layout is not None}


def restore_layouts(model: nn.Module, ckpt: dict[str, Any]) -> None:
    saved = ckpt.get("layouts") or {}
    for name, m in _auto_layers(model):
        if name in saved:
            load_part(ckpt, "layout", lambda m=m, name=name: m.use_layout(saved[name]))


def rng_state(device: torch.device) -> dict[str, Any]:
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


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
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


def save_atomic(obj: Any, path: Path) -> None:
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


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)




# ------------------------------------------------------------------------------------ write, restore


def training_state(cfg: TrainConfig, ds: data_mod.Dataset, fingerprint: str, position: dict[str, Any],
                   model: nn.Module, optimizer, scheduler, method: Method, signs0: dict[str, torch.Tensor],
                   flips_total: dict[str, int], result: dict[str, Any], device: torch.device,
                   parts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a checkpoint holds (see the module docstring), with its SHA-256. ``parts``: entries a
    multi-process run gives instead (the gathered model, every rank's random generators, ...)."""
    parts = parts or {}
    state = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "library_version": _library_version(),
        "torch_version": str(torch.__version__),
        # the dataset facts let `sparse-engine export` rebuild the model from this file alone
        "config": {**dataclasses.asdict(cfg), "input_shape": list(ds.input_shape), "n_classes": ds.n_classes,
                   "vocab_size": ds.vocab_size},
        "dataset": {"name": ds.name, "n_train": ds.n_train, "n_test": ds.n_test, "fingerprint": fingerprint},
        "position": position,
        "model_state": parts["model_state"] if "model_state" in parts else model.state_dict(),
        "optimizer_state": parts["optimizer_state"] if "optimizer_state" in parts else optimizer.state_dict(),
        "scheduler_state": scheduler.state_dict(),
        "method_state": parts["method_state"] if "method_state" in parts else method.state_dict(),
        "method_logs": plain(method_logs(method)),
        "layouts": layouts(model),
        "rng": rng_state(device),
        "signs0": {k: v.cpu() for k, v in signs0.items()},
        "flips_total": dict(flips_total),
        "result": plain(result),
    }
    state.update(parts)
    state["sha256"] = digest(state)
    return state


def restore_training(ckpt: dict[str, Any], optimizer, method: Method) -> None:
    """Load the optimizer's and the method's saved state (after ``method.apply``: its setup sets α,
    snapshots and schedules that the saved state replaces)."""
    load_part(ckpt, "optimizer", lambda: optimizer.load_state_dict(ckpt["optimizer_state"]))
    load_part(ckpt, "method", lambda: method.load_state_dict(ckpt["method_state"]))
    load_part(ckpt, "method", lambda: set_method_logs(method, ckpt["method_logs"]))


def model_from_checkpoint(ckpt: dict[str, Any]) -> tuple[nn.Module, Method, TrainConfig]:
    """(model, method, configuration) of a checkpoint read by :func:`read_checkpoint`: the model rebuilt
    from the configuration as the run built it, its layouts and every weight loaded from the file, on
    the CPU, in eval mode."""
    cfg = config_from_checkpoint(ckpt["config"])
    saved = ckpt["config"]
    if not saved.get("input_shape") or "n_classes" not in saved:
        raise CheckpointError(f"{ckpt['path']}: the configuration lacks input_shape / n_classes")
    model, method, _ = build_model_and_method(cfg, tuple(saved["input_shape"]), int(saved["n_classes"]),
                                              saved.get("vocab_size"))
    restore_layouts(model, ckpt)
    load_part(ckpt, "model", lambda: model.load_state_dict(ckpt["model_state"]))
    return model.eval(), method, cfg
