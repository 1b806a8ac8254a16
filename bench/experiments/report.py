"""Print the Markdown tables of docs/RESULTS.md from the result files (no training, no timing).

    python bench/experiments/report.py [--results bench/results]

Every number in the tables comes from the JSON / CSV files the experiments and the suite wrote; a
missing file prints a line saying so instead of a table.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def ms(s: dict, digits: int = 2) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def settings(d: dict):
    """(model, sparsity as written, summary) of each "model@sparsity" entry of a result's summary."""
    for key, summary in d["summary"].items():
        model, sp = key.split("@")
        yield model, sp, summary


def load(path: Path) -> dict | None:
    if not path.is_file():
        print(f"\n(missing: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path})\n")
        return None
    return json.loads(path.read_text())


def signin_vs_static(d: dict) -> None:
    print("| model | sparsity | static (PaI) acc % | Sign-In acc % | paired diff (Sign-In − static) | diff > spread? "
          "| sign flips static / Sign-In |")
    print("|---|---|---|---|---|---|---|")
    for model, sp, s in settings(d):
        print(f"| {model} | {float(sp):.0%} | {ms(s['static'])} | {ms(s['signin'])} | {s['paired_diff']['mean']:+.2f} ± "
              f"{s['paired_diff']['std']:.2f} | {'yes' if s['exceeds_spread'] else 'no'} | "
              f"{s['static_flips']['mean']:.0f} / {s['signin_flips']['mean']:.0f} |")


