"""The automatic layout choice (``layout="auto"``): measured, cached, never slower than dense.

For one layer the candidates are the layouts that keep its semantics (dense always; csr when it has a
mask; block and bsr only when the mask is block-aligned, since those layouts train whole blocks). Each
candidate is timed as one forward + backward on an input with the layer's number of rows, with fresh
random weights of the layer's shape, dtype, device and mask; the candidates are timed round-robin and
each keeps its fastest run (robust to load from other processes; :func:`sparse_engine.tuning.measure`).
The rule (:func:`sparse_engine.tuning.decide`):

    a sparse layout is chosen only when it is more than 5 % faster than dense (dense wins ties within 5 %)

so a layer with ``layout="auto"`` is never measurably slower than the dense masked layer.

Results are cached per *key*: op, weight shape, density, dtype, device (CPU threads or GPU name), rows
(rounded up to a power of two), parameterization (masked or factored), block shape, the backend each op
would run on, the build of its compiled library (size and time of the file) and the torch version. A new
kernel (the C++ backend landing, or a rebuilt one) therefore changes the key and is measured afresh. The cache lives in memory and in ``<cache_dir>/autolayout.json``
(``SPARSE_ENGINE_CACHE``, see :mod:`sparse_engine.env`); a cache file that cannot be read or written is
ignored with one log line.

Entry points: the layers call :func:`choose` on their first forward; :func:`tune` runs that choice for a
whole model on an example input (call it before building the optimizer: switching storage keeps the
Parameter objects but not optimizer state).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .. import env
from ..ops import backends
from ..param import sparse_layers
from ..tuning import MARGIN, decide, measure

log = logging.getLogger("sparse_engine")

CACHE_FILE = "autolayout.json"
_FORMAT = 1

#: which op implementation each layout's forward and backward runs on
_IMPLS = {
    "dense": ("masked_linear_fwd", "masked_linear_bwd"),
    "block": ("block_sparse_linear_fwd", "block_sparse_linear_bwd"),
    "csr": ("compact_linear_fwd", "compact_linear_bwd"),
    "bsr": ("compact_linear_fwd", "compact_linear_bwd"),
}


@dataclass
class Decision:
    """The layout chosen for one layer: ``times`` are the fastest seconds per forward + backward."""

    layout: str
    times: dict[str, float] = field(default_factory=dict)
    key: str = ""
    source: str = "measured"  # "measured" | "memory" | "disk" | "only candidate"


# -------------------------------------------------------------------------------------------- keys


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{torch.get_num_threads()}t"


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def make_key(
    op: str,
    weight_shape,
    mask2d: Tensor | None,
    dtype: torch.dtype,
    device,
    *,
    rows: int,
    kind: str,
    block_shape=(32, 32),
    extra: dict | None = None,
) -> dict[str, Any]:
    """The cache key of one measurement (a JSON-able dict; see the module docstring)."""
    device = torch.device(device)
    numel = math.prod(weight_shape)
    density = 1.0 if mask2d is None else int(mask2d.sum()) / numel
    impls = sorted({impl for pair in _IMPLS.values() for impl in pair} | {"reparam_fwd", "reparam_bwd"})
    used = {impl: backends.which(impl, device, dtype) for impl in impls}
    builds = sorted({f() for impl in impls if (f := backends.extra(impl, device, dtype, "build_id")) is not None})
    return {
        "op": op,
        "shape": list(weight_shape),
        # Finer near 0, where the cost of compact layouts changes fastest with density.
        "density": round(density, 3) if density < 0.1 else round(density, 2),
        "dtype": str(dtype).replace("torch.", ""),
        "device": _device_name(device),
        "rows": _pow2(rows),
        "kind": "masked" if kind == "masked" else "factored",
        "block_shape": list(block_shape),
        "backends": used,
        "builds": builds,  # a rebuilt library (new kernels) is measured afresh
        "torch": torch.__version__,
        **({"extra": extra} if extra else {}),
    }


def key_string(key: dict) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


# ------------------------------------------------------------------------------------------- cache

_memory: dict[str, dict[str, Decision]] = {}  # cache file path -> key string -> decision


def cache_path() -> str:
    return os.path.join(env.cache_dir(), CACHE_FILE)


def _read_disk(path: str) -> dict[str, Decision]:
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("format") != _FORMAT:
            return {}
        return {k: Decision(v["layout"], dict(v["times"]), k, "disk") for k, v in data["entries"].items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("sparse_engine: ignoring unreadable layout cache %s (%s)", path, e)
        return {}


def _write_disk(path: str, key: str, decision: Decision) -> None:
    # Read-merge-write through a temporary file and an atomic rename: two processes tuning at once
    # lose at most each other's newest entry, never the file.
    try:
        entries = {k: {"layout": d.layout, "times": d.times} for k, d in _read_disk(path).items()}
        entries[key] = {"layout": decision.layout, "times": decision.times}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".autolayout.", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"format": _FORMAT, "entries": entries}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("sparse_engine: could not write the layout cache %s (%s); keeping it in memory", path, e)


def clear_memory() -> None:
    """Forget in-memory decisions (the disk cache stays)."""
    _memory.clear()


def _memory_for(path: str) -> dict[str, Decision]:
    if path not in _memory:
        _memory[path] = _read_disk(path)
    return _memory[path]


# --------------------------------------------------------------------------------------- measuring


def choose(
    key: dict, make_runners: Callable[[], dict[str, Callable[[], None]]], *, retune: bool = False, device=None
) -> Decision:
    """The layout for ``key``: from the memory or disk cache, else measured with the runners that
    ``make_runners()`` returns (layout -> one forward + backward), decided by :func:`decide` and cached.
    """
    ks = key_string(key)
    path = cache_path()
    memory = _memory_for(path)
    if not retune and ks in memory:
        d = memory[ks]
        return Decision(d.layout, d.times, ks, "memory" if d.source != "disk" else "disk")
    runners = make_runners()
    if "dense" not in runners:
        raise ValueError(f"make_runners() must return a 'dense' runner, got {sorted(runners)}")
    if device is None and str(key.get("device", "")).startswith("cuda"):
        device = "cuda"
    times = measure(runners, device)
    decision = Decision(decide(times), times, ks, "measured")
    why = (f"{decision.layout} more than {MARGIN:.0%} faster than dense" if decision.layout != "dense"
           else f"no layout more than {MARGIN:.0%} faster than dense")
    log.info(
        "sparse_engine: layout for %s %s density %.3g rows %s: %s (%s; fastest of interleaved rounds: %s; "
        "cached in %s)",
        key.get("op"),
        key.get("shape"),
        key.get("density", 1.0),
        key.get("rows"),
        decision.layout,
        why,
        ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in times.items()),
        path,
    )
    memory[ks] = decision
    _write_disk(path, ks, decision)
    return decision


# ------------------------------------------------------------------------------------------- tune


def tune(model: nn.Module, example_input, *, retune: bool = False) -> dict[str, Decision]:
    """Choose the layout of every ``layout="auto"`` layer of ``model`` on ``example_input``.

    Runs one forward pass (no grad, every module in eval mode so that normalisation statistics do not
    move; modes are restored) during which each auto layer measures its candidates on its real input
    shape. ``example_input``: a tensor, a tuple of positional arguments, or a dict of keyword arguments.
    ``retune=True`` measures again even where a decision exists. Returns name -> Decision.
    Call it before creating the optimizer.
    """
    layers = {name: m for name, m in sparse_layers(model) if getattr(m, "layout", None) == "auto"}
    for m in layers.values():
        if retune:
            m.request_retune()
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(example_input, dict):
                model(**example_input)
            elif isinstance(example_input, tuple):
                model(*example_input)
            else:
                model(example_input)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return {name: m.autolayout_decision for name, m in layers.items() if hasattr(m, "autolayout_decision")}


def layouts(model: nn.Module) -> dict[str, str | None]:
    """name -> the layout each sparse layer uses now (None: auto, not chosen yet)."""
    return {name: m.resolved_layout for name, m in sparse_layers(model)}
