"""Sign-In against random pruning at initialisation (static mask), same mask and same init.

    python bench/experiments/signin_vs_static.py            # default: see SETTINGS (about 25-35 min, 2 cores)
    python bench/experiments/signin_vs_static.py --quick    # smoke test (seconds)

For each model (MLP = LeNet-300-100, CNN = small ResNet) on Fashion-MNIST, each sparsity and each seed,
both methods start from the same seeded dense init and the same ERK random mask; Sign-In trains
θ = m ⊙ w (β = 1, reset every epoch, momentum state transformed) and static trains θ directly.
Records final test accuracy and the sign flips of θ per layer per epoch (sign changes between
consecutive end-of-epoch checks). Writes signin_vs_static.json and signin_vs_static.png.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from _common import (TrainConfig, add_output_options, dataset, environment, exceeds_spread, finish, mean_std,
                     parser, record, run, save_fig, seeds_of, write_json)

#: model -> (n_train, n_test, epochs, batch, lr): sized to fit the CPU budget (subsets of Fashion-MNIST).
SETTINGS = {"mlp": (20000, 10000, 10, 128, 0.05), "cnn": (2000, 1000, 3, 128, 0.05)}
QUICK = {"mlp": (1000, 500, 2, 128, 0.05), "cnn": (256, 256, 1, 64, 0.05)}
SPARSITIES = (0.80, 0.90, 0.95, 0.98)
METHODS = ("static", "signin")


def main(argv=None) -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--sparsities", nargs="+", type=float, default=None)
    p.add_argument("--epochs", type=int, default=None, help="override the epochs of every model")
    p.add_argument("--n-train", type=int, default=None, help="override the training subset of every model")
    p.add_argument("--n-test", type=int, default=None, help="override the test subset of every model")
    p.add_argument("--signin-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Sign-In option (beta, reset_every, reset_policy, factor_lr_scale, ...)")
    add_output_options(p, "signin_vs_static", "the runs of these result files (e.g. one per model, run in parallel)")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args)
    seeds = seeds_of(args)
    sparsities = args.sparsities or ([0.9, 0.98] if args.quick else list(SPARSITIES))
    extra = {}
    for kv in args.signin_option:
        k, _, v = kv.partition("=")
        extra[k] = v if k in ("reset_policy", "reset_unit") else (int(v) if k == "reset_every" else float(v))
    out = {"experiment": args.name, "quick": args.quick, "seeds": seeds, "sparsities": sparsities,
           "signin_options": extra, "environment": environment(), "settings": {}, "runs": [], "summary": {}}
    path = args.out / f"{args.name}.json"
    for model in args.models:
        n_train, n_test, epochs, batch, lr = (QUICK if args.quick else SETTINGS)[model]
        epochs = args.epochs or epochs
        n_train, n_test = args.n_train or n_train, args.n_test or n_test
        out["settings"][model] = {"n_train": n_train, "n_test": n_test, "epochs": epochs, "batch_size": batch,
                                  "lr": lr, "momentum": 0.9, "weight_decay": 5e-4, "distribution": "erk"}
        ds = dataset(model, n_train, n_test)
        for sparsity in sparsities:
            for seed in seeds:
                for method in METHODS:
                    cfg = TrainConfig(model=model, method=method, density=round(1 - sparsity, 6), epochs=epochs,
                                      batch_size=batch, lr=lr, seed=seed, threads=args.threads, progress=False)
                    if method == "signin":
                        cfg = dataclasses.replace(cfg, **{k: v for k, v in extra.items()})
                    record(out, path, run(cfg, ds, per_layer_flips=True),
                           f"{model} sparsity {sparsity:.2f} seed {seed} {method}",
                           model=model, sparsity=sparsity, seed=seed, method=method)
            summarize(out, model, sparsity)
            write_json(path, out)
    return finish(args, out, plot, table, f"{args.name}.png")


def merge(args) -> int:
    parts = [json.loads(Path(f).read_text()) for f in args.merge]
    out = {"experiment": args.name, "quick": any(p["quick"] for p in parts), "seeds": parts[0]["seeds"],
           "sparsities": parts[0]["sparsities"], "signin_options": parts[0]["signin_options"],
           "environment": parts[0]["environment"], "merged_from": [str(f) for f in args.merge],
           "environments": [p["environment"] for p in parts], "settings": {}, "runs": [], "summary": {}}
    for part in parts:
        if part["signin_options"] != out["signin_options"]:
            raise SystemExit(f"--merge: files differ in signin_options: {part['signin_options']} vs {out['signin_options']}")
        out["settings"].update(part["settings"])
        out["runs"] += part["runs"]
    for model in out["settings"]:
        for sparsity in sorted({r["sparsity"] for r in out["runs"] if r["model"] == model}):
            summarize(out, model, sparsity)
    write_json(args.out / f"{args.name}.json", out)
    return finish(args, out, plot, table, f"{args.name}.png")


def summarize(out: dict, model: str, sparsity: float) -> None:
    rows = [r for r in out["runs"] if r["model"] == model and r["sparsity"] == sparsity]
    s = {}
    for method in METHODS:
        rs = [r for r in rows if r["method"] == method]
        s[method] = mean_std([100 * r["final"]["test_acc"] for r in rs])
        s[method + "_flips"] = mean_std([sum(e["sign_flips"] for e in r["epochs"]) for r in rs])
    diffs = [100 * (a["final"]["test_acc"] - b["final"]["test_acc"])
             for a in rows if a["method"] == "signin" for b in rows if b["method"] == "static" and b["seed"] == a["seed"]]
    s["paired_diff"] = mean_std(diffs)
    s["exceeds_spread"] = exceeds_spread(s["signin"], s["static"])
    out["summary"][f"{model}@{sparsity:g}"] = s


def table(out: dict) -> str:
    lines = ["model  sparsity  static acc %       signin acc %       diff (paired)     > spread  flips static/signin"]
    for key, s in out["summary"].items():
        model, sp = key.split("@")
        lines.append(f"{model:<6} {float(sp):>8.2f}  {s['static']['mean']:6.2f} ± {s['static']['std']:<5.2f}    "
                     f"{s['signin']['mean']:6.2f} ± {s['signin']['std']:<5.2f}    "
                     f"{s['paired_diff']['mean']:+5.2f} ± {s['paired_diff']['std']:<5.2f}    "
                     f"{'yes' if s['exceeds_spread'] else 'no':<8}  "
                     f"{s['static_flips']['mean']:.0f} / {s['signin_flips']['mean']:.0f}")
    return "\n".join(lines)


def plot(plt, out: dict, path) -> None:
    models = list(out["settings"])
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 7), squeeze=False)
    for j, model in enumerate(models):
        ax = axes[0][j]
        for method, color in zip(METHODS, ("tab:blue", "tab:red")):
            keys = [k for k in out["summary"] if k.startswith(model + "@")]
            xs = [100 * float(k.split("@")[1]) for k in keys]
            ms = [out["summary"][k][method]["mean"] for k in keys]
            ss = [out["summary"][k][method]["std"] for k in keys]
            ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=method, color=color)
        ax.set_title(f"{model}: test accuracy (mean ± std, {len(out['seeds'])} seeds)")
        ax.set_xlabel("sparsity %")
        ax.set_ylabel("test accuracy %")
        ax.legend()
        # sign flips per layer per epoch at the highest common sparsity, seed of the first run
        ax = axes[1][j]
        runs = [r for r in out["runs"] if r["model"] == model and r["seed"] == out["seeds"][0]]
        if runs:
            sp = sorted({r["sparsity"] for r in runs})[len({r["sparsity"] for r in runs}) // 2]
            for r in runs:
                if r["sparsity"] != sp:
                    continue
                style = "-" if r["method"] == "signin" else "--"
                layers = list(r["epochs"][0]["flips_per_layer"])
                for li, layer in enumerate(layers):
                    ys = [e["flips_per_layer"][layer] for e in r["epochs"]]
                    ax.plot(range(1, len(ys) + 1), ys, style, color=plt.cm.viridis(li / max(len(layers) - 1, 1)),
                            label=f"{r['method']} {layer}" if len(layers) <= 4 else None)
            ax.set_yscale("symlog", linthresh=1)
            ax.set_title(f"{model} @ {100 * sp:.0f}%: sign flips per layer per epoch\n(solid: signin, dashed: static; "
                         "colour: layer depth)", fontsize=9)
            ax.set_xlabel("epoch")
            ax.set_ylabel("sign flips")
            if any(ax.get_legend_handles_labels()[1]):
                ax.legend(fontsize=6)
    save_fig(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
