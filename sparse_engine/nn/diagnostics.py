"""Per-layer training diagnostics of a sparse model: what the Sign-In and PILoT papers watch.

* density: fraction of the weight that trains;
* sign flips of θ since the previous call (Sign-In's point is that these happen; with β → 0 they stop);
* β = m² − w² over the trained coordinates (mean/min/max): training erodes it, a reset restores it;
* ‖θ‖₁ (PILoT drives it down).

``layer_stats`` remembers the signs of each layer's θ between calls (in the layer's parameterization),
so call it at the points you compare, e.g. once per epoch.

A model sharded with FSDP2 (``fully_shard``: m and w are DTensor shards) gets the same numbers: each rank
measures its local shard and the counts, sums, minima and maxima are reduced over the ranks (three
all-reduces for the whole model), so ``layer_stats`` is then a collective that every rank calls.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import distributed
from ..distributed.collectives import min_max_over_ranks
from ..param import sparse_layers

_COLUMNS = (
    "name",
    "kind",
    "layout",
    "shape",
    "density",
    "nnz",
    "sign_flips",
    "beta_mean",
    "beta_min",
    "beta_max",
    "l1",
)


def layer_stats(model: nn.Module) -> list[dict]:
    """One dict per sparse layer (a module holding a Parameterization as ``.param``), in module order.

    Keys: name, type, kind, layout, shape, numel, nnz, density, sign_flips (since the last call; 0 on
    the first), l1 (‖θ‖₁), beta_mean / beta_min / beta_max (factored kinds only, else None) and
    target_density (PILoT's pruning target, else None).
    """
    layers = sparse_layers(model)
    sharded = any(distributed.is_sharded(module.param.w) for _, module in layers)
    local = _sharded_diagnostics([module.param for _, module in layers]) if sharded else None
    out = []
    for i, (name, module) in enumerate(layers):
        param = module.param
        d = local[i] if sharded else param.diagnostics()
        numel = math.prod(param.weight_shape)
        nnz = module.nnz() if hasattr(module, "nnz") else round(d["density"] * numel)
        out.append(
            {
                "name": name,
                "type": layer_type(module),
                "kind": param.kind,
                "layout": getattr(module, "resolved_layout", None) or param.layout,
                "shape": tuple(param.weight_shape),
                "numel": numel,
                "nnz": nnz,
                "density": nnz / numel,
                "sign_flips": int(d["sign_flips"]),
                "l1": float(d["l1"]),
                "beta_mean": d.get("beta_mean"),
                "beta_min": d.get("beta_min"),
                "beta_max": d.get("beta_max"),
                "target_density": getattr(module, "target_density", None),
            }
        )
    return out


def layer_type(module: nn.Module) -> str:
    """The class name of a layer; for one sharded by FSDP2 (which swaps its class for a subclass
    ``FSDP<name>`` of ``FSDPModule`` and the layer's class) the layer's own."""
    cls = type(module)
    if len(cls.__bases__) == 2 and cls.__bases__[0].__name__ == "FSDPModule":
        cls = cls.__bases__[1]
    return cls.__name__


@torch.no_grad()
def _sharded_diagnostics(params: list) -> list[dict]:
    """``Parameterization.diagnostics()`` of every layer of an FSDP2 model, from the local shards: flips,
    ‖θ‖₁ and the β sum / count summed over the ranks, β min / max reduced over them."""
    sums, extremes, out = [], [], []
    for param in params:
        values = param.local_values()
        sign = torch.sign(values).to(torch.int8)
        last = param._last_sign
        flips = 0 if last is None or last.shape != sign.shape else int(((sign * last) < 0).sum())
        param._last_sign = sign
        beta_sum, count, lo, hi = 0.0, 0, math.inf, -math.inf
        if param.factored:
            m, w = distributed.local(param.m), distributed.local(param.w)
            beta = m.double() ** 2 - w.double() ** 2
            active = distributed.local_rows(param.step_mask(), param.w)
            beta = beta if active is None else beta[active]
            if beta.numel():
                beta_sum, count, lo, hi = float(beta.sum()), beta.numel(), float(beta.min()), float(beta.max())
        sums += [flips, float(values.abs().sum(dtype=torch.float64)), beta_sum, count]
        extremes += [-lo, hi]
        out.append({"density": param.density()})
    total = distributed.sum_over_ranks(sums).reshape(-1, 4).tolist()
    _, top = min_max_over_ranks(torch.tensor(extremes, dtype=torch.float64))
    top = top.reshape(-1, 2).tolist()
    for d, param, (flips, l1, beta_sum, count), (neg_lo, hi) in zip(out, params, total, top):
        d.update(sign_flips=int(flips), l1=l1)
        if param.factored and count:
            d.update(beta_mean=beta_sum / count, beta_min=-neg_lo, beta_max=hi)
    return out


def summary(model_or_stats) -> dict:
    """Totals over the sparse layers: layers, numel, nnz, density, sign_flips, l1, and β mean (weighted by
    nnz) / min / max over the factored layers. Takes a model (calls :func:`layer_stats`, which advances
    the sign-flip reference) or a list that ``layer_stats`` returned."""
    stats = layer_stats(model_or_stats) if isinstance(model_or_stats, nn.Module) else list(model_or_stats)
    numel = sum(s["numel"] for s in stats)
    nnz = sum(s["nnz"] for s in stats)
    factored = [s for s in stats if s.get("beta_mean") is not None]
    weight = sum(s["nnz"] for s in factored)
    out = {
        "layers": len(stats),
        "numel": numel,
        "nnz": nnz,
        "density": nnz / numel if numel else 0.0,
        "sign_flips": sum(s["sign_flips"] for s in stats),
        "l1": sum(s["l1"] for s in stats),
        "beta_mean": None,
        "beta_min": None,
        "beta_max": None,
    }
    if factored:
        out["beta_min"] = min(s["beta_min"] for s in factored)
        out["beta_max"] = max(s["beta_max"] for s in factored)
        out["beta_mean"] = (
            sum(s["beta_mean"] * s["nnz"] for s in factored) / weight
            if weight
            else sum(s["beta_mean"] for s in factored) / len(factored)
        )
    return out


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)


def format_table(stats: list[dict], columns: tuple[str, ...] = _COLUMNS) -> str:
    """A plain-text table of :func:`layer_stats` rows plus a totals line."""
    rows = [[_cell(s.get(c)) for c in columns] for s in stats]
    if stats:
        tot = summary(stats)
        total_row = {
            "name": "total",
            "density": tot["density"],
            "nnz": tot["nnz"],
            "sign_flips": tot["sign_flips"],
            "beta_mean": tot["beta_mean"],
            "beta_min": tot["beta_min"],
            "beta_max": tot["beta_max"],
            "l1": tot["l1"],
        }
        rows.append([_cell(total_row.get(c)) if c in total_row else "" for c in columns])
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    numeric = [c not in ("name", "kind", "layout", "shape") for c in columns]

    def fmt(cells) -> str:
        return "  ".join(x.rjust(w) if n else x.ljust(w) for x, w, n in zip(cells, widths, numeric)).rstrip()

    lines = [fmt(columns), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in rows[:-1]] if stats else []
    if stats:
        lines += [fmt(["-" * w for w in widths]), fmt(rows[-1])]
    return "\n".join(lines)