def pilot(d: dict) -> None:
    names = list(d["summary"])
    print("| sparsity | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for k in ["unpruned"] + [f"{s:g}" for s in d["sparsities"]]:
        label = "no prune" if k == "unpruned" else f"{float(k):.0%}"
        print(f"| {label} | " + " | ".join(ms(d["summary"][n][k]) for n in names) + " |")
    print()
    for other, by_s in d.get("pilot_vs", {}).items():
        parts = []
        for s, beyond in by_s.items():
            diff = d["summary"]["pilot a=1e-3"][s]["mean"] - d["summary"][other][s]["mean"]
            parts.append(f"{float(s):.0%}: {diff:+.2f}{' (beyond spread)' if beyond else ''}")
        print(f"* pilot a=1e-3 minus {other}: " + "; ".join(parts))
    best_after_prune(d)


def beyond_spread(a: dict, b: dict) -> bool:
    """The page's conservative reading: |mean_a − mean_b| > std_a + std_b."""
    return abs(a["mean"] - b["mean"]) > a["std"] + b["std"]


def best_after_prune(d: dict) -> None:
    """Per sparsity: the best variant after the one-shot prune, and whether it leads the runner-up
    beyond the seed spread."""
    parts = []
    for s in (f"{x:g}" for x in d["sparsities"]):
        ranked = sorted(d["summary"], key=lambda n: -d["summary"][n][s]["mean"])
        best, second = (d["summary"][n][s] for n in ranked[:2])
        verdict = "beyond spread" if beyond_spread(best, second) else "within spread"
        parts.append(f"{float(s):.0%}: {ranked[0]} ({verdict} of {ranked[1]})")
    print("* best after the prune: " + "; ".join(parts))


def pai_vs_pruned(static: dict, pilot_: dict) -> None:
    """Static random PaI (Sign-In vs static file, MLP) against the one-shot-pruned variants of the PILoT
    file at the sparsities both cover; both: MLP, 20 000 images, 10 epochs, lr 0.05, seeds 0-2."""
    names = list(pilot_["summary"])
    print("| sparsity | static PaI (trained sparse) | " + " | ".join(f"{n}, pruned" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for model, sp, row in settings(static):
        if model != "mlp" or sp not in pilot_["summary"][names[0]]:
            continue
        cells = []
        for n in names:
            v = pilot_["summary"][n][sp]
            mark = " (beyond spread)" if beyond_spread(row["static"], v) else ""
            cells.append(f"{ms(v)}: {v['mean'] - row['static']['mean']:+.2f}{mark}")
        print(f"| {float(sp):.0%} | {ms(row['static'])} | " + " | ".join(cells) + " |")


def _lr_schedule(st: dict) -> list[float]:
    """The per-step cosine learning rate the experiments ran (bench/experiments/_common.run)."""
    total = st["epochs"] * math.ceil(st["n_train"] / st["batch_size"])
    return [st["lr"] * 0.5 * (1.0 + math.cos(math.pi * k / total)) for k in range(total)]


def decay_only_beta(lrs: list[float], lam: float, mu: float, off: int | None = None) -> float:
    """β after the run if weight decay were the only force: SGD with momentum on m (and w) with gradient
    λm, as torch.optim.SGD steps it (the first step's buffer is the gradient); β scales as m²."""
    m, buf = 1.0, None
    for k, eta in enumerate(lrs):
        g = lam * m if off is None or k < off else 0.0
        buf = g if buf is None else mu * buf + g
        m -= eta * buf
    return m * m


def beta_erosion(files: dict[str, dict]) -> None:
    """β at the end of the runs without resets, measured, against weight decay alone: with momentum μ
    the decay of both factors erodes β = m² − w² as exp(−2 Σ η_k λ_k / (1 − μ))."""
    print("| file: condition | λ | decay steps | Σ ηλ | exp(−2Σηλ/(1−μ)) | decay alone, step by step | "
          "measured mean β (3 seeds) |")
    print("|---|---|---|---|---|---|---|")
    for stem, d in files.items():
        st = d["settings"]
        for name, opts in d["conditions"].items():
            opts = opts if isinstance(opts, dict) else {"wd_off": opts}  # wd_switchoff: the switch-off point
            no_reset = opts.get("method") == "signin" and opts.get("reset_until") == 0.0
            if not (no_reset or "wd_off" in opts):
                continue
            runs = [r for r in d["runs"] if r["condition"] == name]
            lam = opts.get("weight_decay", st["weight_decay"]) if opts.get("wd_off") != "none" else 0.0
            lrs = _lr_schedule(st)
            off = math.ceil(opts["wd_off"] * len(lrs)) if isinstance(opts.get("wd_off"), float) else None
            dose = lam * sum(lrs[:off])
            mu = st["momentum"]
            measured = statistics.fmean(r["beta_per_epoch"][-1] for r in runs)
            print(f"| {stem}: {name} | {lam:g} | {len(lrs) if off is None else off} | {dose:.4f} | "
                  f"{math.exp(-2 * dose / (1 - mu)):.3f} | {decay_only_beta(lrs, lam, mu, off):.3f} | "
                  f"{measured:.3f} |")


def wd(d: dict) -> None:
    print(f"| condition | test acc % | acc after one-shot prune to {d['settings']['prune_sparsity']:.0%} % | ‖θ‖₁ | "
          "mean β = m² − w² | fraction |θ| < 1e-3 | vs constant: acc / pruned acc beyond spread? |")
    print("|---|---|---|---|---|---|---|")
    for name, s in d["summary"].items():
        v = d["vs_constant"].get(name)
        vs = "—" if v is None else (f"{'yes' if v['test_acc_exceeds_spread'] else 'no'} / "
                                     f"{'yes' if v['pruned_acc_exceeds_spread'] else 'no'}")
        print(f"| {name} | {ms(s['test_acc'])} | {ms(s['pruned_acc'])} | {ms(s['l1'], 0)} | {ms(s['beta_mean'], 3)} | "
              f"{ms(s['frac_small'], 4)} | {vs} |")


def regression(d: dict) -> None:
    print("| truth signs | variant | final relative error ‖θ − θ*‖/‖θ*‖ | support recovered | final loss |")
    print("|---|---|---|---|---|")
    for key, s in d["summary"].items():
        if "rel_error" not in s:
            continue
        signs, name = key.split("/", 1)
        print(f"| {signs} | {name} | {ms(s['rel_error'], 4)} | {s['support_recovered']}/{s['of']} | "
              f"{s['loss']['mean']:.2e} |")


def ablation(d: dict, extras: list[dict]) -> None:
    static = {r["seed"]: r["final"]["test_acc"] for r in d["runs"] if r["condition"] == "static (PaI)"}
    rows = dict(d["summary"])
    for extra in extras:  # conditions run separately; paired with the static runs of the same seeds
        for name in extra["conditions"]:
            rs = [r for r in extra["runs"] if r["condition"] == name]
            acc = [100 * r["final"]["test_acc"] for r in rs]
            # the baseline: a static condition of the same file with the same weight decay on θ (Sign-In's
            # λ/2 on both factors matches static's λ), else the main static
            wd_ = extra["conditions"][name].get("weight_decay")
            local = [c for c, o in extra["conditions"].items() if o["method"] == "static" and c != name
                     and wd_ is not None and o.get("weight_decay") in (wd_, 2 * wd_) and "lr" not in o]
            base = static if not local or name in local else {
                r["seed"]: r["final"]["test_acc"] for r in extra["runs"] if r["condition"] == local[0]}
            if extra["conditions"][name]["method"] == "static" and wd_ is not None:
                base = {}  # a baseline itself
            diffs = [100 * (r["final"]["test_acc"] - base[r["seed"]]) for r in rs if r["seed"] in base]
            sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
            base_acc = [100 * v for v in base.values()]
            beyond = (abs(statistics.fmean(acc) - statistics.fmean(base_acc)) > sd(acc) + sd(base_acc)
                      if base_acc and diffs else None)
            rows[name + " (separate run)"] = {
                "test_acc": {"mean": statistics.fmean(acc), "std": sd(acc)},
                "paired_diff_vs_static": {"mean": statistics.fmean(diffs), "std": sd(diffs)} if diffs else None,
                "sign_flips": {"mean": statistics.fmean([r["sign_flips"] for r in rs]), "std": 0.0},
                "vs_static_exceeds_spread": beyond}
    print("| condition | test acc % | paired diff vs static | beyond spread? | sign flips (sum of per-epoch) | "
          "mean β before last reset |")
    print("|---|---|---|---|---|---|")
    for name, s in rows.items():
        d_ = s.get("paired_diff_vs_static")
        dtxt = "—" if not d_ else f"{d_['mean']:+.2f} ± {d_['std']:.2f}"
        beyond = s.get("vs_static_exceeds_spread")
        bt = "—" if beyond is None else ("yes" if beyond else "no")
        runs = [r for r in (d["runs"] + [r for e in extras for r in e["runs"]])
                if r["condition"] == name.replace(" (separate run)", "")]
        betas = [b for r in runs for b in [x for x in r.get("beta_before_reset", []) if x is not None][-1:]]
        btxt = f"{statistics.fmean(betas):.3f}" if betas else "—"
        print(f"| {name} | {ms(s['test_acc'])} | {dtxt} | {bt} | {s['sign_flips']['mean']:.0f} | {btxt} |")


def mask_sources(d: dict) -> None:
    """Per model and sparsity: every condition's accuracy, sign flips, β and regrowth; then the pairs."""
    print("| model | sparsity | condition | test acc % | sign flips (sum of per-epoch) | mean β (last epoch) | "
          "regrown (total) |")
    print("|---|---|---|---|---|---|---|")
    for model, sp, s in settings(d):
        for name, c in s["conditions"].items():
            beta = f"{c['beta_mean']['mean']:.3f}" if c["beta_mean"]["n"] else "—"
            regrown = f"{c['regrown']['mean']:.0f}" if c["regrown"]["n"] else "—"
            print(f"| {model} | {float(sp):.0%} | {name} | {ms(c['test_acc'])} (n={c['test_acc']['n']}) | "
                  f"{c['sign_flips']['mean']:.0f} | {beta} | {regrown} |")
    print()
    print("| model | sparsity | comparison | paired diff (points) | beyond spread? |")
    print("|---|---|---|---|---|")
    for model, sp, s in settings(d):
        for pair, x in s["pairs"].items():
            print(f"| {model} | {float(sp):.0%} | {pair} | {x['diff']['mean']:+.2f} ± {x['diff']['std']:.2f} "
                  f"(n={x['diff']['n']}) | {'yes' if x['exceeds_spread'] else 'no'} |")


def _suite():
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("_run_suite", ROOT / "bench" / "run_suite.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def crossover_rows(path: Path) -> list[dict]:
    """Crossover rows of a suite crossover CSV, or computed from a raw bench_compact_linear CSV."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "verdict" in rows[0]:
        return rows
    suite = _suite()
    env = {"device_name": rows[0]["machine"] if rows else "", "machine": "", "torch": "", "triton": "", "commit": "",
           "date": ""}
    return suite.crossover(suite.map_compact_linear(rows, env, path.stem))


def crossover(path: Path) -> None:
    rows = crossover_rows(path)
    print("| benchmark | device | shape | batch | provider | densities | speed-up over dense (median) | "
          "(best runs) | beats dense at density ≤ (median / best) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["pass"] not in ("fwd", "infer", "train_step"):
            continue
        print(f"| {r['bench']} | {r['device_name']} | {r['shape']} | {r['batch']} | {r['provider']} | {r['densities']} | "
              f"{r['ratios']} | {r.get('ratios_best', '')} | {r['beats_dense_up_to_density'] or 'never'} / "
              f"{(r.get('beats_dense_up_to_density_best') or 'never') if r.get('ratios_best') else '—'} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    ex = args.results / "experiments"
    for title, fn, files in (
        ("Sign-In vs static", signin_vs_static, ["signin_vs_static_all.json"]),
        ("Sign-In vs static, CNN on 6 000 images", signin_vs_static, ["signin_vs_static_cnn6k.json"]),
        ("PILoT one-shot", pilot, ["pilot_oneshot.json"]),
        ("Weight-decay switch-off", wd, ["wd_switchoff.json"]),
        ("Sparse regression", regression, ["sparse_regression.json"]),
        ("Masks that move and masks from data", mask_sources, ["mask_sources.json"]),
    ):
        print(f"\n### {title}\n")
        d = load(ex / files[0])
        if d is not None:
            fn(d)
    print("\n### Static random PaI against one-shot-pruned PILoT\n")
    static, pruned = load(ex / "signin_vs_static_all.json"), load(ex / "pilot_oneshot.json")
    if static is not None and pruned is not None:
        pai_vs_pruned(static, pruned)
    print("\n### Erosion of β without resets: measured and weight decay alone\n")
    stems = ("signin_ablation", "signin_ablation_strong_wd_matched", "signin_ablation_strong_wd", "wd_switchoff")
    files = {stem: load(ex / f"{stem}.json") for stem in stems}
    beta_erosion({stem: d for stem, d in files.items() if d is not None})
    print("\n### Sign-In ablation\n")
    d = load(ex / "signin_ablation.json")
    if d is not None:
        extras = [json.loads(f.read_text()) for f in sorted(ex.glob("signin_ablation_*.json"))
                  if f.stem != "signin_ablation_all"]  # the merged file repeats the others
        ablation(d, extras)
    for path in [*sorted(args.results.glob("crossover_*.csv")), *sorted(args.results.glob("compact_linear_*.csv"))]:
        print(f"\n### Crossover from {path.name}\n")
        crossover(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
