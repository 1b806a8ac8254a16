"""PILoT (β = 1, α controller) against the spred-style start (β = 0) and against dense training, each
followed by one-shot global magnitude pruning without retraining (the papers' protocol).

    python bench/experiments/pilot_oneshot.py            # default (about 8-12 min on 2 cores)
    python bench/experiments/pilot_oneshot.py --quick    # smoke test (seconds)

Each seed trains once per method (LeNet-300-100 on a Fashion-MNIST subset, same seeded init); the
trained θ (m ⊙ w for PILoT / spred, the weight for dense) is then pruned by one global magnitude
threshold over all Linear weights at every sparsity of SPARSITIES and the test accuracy measured.
PILoT is run at two initial α of the paper's range. spred: the PILoT method with every layer
re-factored to β = 0 (m = |w| = sqrt|θ|) before training; β = 0 is conserved (m = ±w stays so under the
gradient, momentum and weight decay alike), so no weight can change sign. Writes pilot_oneshot.json and
pilot_oneshot.png.
"""
from __future__ import annotations

import copy

import torch
from _common import (TrainConfig, dataset, environment, exceeds_spread, finish, log, mean_std, parser, run,
                     save_fig, seeds_of, write_json)
from torch import nn

from sparse_engine.masks import magnitude_masks
from sparse_engine.optim import parameterizations
from sparse_engine.app.loop import evaluate

SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)
#: variant -> (method, options, β = 0 start)
VARIANTS = {
    "dense+prune": ("dense", {}, False),
    "pilot a=1e-4": ("pilot", {"alpha": 1e-4}, False),
    "pilot a=1e-3": ("pilot", {"alpha": 1e-3}, False),
    "spred (b=0) a=1e-3": ("pilot", {"alpha": 1e-3}, True),
}
SETTINGS = {"n_train": 20000, "n_test": 10000, "epochs": 10, "batch_size": 128, "lr": 0.05}
QUICK = {"n_train": 1000, "n_test": 500, "epochs": 2, "batch_size": 128, "lr": 0.05}


@torch.no_grad()
def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The effective weight of every Linear / Conv layer: θ = M ⊙ m ⊙ w where parameterized."""
    pz = dict(parameterizations(model))
    out = {}
    for name, mod in model.named_modules():
        if name in pz:
            out[name] = pz[name].theta().detach().clone()
        elif isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            out[name] = mod.weight.detach().clone()
    return out


@torch.no_grad()
def pruned_accuracy(model: nn.Module, density: float, x, y) -> float:
    """Test accuracy after one global magnitude prune of all weights to ``density`` (no retraining)."""
    pruned = copy.deepcopy(model)
    masks = magnitude_masks({k: v.abs() for k, v in weights(pruned).items()}, density, scope="global")
    pz = dict(parameterizations(pruned))
    for name, mod in pruned.named_modules():
        if name in masks:
            if name in pz:
                old = pz[name].dense_mask()
                pz[name].set_mask(masks[name] if old is None else masks[name] & old)
            else:
                mod.weight.mul_(masks[name].to(mod.weight.dtype))
    return evaluate(pruned, x, y)[1]


def main(argv=None) -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=None)
    args = p.parse_args(argv)
    seeds = seeds_of(args)
    st = {**(QUICK if args.quick else SETTINGS), **({"epochs": args.epochs} if args.epochs else {})}
    sparsities = [0.5, 0.9] if args.quick else list(SPARSITIES)
    out = {"experiment": "pilot_oneshot", "quick": args.quick, "seeds": seeds, "sparsities": sparsities,
           "settings": {**st, "model": "mlp", "momentum": 0.9, "weight_decay": 5e-4, "prune": "global magnitude",
                        "alpha_schedule": "controller (delta 1.2, target 0.5 x initial L1)"},
           "variants": {k: {"method": v[0], "options": v[1], "beta0_start": v[2]} for k, v in VARIANTS.items()},
           "environment": environment(), "runs": [], "summary": {}}
    path = args.out / "pilot_oneshot.json"
    ds = dataset("mlp", st["n_train"], st["n_test"])
    for seed in seeds:
        for name, (method, opts, beta0) in VARIANTS.items():
            cfg = TrainConfig(model="mlp", method=method, density=1.0 if method == "dense" else 0.1,
                              epochs=st["epochs"], batch_size=st["batch_size"], lr=st["lr"], seed=seed,
                              threads=args.threads, progress=False, **opts)

            def before(model, m, beta0=beta0):
                if beta0:
                    for _, pz in parameterizations(model):
                        pz.reset(0.0)

            def after(model, m, result):
                result["dense_test_acc"] = evaluate(model, ds.x_test, ds.y_test)[1]
                result["pruned"] = {f"{s:g}": pruned_accuracy(model, round(1 - s, 6), ds.x_test, ds.y_test)
                                    for s in sparsities}
                result["l1"] = float(sum(w.abs().sum() for w in weights(model).values()))
                if hasattr(m, "alpha_schedule"):
                    result["alpha_history"] = list(m.alpha_schedule.history)

            r = run(cfg, ds, before_training=before, after_training=after)
            log(f"seed {seed} {name}: dense {100 * r['dense_test_acc']:.2f}% pruned "
                + " ".join(f"{k}:{100 * v:.1f}" for k, v in r["pruned"].items()) + f" ({r['time_s']:.0f}s)")
            out["runs"].append({"variant": name, "seed": seed, "dense_test_acc": r["dense_test_acc"],
                                "pruned": r["pruned"], "l1": r["l1"], "alpha_history": r.get("alpha_history"),
                                "epochs": r["epochs"], "signs_changed_vs_init": sum(r["signs_changed_vs_init"].values()),
                                "time_s": r["time_s"]})
            write_json(path, out)
    for name in VARIANTS:
        rs = [r for r in out["runs"] if r["variant"] == name]
        out["summary"][name] = {"unpruned": mean_std([100 * r["dense_test_acc"] for r in rs]),
                                **{s: mean_std([100 * r["pruned"][s] for r in rs]) for s in rs[0]["pruned"]}}
    best_pilot = "pilot a=1e-3"
    out["pilot_vs"] = {other: {s: exceeds_spread(out["summary"][best_pilot][s], out["summary"][other][s])
                               for s in out["summary"][other] if s != "unpruned"}
                       for other in ("dense+prune", "spred (b=0) a=1e-3")}
    write_json(path, out)
    return finish(args, out, plot, table, "pilot_oneshot.png")


def table(out: dict) -> str:
    names = list(out["summary"])
    keys = ["unpruned"] + [f"{s:g}" for s in out["sparsities"]]
    lines = ["sparsity  " + "  ".join(f"{n:>20}" for n in names)]
    for k in keys:
        lines.append(f"{k:>8}  " + "  ".join(f"{out['summary'][n][k]['mean']:>11.2f} ± {out['summary'][n][k]['std']:<6.2f}"
                                             for n in names))
    return "\n".join(lines)


def plot(plt, out: dict, path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = [100 * s for s in out["sparsities"]]
    for name, s in out["summary"].items():
        ms = [s[f"{sp:g}"]["mean"] for sp in out["sparsities"]]
        ss = [s[f"{sp:g}"]["std"] for sp in out["sparsities"]]
        ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=name)
    ax.set_xlabel("sparsity after one-shot global magnitude prune %")
    ax.set_ylabel("test accuracy % (no retraining)")
    ax.set_title(f"MLP / Fashion-MNIST, mean ± std over {len(out['seeds'])} seeds", fontsize=10)
    ax.legend(fontsize=8)
    save_fig(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
