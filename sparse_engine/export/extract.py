"""``extract(model)``: collapse a trained sparse model into a compact inference model.

Every sparse layer (SparseLinear, SparseConv2d, SparseConv1d: any module whose ``.param`` is a
:class:`~sparse_engine.param.Parameterization`) becomes an :mod:`sparse_engine.export.infer` module holding only
θ = M ⊙ m ⊙ w and the bias: m, w, β and (since the new module shares nothing with the old one) every
optimizer state are gone. Other modules are kept as they are.

PILoT layers that were never pruned (``kind="pilot"``, no mask, a ``target_density``) are first
magnitude-pruned to their target (a layer the method pruned, e.g. by ``end_of_training()``, is kept as
trained): per layer (``scope="layer"``, each to its own target) or with one
threshold over all of them (``scope="global"``, to the parameter-weighted mean of their targets).
``density=`` overrides the targets.

The format of each layer (``format=``):

* ``"dense" | "csr" | "bsr" | "nm"``: that format for every layer (an error names a layer that cannot
  take it: ``nm`` needs a 2:4 pattern, sparse conv formats need ``groups == 1``); or a dict
  ``{layer name: format}`` (missing layers: ``"auto"``).
* ``"auto"``: each candidate format is built and timed on this device, on inputs of the layer's shape
  (recorded from ``example_inputs`` when given, else ``(b, in_features)`` for linear layers) with the
  leading batch dimension set to the batch size the model will run at: ``batch_size`` (default 1, the
  latency case), or each of ``batch_sizes`` when several must all be served. A sparse format is chosen
  only if it is more than ``margin`` faster than dense at that batch size (at every one of
  ``batch_sizes``) in two estimates, the fastest calls and the median of the per-round ratios
  (:func:`sparse_engine.tuning.verdict`): the candidates are timed in interleaved rounds, so load from
  other processes hits them alike, and a result within the noise of the machine is measured once more
  and otherwise keeps dense. So auto never picks a format that was measured slower than dense, and a
  busy machine does not flip its choice; among the winners, the lowest geometric mean of time ratios
  wins. Each choice is logged at INFO with what was measured and why.
  Candidates: dense; csr; bsr when the blocks of ``block_shape`` would be at least half full; nm when the
  pattern is 2:4 and this GPU runs 2:4 sparse tensor cores. A conv layer without ``example_inputs`` has
  no input shape to measure and stays dense (its ``extract_info`` says so).

Every inference module carries ``extract_info``: the chosen format, the reason, and the measured times
(seconds per forward, median). :func:`report` collects them.
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import tuning
from ..layout import FORMATS, reduce_to_blocks
from ..masks import SCOPES, magnitude_masks
from ..ops import backends
from ..param import sparse_layers
from .infer import InferConv1d, InferConv2d, InferLinear, InferModule, semi_structured_support

log = logging.getLogger("sparse_engine")

__all__ = ["MARGIN", "extract", "extract_dense", "reformat", "report", "sparse_layers"]

#: a sparse format must be more than this fraction faster than dense at every measured shape
MARGIN = tuning.MARGIN

_cache: dict[tuple, dict[str, list[float]]] = {}  # (candidates, layer key, input shape, ...) -> per-round samples


def _kind_of(mod: nn.Module) -> str:
    shape = tuple(mod.weight_shape if isinstance(mod, InferModule) else mod.param.weight_shape)
    if len(shape) == 2 and hasattr(mod, "in_features"):
        return "linear"
    if len(shape) == 4 and hasattr(mod, "kernel_size"):
        return "conv2d"
    if len(shape) == 3 and hasattr(mod, "kernel_size"):
        return "conv1d"
    raise ValueError(f"cannot extract {type(mod).__name__} with weight shape {shape}: not a Linear, Conv1d or Conv2d")


def conv_args(mod: nn.Module) -> dict[str, Any]:
    """The geometry of a convolution (stride, padding, dilation, groups, padding mode) as the inference
    layers take it."""
    return {"stride": tuple(mod.stride), "padding": mod.padding if isinstance(mod.padding, str) else tuple(mod.padding),
            "dilation": tuple(mod.dilation), "groups": int(mod.groups),
            "padding_mode": getattr(mod, "padding_mode", "zeros")}


def build_layer(kind: str, theta: Tensor, mask: Tensor | None, bias: Tensor | None, format: str,
                conv: dict | None, block_shape, nm=(2, 4)) -> InferModule:
    """The inference layer of ``kind`` ("linear", "conv1d", "conv2d") holding θ (masked) in ``format``:
    the one builder of extract, extract_dense and the Hugging Face loader."""
    if kind == "linear":
        return InferLinear(theta, bias, format, mask, block_shape=block_shape, nm=nm)
    cls = InferConv2d if kind == "conv2d" else InferConv1d
    return cls(theta, bias, format, mask, block_shape=block_shape, nm=nm, **conv)


# ------------------------------------------------------------------------------------------ PILoT


def _pilot_masks(layers: list[tuple[str, nn.Module]], thetas: dict[str, Tensor], masks: dict[str, Tensor | None],
                 scope: str, density: float | None) -> dict[str, Tensor]:
    """New masks for the PILoT layers that still need their final prune: those never pruned (no mask),
    or, with ``density`` given, those above it. A layer the method already pruned keeps its mask: the
    method's prune (global by default) leaves layers above or below their own target, and pruning them
    again to their target would ship another model than the one trained and tested."""
    todo: dict[str, float] = {}
    for name, mod in layers:
        if getattr(mod.param, "kind", None) != "pilot":
            continue
        target = density if density is not None else getattr(mod, "target_density", None)
        if target is None or (density is None and masks[name] is not None):
            continue
        current = 1.0 if masks[name] is None else float(masks[name].float().mean())
        if current > target + 0.5 / thetas[name].numel():
            todo[name] = float(target)
    if not todo:
        return {}
    scores = {n: thetas[n] if masks[n] is None else torch.where(masks[n], thetas[n], torch.zeros_like(thetas[n]))
              for n in todo}
    if scope == "layer":
        out = {n: magnitude_masks({n: scores[n]}, d, scope="layer")[n] for n, d in todo.items()}
    else:
        total = sum(scores[n].numel() for n in todo)
        d = sum(todo[n] * scores[n].numel() for n in todo) / total
        out = magnitude_masks(scores, d, scope="global")
    for n in out:
        if masks[n] is not None:
            out[n] = out[n] & masks[n]
        log.info("sparse_engine: extract: PILoT layer %s pruned to density %.4f (%s)", n,
                 float(out[n].float().mean()), scope)
    return out


# -------------------------------------------------------------------------------------- measuring


#: timing effort of "auto": interleaved rounds per shape, seconds per burst of one candidate
ROUNDS = 7
BURST_S = 0.004


def _measure(fns: dict[str, Callable[[], Any]], device: torch.device, rounds: int = ROUNDS) -> dict[str, list[float]]:
    """Per-round seconds per call of each function (tuning.measure_rounds: interleaved rounds of short
    bursts); a candidate 1.5x slower than the first (dense) after 3 rounds stops there."""
    return tuning.measure_rounds(fns, device, warmup=1, rounds=rounds, budget_s=math.inf, burst_s=BURST_S,
                                 drop_slower=1.5)


def _sample(candidates: dict[str, Callable[[], InferModule]], mods: dict[str, InferModule], shape: tuple[int, ...],
            device: torch.device, input_dtype: torch.dtype, rounds: int) -> dict[str, list[float]]:
    """Every candidate measured together on a random input of ``shape`` (samples of one run are paired)."""
    x = torch.randn(shape, device=device).to(input_dtype) if input_dtype.is_floating_point else \
        torch.randint(0, 2, shape, device=device, dtype=input_dtype)
    for fmt in candidates:
        if fmt not in mods:
            mods[fmt] = candidates[fmt]()
    with torch.inference_mode():
        out = _measure({fmt: (lambda m=mods[fmt], x=x: m(x)) for fmt in candidates}, device, rounds)
    # a candidate dropped as much slower than dense lost its remaining rounds: inf keeps the rounds paired
    n = max(len(s) for s in out.values())
    return {fmt: list(s) + [math.inf] * (n - len(s)) for fmt, s in out.items()}


def _choose(candidates: dict[str, Callable[[], InferModule]], shapes: list[tuple[int, ...]], key: tuple,
            device: torch.device, dtype: torch.dtype, input_dtype: torch.dtype, margin: float
            ) -> tuple[str, dict[str, dict[str, float]], str]:
    """(format, fastest times {format: {shape: s}}, reason) by tuning.verdict: the rule of the module
    docstring with its spread check; within noise, every shape is measured once more (the rounds added to
    the first ones) and a second "within noise" keeps dense."""
    if next(iter(candidates)) != "dense":
        raise ValueError("the first candidate must be 'dense' (the baseline)")
    bkey = backends.which("compact_linear_fwd", device, dtype)
    names = {shape: "x".join(map(str, shape)) for shape in shapes}
    mods: dict[str, InferModule] = {}
    samples: dict[str, dict[str, list[float]]] = {fmt: {} for fmt in candidates}
    ckeys = {shape: (tuple(candidates), key, shape, str(device), str(dtype), bkey, torch.get_num_threads())
             for shape in shapes}
    for shape, ckey in ckeys.items():
        if ckey not in _cache:
            _cache[ckey] = _sample(candidates, mods, shape, device, input_dtype, ROUNDS)
        for fmt in candidates:
            samples[fmt][names[shape]] = list(_cache[ckey][fmt])
    v = tuning.verdict(samples, margin, unit="input")
    if v.unsure:
        for shape, ckey in ckeys.items():
            more = _sample(candidates, mods, shape, device, input_dtype, 2 * ROUNDS)
            _cache[ckey] = {fmt: _cache[ckey][fmt] + more[fmt] for fmt in candidates}
            for fmt in candidates:
                samples[fmt][names[shape]] = list(_cache[ckey][fmt])
        v = tuning.verdict(samples, margin, unit="input")
    times = {fmt: {case: min(s) for case, s in cases.items()} for fmt, cases in samples.items()}
    return v.choice, times, v.reason


def _is_nm(mask2d: Tensor, n: int = 2, m: int = 4) -> bool:
    k = mask2d.shape[1]
    return k % m == 0 and bool((mask2d.reshape(mask2d.shape[0], k // m, m).sum(-1) <= n).all())


def _record_shapes(model: nn.Module, names: Iterable[str], example_inputs) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name in names:
        mod = model.get_submodule(name) if name else model

        def hook(module, args, name=name):
            if name not in shapes and args and isinstance(args[0], Tensor):
                shapes[name] = tuple(args[0].shape)

        handles.append(mod.register_forward_pre_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(example_inputs, dict):
                model(**example_inputs)
            elif isinstance(example_inputs, (tuple, list)):
                model(*example_inputs)
            else:
                model(example_inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return shapes


# ----------------------------------------------------------------------------------------- extract


def extract(
    model: nn.Module,
    format: str | dict[str, str] = "auto",
    *,
    example_inputs: Any = None,
    batch_size: int | None = None,
    batch_sizes: Sequence[int] | None = None,
    scope: str = "layer",
    density: float | None = None,
    block_shape: tuple[int, int] = (32, 32),
    margin: float = MARGIN,
    inplace: bool = False,
) -> nn.Module:
    """The inference version of ``model`` (a copy unless ``inplace``), in eval mode. See the module doc.

    Args:
        model: a model holding sparse_engine sparse layers (e.g. after ``sparsify`` and training).
        format: "auto", "dense", "csr", "bsr", "nm", or a dict layer name -> one of those.
        example_inputs: an input (or tuple of positional inputs, or dict of keyword inputs) of the model;
            used by "auto" to learn each layer's input shape (needed for conv layers).
        batch_size: the batch size the model will run at, where "auto" measures (the example's batch
            dim is replaced); default 1.
        batch_sizes: instead of ``batch_size``, several: "auto" then needs a win at each of them.
        scope: "layer" or "global" threshold for pruning PILoT layers to their target density.
        density: prune every PILoT layer to this density instead of its target_density.
        block_shape: BSR block (bn, bk) for layers not already stored as BSR.
        margin: how much faster than dense a sparse format must be to be chosen by "auto".
        inplace: replace the layers of ``model`` itself instead of a deep copy.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_format_arg(format)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if density is not None and (isinstance(density, bool) or not isinstance(density, (int, float))
                                or not 0.0 < density <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    batch_sizes = _check_batch_sizes(batch_size, batch_sizes)
    if not (isinstance(margin, (int, float)) and margin >= 0):
        raise ValueError(f"margin must be a number >= 0, got {margin!r}")

    if not sparse_layers(model):
        raise ValueError(f"model ({type(model).__name__}) holds no sparse_engine sparse layer to extract; "
                         "sparsify it first (sparse_engine.nn.sparsify)")
    out = model if inplace else copy.deepcopy(model)
    layers = sparse_layers(out)
    if isinstance(format, dict):
        unknown = set(format) - {n for n, _ in layers}
        if unknown:
            raise ValueError(f"format names layers that are not sparse layers of the model: {sorted(unknown)}")
    shapes: dict[str, tuple[int, ...]] = {}
    if example_inputs is not None:
        shapes = _record_shapes(out, [n for n, _ in layers], example_inputs)

    with torch.no_grad():
        thetas = {n: m.theta().detach() for n, m in layers}
        masks = {n: m.dense_mask() for n, m in layers}
        masks.update(_pilot_masks(layers, thetas, masks, scope, density))
        built: dict[str, InferModule] = {}
        for name, mod in layers:
            fmt = format.get(name, "auto") if isinstance(format, dict) else format
            built[name] = _extract_layer(name, mod, thetas[name], masks[name], fmt, shapes.get(name), batch_sizes,
                                         block_shape, margin)
    return _replace(out, built)


def _replace(model: nn.Module, layers: dict[str, nn.Module]) -> nn.Module:
    """``model`` with each named submodule replaced (the name "" replaces the model itself), in eval mode."""
    for name, new in layers.items():
        if name:
            model.set_submodule(name, new)
        else:
            model = new
    return model.eval()


def _extract_layer(name: str, mod: nn.Module, theta: Tensor, mask: Tensor | None, fmt: str,
                   in_shape: tuple[int, ...] | None, batch_sizes: tuple[int, ...], block_shape, margin: float
                   ) -> InferModule:
    where = f"layer {name or '<root>'} ({type(mod).__name__} {tuple(theta.shape)})"
    if not bool(torch.isfinite(theta).all()):
        raise ValueError(f"{where}: θ holds NaN or inf ({int((~torch.isfinite(theta)).sum())} entries); the "
                         "training diverged or the weights are corrupt: refusing to extract them")
    kind = _kind_of(mod)
    conv = conv_args(mod) if kind != "linear" else None
    bias = None if getattr(mod, "bias", None) is None else mod.bias.detach()
    if mask is None:
        mask = torch.ones(theta.shape, dtype=torch.bool, device=theta.device)
    if isinstance(mod, InferModule):
        block_shape = mod.block_shape or block_shape
    elif getattr(mod.param, "layout", None) == "bsr":
        block_shape = tuple(getattr(mod.param, "block_shape", block_shape))
    mask2d = mask.reshape(mask.shape[0], -1)
    grouped = conv is not None and conv["groups"] != 1

    def make(f: str) -> Callable[[], InferModule]:
        return lambda: build_layer(kind, theta, mask, bias, f, conv, block_shape)

    info: dict[str, Any] = {"density": float(mask.float().mean())}
    if fmt != "auto":
        if grouped and fmt != "dense":
            raise ValueError(f"{where}: format {fmt!r} needs groups=1; give this layer 'dense' "
                             f"(format={{{name!r}: 'dense', ...}}) or use 'auto'")
        if fmt == "nm" and not _is_nm(mask2d):
            raise ValueError(f"{where}: format 'nm' needs a 2:4 pattern (at most 2 active in every 4 inputs, "
                             "K divisible by 4); train with an N:M mask or use another format")
        try:
            new = make(fmt)()
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        info.update(format=fmt, reason="requested", times={})
    else:
        candidates = {"dense": make("dense")}
        notes = []
        if grouped:
            notes.append("grouped conv: dense only")
        elif kind != "linear" and in_shape is None:
            notes.append("no example_inputs: a conv layer needs an input shape to be measured")
        else:
            candidates["csr"] = make("csr")
            nnz = int(mask2d.sum())
            nnzb = int(reduce_to_blocks(mask2d, block_shape).sum())
            if nnzb and nnz / (nnzb * block_shape[0] * block_shape[1]) >= 0.5:
                candidates["bsr"] = make("bsr")
            why = semi_structured_support(theta.device, theta.dtype, tuple(mask2d.shape))
            if not why and _is_nm(mask2d):
                candidates["nm"] = make("nm")
        if len(candidates) == 1:
            chosen, times, reason = "dense", {}, "only candidate"
        else:
            if in_shape is None:
                in_shape = (1, theta.shape[1])  # linear: (rows, in_features)
            shapes = [(b,) + tuple(in_shape[1:]) for b in batch_sizes]
            key = (kind, tuple(theta.shape), round(info["density"], 3), bias is not None, block_shape,
                   tuple(sorted(conv.items())) if conv else None)
            chosen, times, reason = _choose(candidates, shapes, key, theta.device, theta.dtype, theta.dtype,
                                            margin)
        new = candidates[chosen]()
        info.update(format=chosen, reason="; ".join(notes + [reason]), times=times)
        log.info("sparse_engine: extract: %s -> %s (%s)", where, chosen, info["reason"])
    new.extract_info = info
    return new


def extract_dense(model: nn.Module) -> nn.Module:
    """A model without sparse layers (a dense baseline) in inference layers, in place, in eval mode: every
    nn.Linear / nn.Conv1d / nn.Conv2d becomes a dense InferLinear / InferConv* with the same weights, every
    weight kept (even one that is 0.0), so that save, load and bench-infer treat it as an extracted model."""
    kinds = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d"}
    built: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        kind = kinds.get(type(mod))
        if kind is None:
            continue
        w = mod.weight.detach()
        bias = None if mod.bias is None else mod.bias.detach()
        every = torch.ones(w.shape, dtype=torch.bool, device=w.device)
        new = build_layer(kind, w, every, bias, "dense", conv_args(mod) if kind != "linear" else None, (32, 32))
        new.extract_info = {"format": "dense", "reason": "trained dense (nothing pruned)", "density": 1.0,
                            "times": {}}
        built[name] = new
    return _replace(model, built)


def reformat(
    model: nn.Module,
    format: str | dict[str, str] = "auto",
    *,
    example_inputs: Any = None,
    batch_size: int | None = None,
    batch_sizes: Sequence[int] | None = None,
    block_shape: tuple[int, int] = (32, 32),
    margin: float = MARGIN,
    inplace: bool = False,
) -> nn.Module:
    """An extracted model with its inference layers re-laid in ``format`` (same θ, same outputs).

    ``reformat(model, "dense")`` is the dense equivalent of a sparse inference model; ``"auto"`` measures
    again on this device (e.g. a file exported on another machine). Arguments as in :func:`extract`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_format_arg(format)
    batch_sizes = _check_batch_sizes(batch_size, batch_sizes)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, InferModule)]
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) holds no inference layer (InferLinear / InferConv*); "
                         "extract it first")
    out = model if inplace else copy.deepcopy(model)
    layers = [(n, m) for n, m in out.named_modules() if isinstance(m, InferModule)]
    shapes = _record_shapes(out, [n for n, _ in layers], example_inputs) if example_inputs is not None else {}
    built = {}
    with torch.no_grad():
        for name, mod in layers:
            fmt = format.get(name, "auto") if isinstance(format, dict) else format
            built[name] = _extract_layer(name, mod, mod.dense_weight(), mod.mask(), fmt, shapes.get(name),
                                         batch_sizes, block_shape, margin)
    return _replace(out, built)


def _check_format_arg(format) -> None:
    if isinstance(format, str):
        if format != "auto" and format not in FORMATS:
            raise ValueError(f"format must be 'auto' or one of {FORMATS} (or a dict of them), got {format!r}")
    elif isinstance(format, dict):
        for k, v in format.items():
            if v != "auto" and v not in FORMATS:
                raise ValueError(f"format[{k!r}] must be 'auto' or one of {FORMATS}, got {v!r}")
    else:
        raise TypeError(f"format must be a str or a dict layer name -> format, got {type(format).__name__}")


def _check_batch_sizes(batch_size, batch_sizes) -> tuple[int, ...]:
    """The batch sizes "auto" measures at: ``(batch_size,)``, ``batch_sizes``, or (1,) when neither is given."""
    if batch_size is not None:
        if batch_sizes is not None:
            raise ValueError(f"give batch_size or batch_sizes, not both (got {batch_size!r} and {batch_sizes!r})")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        return (batch_size,)
    if batch_sizes is None:
        return (1,)
    try:
        out = tuple(batch_sizes)
    except TypeError:
        out = ()
    if not out or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in out):
        raise ValueError(f"batch_sizes must be a non-empty sequence of positive ints, got {batch_sizes!r}")
    return out


def report(model: nn.Module) -> list[dict[str, Any]]:
    """One row per inference layer: name, type, shape, format, density, reason, measured times."""
    rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, InferModule):
            info = getattr(mod, "extract_info", {})
            rows.append({"name": name, "type": type(mod).__name__, "shape": mod.weight_shape, "format": mod.format,
                         "density": mod.density, "reason": info.get("reason", ""), "times": info.get("times", {})})
    return rows
