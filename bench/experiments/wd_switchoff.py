"""Weight-decay switch-off at 0.25 / 0.5 / 0.75 of training against constant weight decay (and none),
on the m ⊙ w parameterization.

    python bench/experiments/wd_switchoff.py            # default (about 8-10 min on 2 cores)
    python bench/experiments/wd_switchoff.py --quick    # smoke test (seconds)

Every Linear weight of LeNet-300-100 is trained as θ = m ⊙ w (β = 1) with weight decay λ on m and w
and no other regulariser (the PILoT parameterization with α = 0 and no pruning at the end). Conditions
differ only in when λ becomes 0. Reported per condition: test accuracy, ‖θ‖₁, mean β = m² − w² (the
accumulated decay shrinks it: the implicit bias moves from L2 to L1, as the paper describes), the
fraction of |θ| < 1e-3, and the accuracy after a one-shot global magnitude prune to 90 % sparsity (an
L1-like bias makes θ easier to prune). Writes wd_switchoff.json and wd_switchoff.png.
"""
from __future__ import annotations

import torch
from _common import (TrainConfig, dataset, environment, exceeds_spread, finish, log, mean_std, parser, run,
                     save_fig, seeds_of, write_json)
from pilot_oneshot import pruned_accuracy, weights

from sparse_engine.optim import parameterizations

#: condition -> switch-off fraction (None: constant λ; "none": λ = 0 throughout)
CONDITIONS = {"constant": None, "off@0.25": 0.25, "off@0.5": 0.5, "off@0.75": 0.75, "no wd": "none"}
SETTINGS = {"n_train": 10000, "n_test": 10000, "epochs": 8, "batch_size": 128, "lr": 0.05, "weight_decay": 5e-3}
QUICK = {"n_train": 1000, "n_test": 500, "epochs": 2, "batch_size": 128, "lr": 0.05, "weight_decay": 5e-3}
PRUNE_SPARSITY = 0.9


def main(argv=None) -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--weight-decay", type=float, default=None)
    args = p.parse_args(argv)
    seeds = seeds_of(args)
    given = {} if args.weight_decay is None else {"weight_decay": args.weight_decay}
    st = {**(QUICK if args.quick else SETTINGS), **given}
    out = {"experiment": "wd_switchoff", "quick": args.quick, "seeds": seeds,
           "settings": {**st, "model": "mlp", "momentum": 0.9, "parameterization": "m*w, beta=1, alpha=0 (pilot)",
                        "prune_sparsity": PRUNE_SPARSITY},
           "conditions": {k: v for k, v in CONDITIONS.items()}, "environment": environment(), "runs": [],
           "summary": {}}
    path = args.out / "wd_switchoff.json"
    ds = dataset("mlp", st["n_train"], st["n_test"])
    for seed in seeds:
        for name, at in CONDITIONS.items():
            cfg = TrainConfig(model="mlp", method="pilot", density=1.0, alpha=0.0, alpha_schedule="constant",
                              epochs=st["epochs"], batch_size=st["batch_size"], lr=st["lr"], seed=seed,
                              weight_decay=0.0 if at == "none" else st["weight_decay"],
                              wd_switchoff=at if isinstance(at, float) else None, threads=args.threads,
                              progress=False)

            def after(model, m, result):
                ws = weights(model)
                flat = torch.cat([w.flatten() for w in ws.values()])
                result["l1"] = float(flat.abs().sum())
                result["frac_small"] = float((flat.abs() < 1e-3).double().mean())
                betas = torch.cat([(pz.m.detach().double() ** 2 - pz.w.detach().double() ** 2).flatten()
                                   for _, pz in parameterizations(model)])
                result["beta_mean"] = float(betas.mean())
                result["pruned_acc"] = pruned_accuracy(model, round(1 - PRUNE_SPARSITY, 6), ds.x_test, ds.y_test)

            r = run(cfg, ds, after_training=after)
            log(f"seed {seed} {name}: test {100 * r['final']['test_acc']:.2f}% l1 {r['l1']:.1f} beta {r['beta_mean']:.3f} "
                f"pruned@{PRUNE_SPARSITY:g} {100 * r['pruned_acc']:.2f}% ({r['time_s']:.0f}s)")
            out["runs"].append({"condition": name, "seed": seed, "final": r["final"], "l1": r["l1"],
                                "frac_small": r["frac_small"], "beta_mean": r["beta_mean"],
                                "pruned_acc": r["pruned_acc"],
                                "test_acc_per_epoch": [e["test_acc"] for e in r["epochs"]],
                                "beta_per_epoch": [e["beta_mean"] for e in r["epochs"]],
                                "time_s": r["time_s"]})
            write_json(path, out)
    for name in CONDITIONS:
        rs = [r for r in out["runs"] if r["condition"] == name]
        out["summary"][name] = {
            "test_acc": mean_std([100 * r["final"]["test_acc"] for r in rs]),
            "train_acc": mean_std([100 * r["final"]["train_acc"] for r in rs]),
            "l1": mean_std([r["l1"] for r in rs]), "beta_mean": mean_std([r["beta_mean"] for r in rs]),
            "frac_small": mean_std([r["frac_small"] for r in rs]),
            "pruned_acc": mean_std([100 * r["pruned_acc"] for r in rs])}
    c = out["summary"]["constant"]
    out["vs_constant"] = {name: {"test_acc_exceeds_spread": exceeds_spread(s["test_acc"], c["test_acc"]),
                                 "pruned_acc_exceeds_spread": exceeds_spread(s["pruned_acc"], c["pruned_acc"])}
                          for name, s in out["summary"].items() if name != "constant"}
    write_json(path, out)
    return finish(args, out, plot, table, "wd_switchoff.png")


