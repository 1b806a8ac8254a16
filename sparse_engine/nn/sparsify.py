"""``sparsify(model, ...)``: swap every Linear / Conv of a model for its sparse layer, in place.

Methods (the parameterization and mask each layer gets):

==========  ======================  ===============================================================
method      parameterization        mask
==========  ======================  ===============================================================
static      Masked (θ trained)      random pruning-at-initialisation mask (the usual baseline)
signin      SignIn (m ⊙ w, β)       random mask; train with periodic Sign-In resets
pilot       PILoT (m ⊙ w, β = 1)    none: dense until pruned; ``density`` is the pruning target,
                                    recorded on every layer as ``target_density``
dense       Masked                  none: a dense baseline through the same code path
==========  ======================  ===============================================================

Where the masks of static / signin come from (``mask``):

* ``"random"`` (default): :func:`sparse_engine.masks.random_masks` (below);
* ``"magnitude"``: the largest |W| of the model's current (e.g. pretrained) weights;
* ``"snip"``: the largest |∂L/∂W ⊙ W| on one ``batch`` (SNIP); ``"synflow"``: iterative SynFlow scores,
  no data (the input shape comes from ``batch``, ``input_shape`` or the first Linear layer);
* a dict ``layer name -> bool tensor`` of the weight's shape: the user's own masks (layers without one
  are left dense and listed as skipped).

Scored masks keep, per layer (``mask_scope="layer"``, the default for magnitude), each layer's count for
``distribution``, or, over all layers (``"global"``, the default for SNIP and SynFlow), one threshold. The
block layouts score whole blocks (L1 norm of the scores), per layer.

Random masks come from :func:`sparse_engine.masks.random_masks`: the per-layer densities follow
``distribution`` (uniform / er / erk) and the number of active weights over all replaced layers is
exactly ``round(density * total)``, deterministic for a given ``seed``. The block layouts ("block",
"bsr") need whole blocks active: their masks are random blocks at each layer's density, so the overall
density is then the nearest that whole blocks allow (the report shows it, and a warning names it when
it is more than half a block per layer away). A model with no Linear / Conv is refused; one whose
every Linear / Conv is skipped gets a warning listing why.

Left alone by default: embeddings, normalisation and everything that is not a Linear / Conv1d / Conv2d;
layers whose weight is tied to another module's (an LM head tied to the embedding); the projections
inside ``nn.MultiheadAttention`` (it reads their weights directly on its fast path); lazy layers not yet
initialised. The report lists every skipped Linear / Conv with the reason.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .. import masks as masks_mod
from ..checks import check_choice
from ..layout import LAYOUTS, check_block_shape
from ..masks import check_density
from ..param import is_sparse_layer
from .conv import SparseConv1d, SparseConv2d
from .linear import SparseLinear

#: the ``method`` argument of sparsify -> the parameterization kind its layers get (module docstring)
SPARSIFY_METHODS = {"static": "masked", "signin": "signin", "pilot": "pilot", "dense": "masked"}
_SPARSE_OF = ((nn.Conv2d, SparseConv2d), (nn.Conv1d, SparseConv1d), (nn.Linear, SparseLinear))


@dataclass
class LayerReport:
    """One replaced layer: its name, original type, weight shape and the mask it got."""

    name: str
    type: str
    shape: tuple[int, ...]
    numel: int
    nnz: int
    kind: str
    layout: str
    target_density: float | None = None

    @property
    def density(self) -> float:
        return self.nnz / self.numel if self.numel else 0.0


@dataclass
class SparsifyReport:
    """What :func:`sparsify` did. ``str(report)`` prints a table; ``density`` is over replaced layers."""

    method: str
    requested_density: float
    distribution: str
    layout: str
    seed: int
    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.layers)

    @property
    def nnz(self) -> int:
        return sum(r.nnz for r in self.layers)

    @property
    def density(self) -> float:
        return self.nnz / self.numel if self.numel else 0.0

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, name: str) -> LayerReport:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(name)

    def __str__(self) -> str:
        head = ("name", "type", "shape", "density", "nnz", "numel")
        rows = [
            (r.name, r.type, "x".join(map(str, r.shape)), f"{r.density:.4f}", str(r.nnz), str(r.numel))
            for r in self.layers
        ]
        rows.append(("total", "", "", f"{self.density:.4f}", str(self.nnz), str(self.numel)))
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
        right = (False, False, False, True, True, True)

        def fmt(row) -> str:
            return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip()

        target = ""
        if self.method == "pilot":
            target = f" (no mask while training; pruning target {self.requested_density:g})"
        lines = [
            f"sparsify: method={self.method}, layout={self.layout}, distribution={self.distribution}, "
            f"density={self.requested_density:g}{target}, seed={self.seed}",
            fmt(head),
            fmt(tuple("-" * w for w in widths)),
        ]
        lines += [fmt(r) for r in rows[:-1]]
        lines += [fmt(tuple("-" * w for w in widths)), fmt(rows[-1])]
        if self.skipped:
            lines.append(f"left dense ({len(self.skipped)}):")
            lines += [f"  {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _sparse_class(module: nn.Module):
    for dense_cls, sparse_cls in _SPARSE_OF:
        if isinstance(module, dense_cls):
            return sparse_cls
    return None


def _default_exclusion(
    name: str, module: nn.Module, parents: dict[str, nn.Module], owners: dict[int, list[str]]
):
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "lazy layer not initialised yet (run one forward first)"
    parent = parents.get(name)
    if isinstance(parent, nn.MultiheadAttention):
        return "inside nn.MultiheadAttention (it reads the projection weights directly)"
    own = f"{name}.weight" if name else "weight"
    others = [n for n in owners.get(id(module.weight), []) if n != own]
    if others:
        return f"weight tied with {others[0]}"
    return None


def sparsify(
    model: nn.Module,
    method: str = "signin",
    density: float = 0.1,
    distribution: str = "erk",
    layout: str = "dense",
    filter: Callable[[str, nn.Module], bool] | None = None,
    beta: float = 1.0,
    seed: int = 0,
    block_shape: tuple[int, int] = (32, 32),
    dense_first_last: bool = False,
    mask: str | dict = "random",
    mask_scope: str | None = None,
    batch: tuple | None = None,
    loss_fn: Callable | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> SparsifyReport:
    """Replace every nn.Linear / nn.Conv1d / nn.Conv2d of ``model`` (in place) by its sparse layer.

    Args:
        model: any module; its replaced layers keep their weights, biases, device, dtype and mode.
        method: "static" | "signin" | "pilot" | "dense" (module docstring).
        density: overall fraction of active weights over the replaced layers, in (0, 1].
        distribution: how density spreads over layers: "uniform" | "er" | "erk".
        layout: "dense" | "block" | "csr" | "bsr" | "auto" for every replaced layer.
        filter: ``filter(name, module) -> bool`` selects the layers (after the default exclusions).
        beta: the m² − w² scale of signin / pilot.
        seed: mask seed (same seed, same masks).
        block_shape: blocks of the "block" / "bsr" layouts.
        dense_first_last: leave the first and the last selected layer dense (not replaced).
        mask: "random" | "magnitude" | "snip" | "synflow" or a dict layer name -> bool tensor (module
            docstring); static / signin only.
        mask_scope: "layer" | "global" for scored masks (None: "layer" for magnitude, else "global").
        batch: ``(inputs, targets)`` for SNIP (SynFlow reads only the input shape from it).
        loss_fn: ``loss_fn(output, targets)`` for SNIP (default: cross-entropy).
        input_shape: one sample's shape for SynFlow when no batch is given.
    Returns:
        a :class:`SparsifyReport` (per layer: name, type, shape, density, nnz).
    """
    density, block_shape = _check_args(model, method, density, distribution, layout, block_shape, filter,
                                       mask, mask_scope)
    _linears_from_hf_conv1d(model)

    report = SparsifyReport(method, density, distribution, layout, seed)
    parents: dict[str, nn.Module] = {}
    for pname, parent in model.named_modules():
        for cname, _ in parent.named_children():
            parents[f"{pname}.{cname}" if pname else cname] = parent
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)

    targets: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if is_sparse_layer(module) or _sparse_class(module) is None:
            continue
        why = _default_exclusion(name, module, parents, owners)
        if why is None and filter is not None and not filter(name, module):
            why = "excluded by filter"
        if why is None and not name:
            raise ValueError(
                "model itself is a Linear/Conv layer: wrap it in a container (nn.Sequential) "
                "or use SparseLinear.from_dense / SparseConv2d.from_dense"
            )
        if why is None:
            targets.append((name, module))
        else:
            report.skipped.append((name, why))
    if dense_first_last and targets:
        ends = [targets[0]] + ([targets[-1]] if len(targets) > 1 else [])
        for name, _ in ends:
            report.skipped.append((name, "dense_first_last"))
        targets = [t for t in targets if t not in ends]
    if not targets:
        return _nothing_to_replace(model, report)

    kind = SPARSIFY_METHODS[method]
    if isinstance(mask, dict):
        given = masks_mod.check_mask_dict(mask, {name: tuple(m.weight.shape) for name, m in targets})
        report.skipped += [(name, "no mask given") for name, _ in targets if name not in given]
        targets = [t for t in targets if t[0] in given]
        layer_masks = {name: given[name].to(m.weight.device) for name, m in targets}
    elif method in ("static", "signin") and density < 1.0:
        source = _Source(mask, mask_scope, batch, loss_fn, input_shape)
        layer_masks = _layer_masks(model, targets, source, density, distribution, layout, block_shape, seed)
    else:
        layer_masks = {name: None for name, _ in targets}

    for name, module in targets:
        mask = layer_masks[name]
        if mask is not None and layout not in ("csr", "bsr") and bool(mask.all()):
            mask = None  # a full layer (ERK can make small layers dense): no mask to apply
        cls = _sparse_class(module)
        new = cls.from_dense(
            module,
            kind=kind,
            mask=mask,
            density=density if method == "pilot" else 1.0,
            beta=beta,
            layout=layout,
            block_shape=block_shape,
            seed=seed,
        )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        report.layers.append(
            LayerReport(
                name=name,
                type=type(module).__name__,
                shape=tuple(module.weight.shape),
                numel=module.weight.numel(),
                nnz=new.nnz(),
                kind=kind,
                layout=layout,
                target_density=new.target_density,
            )
        )
    _warn_if_rounded(report, block_shape)
    return report


def _linears_from_hf_conv1d(model: nn.Module) -> None:
    """transformers' Conv1D (GPT-2) becomes the nn.Linear it is (weight transposed), every one of the model,
    also those then left dense; only when transformers is loaded (a model holding a Conv1D was built with
    it), so that sparsify never imports it."""
    if "transformers.pytorch_utils" in sys.modules:
        from ..integrations.hf.conv1d import linears_from_conv1d

        linears_from_conv1d(model)


def _nothing_to_replace(model: nn.Module, report: SparsifyReport) -> SparsifyReport:
    """No layer to replace: refused when the model has no Linear / Conv at all, a warning listing why each
    was skipped when it has some (none when it holds sparse layers already: sparsify again is a no-op)."""
    already = any(is_sparse_layer(m) for m in model.modules())
    if not report.skipped and not already:
        raise ValueError(f"model ({type(model).__name__}) has no nn.Linear / nn.Conv1d / nn.Conv2d to sparsify")
    if report.skipped and not already:
        warnings.warn(f"sparsify replaced no layer of {type(model).__name__}: every Linear / Conv was skipped ("
                      + "; ".join(f"{n}: {why}" for n, why in report.skipped) + ")", stacklevel=3)
    return report


def _warn_if_rounded(report: SparsifyReport, block_shape) -> None:
    """The block layouts keep whole blocks: say so when that moves the overall density by more than half
    a block per layer from the requested one."""
    if report.layout not in ("block", "bsr") or report.method == "pilot" or report.requested_density == 1.0:
        return
    slack = sum(min(block_shape[0], r.shape[0]) * min(block_shape[1], math.prod(r.shape[1:])) / 2
                for r in report.layers)
    if abs(report.nnz - report.requested_density * report.numel) > slack:
        warnings.warn(f"sparsify: density={report.requested_density:g} rounds to whole {tuple(block_shape)} blocks "
                      f"(at least one per layer): achieved density {report.density:.4f} over the replaced layers",
                      stacklevel=3)


def _check_args(model, method, density, distribution, layout, block_shape, filter, mask, mask_scope):
    """sparsify's argument checks (one line naming the argument); returns (density, block_shape)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_choice("method", method, SPARSIFY_METHODS)
    density = check_density(density)
    check_choice("distribution", distribution, masks_mod.DISTRIBUTIONS)
    check_choice("layout", layout, LAYOUTS)
    block_shape = check_block_shape(block_shape)
    if filter is not None and not callable(filter):
        raise TypeError(f"filter must be callable (name, module) -> bool, got {type(filter).__name__}")
    if not isinstance(mask, dict):
        check_choice("mask", mask, masks_mod.SOURCES)
    if mask_scope is not None:
        check_choice("mask_scope", mask_scope, masks_mod.SCOPES)
        if mask_scope == "global" and layout in ("block", "bsr"):
            raise ValueError(f"mask_scope='global' is not available on layout={layout!r}: the block layouts score "
                             "whole blocks per layer (use mask_scope='layer')")
    if (isinstance(mask, dict) or mask != "random") and method not in ("static", "signin"):
        raise ValueError(f"mask={_short(mask)} needs method 'static' or 'signin' (a fixed mask), got {method!r}")
    if method == "pilot" and layout in ("block", "csr", "bsr"):
        raise ValueError(
            f"method='pilot' trains dense until pruned: layout must be 'dense' or 'auto', got {layout!r}"
        )
    return density, block_shape


