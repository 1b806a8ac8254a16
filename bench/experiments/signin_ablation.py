"""Sign-In ablation: reset period, optimizer-state policy at a reset (keep / zero / transform), and the
two knobs the papers leave open that most change the dynamics (β and the learning rate of m ⊙ w).

    python bench/experiments/signin_ablation.py            # default (about 15-20 min on 2 cores)
    python bench/experiments/signin_ablation.py --quick    # smoke test (seconds)

LeNet-300-100 on a Fashion-MNIST subset at 90 % sparsity (ERK random mask), same seeded init and mask
for every condition; static (random PaI) is the reference. The library's defaults are reset every
epoch with the "transform" policy, β = 1, factor lr scale 1. Writes signin_ablation.json and .png.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from _common import (TrainConfig, add_output_options, dataset, environment, exceeds_spread, finish, log, mean_std,
                     parser, run, save_fig, seeds_of, write_json)

#: condition -> (method, TrainConfig overrides)
CONDITIONS = {
    "static (PaI)": ("static", {}),
    "signin default": ("signin", {}),
    "reset every 2 ep": ("signin", {"reset_every": 2}),
    "reset every 5 ep": ("signin", {"reset_every": 5}),
    "no reset": ("signin", {"reset_until": 0.0}),
    "reset every 50 steps": ("signin", {"reset_every": 50, "reset_unit": "step"}),
    "policy keep": ("signin", {"reset_policy": "keep"}),
    "policy zero": ("signin", {"reset_policy": "zero"}),
    "beta 4": ("signin", {"beta": 4.0}),
    "factor lr x2": ("signin", {"factor_lr_scale": 2.0}),
    # decay on both factors shrinks θ = m ⊙ w about twice as fast as the same λ on θ (m ≈ 1 at β = 1)
    "weight decay / 2": ("signin", {"weight_decay": 2.5e-4}),
    # controls: near θ = 0, β = 4 moves θ about 4x faster (m² + w² ≈ β) and factor lr x2 about 2x; is the
    # gain the larger effective step or the sign flips? static with the same effective learning rate
    "static lr x2": ("static", {"lr": 0.1}),
    "static lr x4": ("static", {"lr": 0.2}),
    # a regime where β erodes between resets (10x the weight decay: β falls to ~0.7 per 8 epochs without
    # resets instead of ~0.99), closer to the papers' long schedules where Σ ηλ is large
    "static wd 5e-3": ("static", {"weight_decay": 5e-3}),
    "signin wd 5e-3": ("signin", {"weight_decay": 5e-3}),
    "signin no reset wd 5e-3": ("signin", {"weight_decay": 5e-3, "reset_until": 0.0}),
    # λ/2 on both factors decays θ at about the rate λ does on θ: the matched comparison to "static wd 5e-3"
    "signin wd 2.5e-3": ("signin", {"weight_decay": 2.5e-3}),
    "signin no reset wd 2.5e-3": ("signin", {"weight_decay": 2.5e-3, "reset_until": 0.0}),
}
SETTINGS = {"n_train": 10000, "n_test": 10000, "epochs": 8, "batch_size": 128, "lr": 0.05, "sparsity": 0.9}
QUICK = {"n_train": 1000, "n_test": 500, "epochs": 2, "batch_size": 128, "lr": 0.05, "sparsity": 0.9}
QUICK_CONDITIONS = ("static (PaI)", "signin default", "policy zero", "reset every 50 steps")


def main(argv=None) -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--conditions", nargs="+", default=None, choices=list(CONDITIONS))
    add_output_options(p, "signin_ablation", "these result files (the main run and separately run conditions)")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args)
    seeds = seeds_of(args)
    st = dict(QUICK if args.quick else SETTINGS)
    names = args.conditions or (list(QUICK_CONDITIONS) if args.quick else list(CONDITIONS))
    out = {"experiment": "signin_ablation", "quick": args.quick, "seeds": seeds,
           "settings": {**st, "model": "mlp", "momentum": 0.9, "weight_decay": 5e-4, "distribution": "erk"},
           "conditions": {n: {"method": CONDITIONS[n][0], **CONDITIONS[n][1]} for n in names},
           "environment": environment(), "runs": [], "summary": {}}
    path = args.out / f"{args.name}.json"
    ds = dataset("mlp", st["n_train"], st["n_test"])
    for seed in seeds:
        for name in names:
            method, over = CONDITIONS[name]
            cfg = TrainConfig(model="mlp", method=method, density=round(1 - st["sparsity"], 6), epochs=st["epochs"],
                              batch_size=st["batch_size"], lr=st["lr"], seed=seed, threads=args.threads,
                              progress=False)
            cfg = dataclasses.replace(cfg, **over)
            r = run(cfg, ds)
            log(f"seed {seed} {name}: test {100 * r['final']['test_acc']:.2f}% ({r['time_s']:.0f}s)")
            out["runs"].append({"condition": name, "seed": seed, "describe": r["method"], "final": r["final"],
                                "sign_flips": sum(e["sign_flips"] for e in r["epochs"]),
                                "signs_changed_vs_init": sum(r["signs_changed_vs_init"].values()),
                                "beta_per_epoch": [e["beta_mean"] for e in r["epochs"]],
                                "beta_before_reset": [e.get("beta_before_reset") for e in r["epochs"]],
                                "test_acc_per_epoch": [e["test_acc"] for e in r["epochs"]], "time_s": r["time_s"]})
            write_json(path, out)
    summarize(out, names)
    write_json(path, out)
    return finish(args, out, plot, table, f"{args.name}.png")


def merge(args) -> int:
    parts = [json.loads(Path(f).read_text()) for f in args.merge]
    out = {**parts[0], "experiment": args.name, "merged_from": [str(f) for f in args.merge], "conditions": {},
           "runs": [], "summary": {}}
    seen = set()
    for part in parts:
        if part["settings"] != parts[0]["settings"]:
            raise SystemExit(f"--merge: settings differ: {part['settings']} vs {parts[0]['settings']}")
        out["conditions"].update(part["conditions"])
        for r in part["runs"]:  # a condition run twice (same seed: the same deterministic run) counts once
            if (r["condition"], r["seed"]) not in seen:
                seen.add((r["condition"], r["seed"]))
                out["runs"].append(r)
    summarize(out, list(out["conditions"]))
    write_json(args.out / f"{args.name}.json", out)
    return finish(args, out, plot, table, f"{args.name}.png")


def summarize(out: dict, names: list[str]) -> None:
    """Per condition: mean ± std of test / train accuracy, flips and time; paired difference against
    ``static (PaI)`` when the file has it."""
    static = None
    names = sorted(names, key=lambda n: n != "static (PaI)")  # the baseline first
    for name in names:
        rs = [r for r in out["runs"] if r["condition"] == name]
        s = {"test_acc": mean_std([100 * r["final"]["test_acc"] for r in rs]),
             "train_acc": mean_std([100 * r["final"]["train_acc"] for r in rs]),
             "sign_flips": mean_std([r["sign_flips"] for r in rs]),
             "time_s": mean_std([r["time_s"] for r in rs])}
        if name == "static (PaI)":
            static = s
        elif static is not None:
            s["vs_static_exceeds_spread"] = exceeds_spread(s["test_acc"], static["test_acc"])
            diffs = [100 * (a["final"]["test_acc"] - b["final"]["test_acc"]) for a in rs
                     for b in out["runs"] if b["condition"] == "static (PaI)" and b["seed"] == a["seed"]]
            s["paired_diff_vs_static"] = mean_std(diffs)
        out["summary"][name] = s


def table(out: dict) -> str:
    lines = [f"{'condition':<22} {'test acc %':>15} {'paired diff vs static':>22} {'sign flips':>12}"]
    for name, s in out["summary"].items():
        d = s.get("paired_diff_vs_static")
        dtxt = f"{d['mean']:+.2f} ± {d['std']:.2f}" if d else ""
        lines.append(f"{name:<22} {s['test_acc']['mean']:>8.2f} ± {s['test_acc']['std']:<4.2f} {dtxt:>22} "
                     f"{s['sign_flips']['mean']:>12.0f}")
    return "\n".join(lines)


def plot(plt, out: dict, path) -> None:
    names = list(out["summary"])
    ms = [out["summary"][n]["test_acc"]["mean"] for n in names]
    ss = [out["summary"][n]["test_acc"]["std"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.5))
    colors = ["tab:gray" if n.startswith("static") else "tab:red" if n == "signin default" else "tab:blue" for n in names]
    ax.barh(range(len(names)), ms, xerr=ss, capsize=3, color=colors)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    lo, hi = min(m - s for m, s in zip(ms, ss)), max(m + s for m, s in zip(ms, ss))
    ax.set_xlim(lo - 0.3 * (hi - lo + 0.5), hi + 0.3 * (hi - lo + 0.5))
    ax.set_xlabel("test accuracy % (mean ± std)")
    st = out["settings"]
    ax.set_title(f"Sign-In ablation, MLP / Fashion-MNIST {st['n_train']} samples, {st['sparsity']:.0%} sparse, "
                 f"{len(out['seeds'])} seeds", fontsize=9)
    save_fig(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