def table(out: dict) -> str:
    lines = [f"{'condition':<10} {'test acc %':>15} {'pruned@90% acc %':>18} {'L1':>15} {'beta mean':>15}"]
    for name, s in out["summary"].items():
        lines.append(f"{name:<10} {s['test_acc']['mean']:>8.2f} ± {s['test_acc']['std']:<4.2f} "
                     f"{s['pruned_acc']['mean']:>11.2f} ± {s['pruned_acc']['std']:<4.2f} "
                     f"{s['l1']['mean']:>8.1f} ± {s['l1']['std']:<4.1f} {s['beta_mean']['mean']:>8.4f} ± "
                     f"{s['beta_mean']['std']:<.4f}")
    return "\n".join(lines)


def plot(plt, out: dict, path) -> None:
    names = list(out["summary"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in ((axes[0], "test_acc", "test accuracy %"), (axes[1], "pruned_acc",
                                                                       f"acc. after 1-shot prune to {PRUNE_SPARSITY:.0%} %")):
        ms = [out["summary"][n][key]["mean"] for n in names]
        ss = [out["summary"][n][key]["std"] for n in names]
        ax.bar(range(len(names)), ms, yerr=ss, capsize=3, color="tab:blue")
        ax.set_xticks(range(len(names)), names, fontsize=8)
        lo = min(m - s for m, s in zip(ms, ss))
        hi = max(m + s for m, s in zip(ms, ss))
        ax.set_ylim(lo - 0.2 * (hi - lo + 1), hi + 0.2 * (hi - lo + 1))
        ax.set_ylabel(label)
    ax = axes[2]
    for name in names:
        rs = [r for r in out["runs"] if r["condition"] == name and r["seed"] == out["seeds"][0]]
        if rs:
            ax.plot(range(1, len(rs[0]["beta_per_epoch"]) + 1), rs[0]["beta_per_epoch"], marker=".", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean β = m² − w²")
    ax.legend(fontsize=7)
    fig.suptitle(f"MLP / Fashion-MNIST, m ⊙ w, λ = {out['settings']['weight_decay']:g}; mean ± std over "
                 f"{len(out['seeds'])} seeds", fontsize=10)
    save_fig(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