def _short(mask) -> str:
    return "a dict of masks" if isinstance(mask, dict) else repr(mask)


@dataclass
class _Source:
    """Where scored masks come from (sparsify's mask, mask_scope, batch, loss_fn, input_shape)."""

    name: str
    scope: str | None
    batch: tuple | None
    loss_fn: Callable | None
    input_shape: tuple[int, ...] | None

    def scores(self, model: nn.Module, targets: list[tuple[str, nn.Module]], density: float) -> dict[str, torch.Tensor]:
        names = [name for name, _ in targets]
        if self.name == "magnitude":
            return {name: module.weight.detach().abs() for name, module in targets}
        if self.name == "snip":
            if self.batch is None:
                raise ValueError("mask='snip' needs a batch (inputs, targets) to score the weights on")
            return masks_mod.snip_scores(model, names, self.batch, self.loss_fn)
        shape = self.input_shape
        if shape is None and self.batch is not None:
            shape = tuple(self.batch[0].shape[1:])
        if shape is None:
            first = targets[0][1]
            if not isinstance(first, nn.Linear):
                raise ValueError("mask='synflow' needs input_shape (or a batch) when the first layer is not a Linear")
            shape = (first.in_features,)
        # iterative SynFlow: the scores are recomputed while a global mask tightens to ``density``
        return masks_mod.synflow_scores(model, names, shape, density=density)


def _layer_masks(model, targets, source: _Source, density, distribution, layout, block_shape, seed):
    """name -> initial mask of every target layer (random, or from the scores of ``source``)."""
    shapes = {name: tuple(module.weight.shape) for name, module in targets}
    scores = None if source.name == "random" else source.scores(model, targets, density)
    if layout in ("block", "bsr"):
        per_layer = masks_mod.layer_densities(shapes, density, distribution)
        out = {}
        for i, (name, shape) in enumerate(shapes.items()):
            nbr, nbc = (-(-shape[0] // block_shape[0]), -(-math.prod(shape[1:]) // block_shape[1]))
            d = max(per_layer[name], 1.0 / (nbr * nbc))  # at least one block per layer
            out[name] = (masks_mod.block_mask(shape, block_shape, d, seed=seed + i) if scores is None
                         else masks_mod.magnitude_block_mask(scores[name], block_shape, d))
        return out
    if scores is None:
        return masks_mod.random_masks(shapes, density, distribution, seed=seed)
    scope = source.scope or ("layer" if source.name == "magnitude" else "global")
    return masks_mod.score_masks(scores, density, scope, distribution)
