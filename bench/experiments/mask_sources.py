"""Masks that move and masks from data, with and without Sign-In; gradual magnitude pruning against PILoT.

    python bench/experiments/mask_sources.py            # default: see SETTINGS (MLP: full training set)
    python bench/experiments/mask_sources.py --quick    # smoke test (seconds, meaningless numbers)
    python bench/experiments/mask_sources.py --models cnn --sparsities 0.9 0.98 --conditions static signin rigl rigl+signin

Each condition trains from the same seeded dense init (and, for the random-mask conditions, the same ERK
mask of a seed) and is paired with its Sign-In variant:

    static / signin                 random ERK mask, fixed
    rigl / rigl+signin              RigL (drop by magnitude, grow by gradient magnitude, cosine drop fraction)
    acdc / acdc+signin              alternating dense and sparse phases of 200 steps, sparse at the end
    snip / snip+signin              SNIP mask scored on the first batch, fixed
    synflow / synflow+signin        SynFlow mask (data-free), fixed
    gmp / pilot                     dense-to-sparse: cubic gradual magnitude pruning vs PILoT's prune

Records the test accuracy of what each run ships (after PILoT's final prune) and, per epoch, sign flips,
mean β of the m ⊙ w layers (after that epoch's Sign-In reset) and the mask updates / regrown weights of
the dynamic methods. A difference counts as beyond the seed spread
when |mean_a − mean_b| > std_a + std_b. Writes <name>.json and <name>.png.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from _common import (TrainConfig, add_output_options, dataset, environment, exceeds_spread, finish, mean_std,
                     parser, record, run, save_fig, seeds_of, write_json)

#: model -> (n_train, n_test, epochs, batch, lr); None: the whole split.
SETTINGS = {"mlp": (None, None, 3, 128, 0.1), "cnn": (10000, 2000, 3, 128, 0.05)}
QUICK = {"mlp": (1000, 500, 2, 128, 0.1), "cnn": (256, 256, 1, 64, 0.05)}
SPARSITIES = (0.90, 0.95, 0.98)

#: condition -> TrainConfig fields (besides model, density, seed and the settings above).
CONDITIONS = {
    "static": {"method": "static"},
    "signin": {"method": "signin"},
    "rigl": {"method": "static", "dynamic": "rigl"},
    "rigl+signin": {"method": "signin", "dynamic": "rigl"},
    "acdc": {"method": "acdc", "acdc_phase": 200, "acdc_unit": "step"},
    "acdc+signin": {"method": "acdc", "acdc_phase": 200, "acdc_unit": "step", "signin": True},
    "snip": {"method": "static", "mask": "snip"},
    "snip+signin": {"method": "signin", "mask": "snip"},
    "synflow": {"method": "static", "mask": "synflow"},
    "synflow+signin": {"method": "signin", "mask": "synflow"},
    "gmp": {"method": "gmp"},
    "pilot": {"method": "pilot"},
}
#: (baseline, variant) pairs compared in the summary: the variant minus the baseline, paired by seed.
#: --quick trains a few dozen steps: mask updates and prunes every few steps so that they happen at all.
QUICK_STEPS = {"update_every": 4, "prune_every": 4, "acdc_phase": 4}
#: the CNN's runs are 80 steps long: a mask update every 10 steps (until 75 % of training) instead of 100
MODEL_STEPS = {"mlp": {}, "cnn": {"update_every": 10}}
PAIRS = (("static", "signin"), ("rigl", "rigl+signin"), ("acdc", "acdc+signin"), ("snip", "snip+signin"),
         ("synflow", "synflow+signin"), ("pilot", "gmp"), ("static", "rigl"), ("signin", "rigl+signin"))


def main(argv=None) -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["mlp"], choices=list(SETTINGS))
    p.add_argument("--sparsities", nargs="+", type=float, default=None)
    p.add_argument("--conditions", nargs="+", default=None, choices=list(CONDITIONS))
    p.add_argument("--epochs", type=int, default=None, help="override the epochs of every model")
    p.add_argument("--n-train", type=int, default=None, help="override the training subset of every model")
    add_output_options(p, "mask_sources", "the runs of these result files (e.g. one per sparsity and seed)")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args)
    seeds = seeds_of(args)
    sparsities = args.sparsities or ([0.9] if args.quick else list(SPARSITIES))
    conditions = args.conditions or list(CONDITIONS)
    out = {"experiment": args.name, "quick": args.quick, "seeds": seeds, "sparsities": sparsities,
           "conditions": {c: CONDITIONS[c] for c in conditions}, "environment": environment(), "settings": {},
           "runs": [], "summary": {}}
    path = args.out / f"{args.name}.json"
    for model in args.models:
        n_train, n_test, epochs, batch, lr = (QUICK if args.quick else SETTINGS)[model]
        epochs, n_train = args.epochs or epochs, args.n_train or n_train
        ds = dataset(model, n_train, n_test)
        out["settings"][model] = {"n_train": ds.n_train, "n_test": ds.n_test, "epochs": epochs, "batch_size": batch,
                                  "lr": lr, "momentum": 0.9, "weight_decay": 5e-4, "distribution": "erk"}
        for sparsity in sparsities:
            for seed in seeds:
                for name in conditions:  # interleaved: a slow spell of the machine hits every condition alike
                    cfg = TrainConfig(model=model, density=round(1 - sparsity, 6), epochs=epochs, batch_size=batch,
                                      lr=lr, seed=seed, threads=args.threads, progress=False)
                    steps = QUICK_STEPS if args.quick else MODEL_STEPS[model]
                    cfg = dataclasses.replace(cfg, **{**CONDITIONS[name], **steps})
                    record(out, path, run(cfg, ds), f"{model} sparsity {sparsity:.2f} seed {seed} {name}",
                           model=model, sparsity=sparsity, seed=seed, condition=name)
            summarize(out, model, sparsity)
            write_json(path, out)
    return finish(args, out, plot, table, f"{args.name}.png")


def merge(args) -> int:
    parts = [json.loads(Path(f).read_text()) for f in args.merge]
    out = {"experiment": args.name, "quick": any(p["quick"] for p in parts),
           "seeds": sorted({seed for p in parts for seed in p["seeds"]}),
           "sparsities": sorted({s for p in parts for s in p["sparsities"]}),
           "conditions": {k: v for p in parts for k, v in p["conditions"].items()},
           "environment": parts[0]["environment"], "environments": [p["environment"] for p in parts],
           "settings": {}, "runs": [], "summary": {}}
    for part in parts:
        out["settings"].update(part["settings"])
        out["runs"] += part["runs"]
    for model in out["settings"]:
        for sparsity in sorted({r["sparsity"] for r in out["runs"] if r["model"] == model}):
            summarize(out, model, sparsity)
    write_json(args.out / f"{args.name}.json", out)
    return finish(args, out, plot, table, f"{args.name}.png")


def _acc(r: dict) -> float:
    """The test accuracy of what the run ships: after the method's end of training (PILoT's prune)."""
    return r["final"].get("test_acc_end", r["final"]["test_acc"])


def _total(r: dict, key: str) -> float:
    return sum(e.get(key) or 0 for e in r["epochs"])


def summarize(out: dict, model: str, sparsity: float) -> None:
    rows = [r for r in out["runs"] if r["model"] == model and r["sparsity"] == sparsity]
    s: dict = {"conditions": {}, "pairs": {}}
    for name in [c for c in CONDITIONS if any(r["condition"] == c for r in rows)]:
        rs = [r for r in rows if r["condition"] == name]
        last = [r["epochs"][-1] for r in rs]
        s["conditions"][name] = {
            "test_acc": mean_std([100 * _acc(r) for r in rs]),
            "sign_flips": mean_std([_total(r, "sign_flips") for r in rs]),
            "beta_mean": mean_std([e["beta_mean"] for e in last if e.get("beta_mean") is not None]),
            "regrown": mean_std([e["regrown"] for e in last if e.get("regrown") is not None]),
        }
    for a, b in PAIRS:
        if a in s["conditions"] and b in s["conditions"]:
            acc = {r["seed"]: 100 * _acc(r) for r in rows if r["condition"] == a}
            diffs = [100 * _acc(r) - acc[r["seed"]] for r in rows
                     if r["condition"] == b and r["seed"] in acc]
            s["pairs"][f"{b} - {a}"] = {"diff": mean_std(diffs), "exceeds_spread": exceeds_spread(
                s["conditions"][a]["test_acc"], s["conditions"][b]["test_acc"])}
    out["summary"][f"{model}@{sparsity:g}"] = s


def table(out: dict) -> str:
    lines = []
    for key, s in out["summary"].items():
        model, sp = key.split("@")
        lines.append(f"\n{model}, sparsity {float(sp):.2f}\n"
                     "condition          test acc %       sign flips   mean β   regrown")
        for name, c in s["conditions"].items():
            beta = f"{c['beta_mean']['mean']:.3f}" if c["beta_mean"]["n"] else "-"
            regrown = f"{c['regrown']['mean']:.0f}" if c["regrown"]["n"] else "-"
            lines.append(f"{name:<16} {c['test_acc']['mean']:6.2f} ± {c['test_acc']['std']:<5.2f}  "
                         f"{c['sign_flips']['mean']:>10.0f}  {beta:>7}  {regrown:>8}")
        for pair, d in s["pairs"].items():
            lines.append(f"  {pair:<28} {d['diff']['mean']:+5.2f} ± {d['diff']['std']:.2f} (paired)  "
                         f"{'beyond' if d['exceeds_spread'] else 'within'} the seed spread")
    return "\n".join(lines)


def plot(plt, out: dict, path) -> None:
    models = list(out["settings"])
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        keys = [k for k in out["summary"] if k.startswith(model + "@")]
        names = list(dict.fromkeys(n for k in keys for n in out["summary"][k]["conditions"]))
        width = 0.8 / max(len(keys), 1)
        for j, key in enumerate(keys):
            conds = out["summary"][key]["conditions"]
            ms = [conds[n]["test_acc"]["mean"] if n in conds else float("nan") for n in names]
            ss = [conds[n]["test_acc"]["std"] if n in conds else 0.0 for n in names]
            ax.bar([i + j * width for i in range(len(names))], ms, width, yerr=ss, capsize=2,
                   label=f"{100 * float(key.split('@')[1]):.0f}% sparse")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=45, ha="right", fontsize=7)
        lo = min((out["summary"][k]["conditions"][n]["test_acc"]["mean"] for k in keys
                  for n in out["summary"][k]["conditions"]), default=0)
        ax.set_ylim(max(lo - 5, 0), None)
        st = out["settings"][model]
        ax.set_title(f"{model} / Fashion-MNIST ({st['n_train']} train, {st['epochs']} epochs): test accuracy, "
                     f"mean ± std over {len(out['seeds'])} seeds", fontsize=8)
        ax.legend(fontsize=7)
    save_fig(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
