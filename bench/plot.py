"""PNG plots of the benchmark suite's CSV (needs matplotlib: ``pip install 'sparse-engine[plot]'``).

    python bench/plot.py bench/results/suite_cpu.csv [--out bench/results]

* ``speedup_<bench>_<device>.png``: speed-up over dense (measured in the same run) against density, one
  panel per shape, one line per provider and batch; the dashed line at 1 is "as fast as dense".
* ``train_breakdown_<device>.png``: forward / backward / optimizer time of one training step per
  provider (stacked), next to the full-step times of bench_train_step.
Interpreter rows (Triton without a GPU) are never plotted: their timings mean nothing.
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

from common import pyplot, save_fig


def _num(x) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _device_tag(rows: list[dict], csv_path: Path) -> str:
    stem = csv_path.stem
    return stem.split("_", 1)[1] if stem.startswith("suite_") and "_" in stem else "cpu"


def plot_suite(csv_path: Path | str, out_dir: Path | str | None = None) -> list[Path]:
    """Draw every plot the suite CSV supports; returns the PNG paths written (none without matplotlib)."""
    csv_path = Path(csv_path)
    out_dir = Path(out_dir) if out_dir is not None else csv_path.parent
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if "interpreter" not in r.get("mode", "")]
    plt = pyplot()
    if plt is None or not rows:
        return []
    tag = _device_tag(rows, csv_path)
    written = []
    for bench in sorted({r["bench"] for r in rows} - {"train_breakdown", "train_step"}):
        p = _speedup(plt, [r for r in rows if r["bench"] == bench], bench, out_dir / f"speedup_{bench}_{tag}.png")
        if p:
            written.append(p)
    p = _breakdown(plt, rows, out_dir / f"train_breakdown_{tag}.png")
    if p:
        written.append(p)
    return written


def _speedup(plt, rows: list[dict], bench: str, path: Path) -> Path | None:
    series: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        d, ratio = _num(r.get("density")), _num(r.get("ratio_vs_baseline"))
        if d is None or ratio is None or r["provider"] == r.get("baseline"):
            continue
        label = f"{r['provider']} b={r['batch']}" + (f" {r['pass']}" if r.get("pass") not in ("fwd", "infer", "") else "")
        series[r["shape"]][label].append((d, ratio))
    series = {s: {k: v for k, v in lines.items() if len({d for d, _ in v}) >= 1} for s, lines in series.items()}
    series = {s: lines for s, lines in series.items() if lines}
    if not series:
        return None
    n = len(series)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.0), squeeze=False)
    for ax, (shape, lines) in zip(axes[0], sorted(series.items())):
        for i, (label, pts) in enumerate(sorted(lines.items())):
            pts.sort()
            ax.plot([100 * d for d, _ in pts], [r for _, r in pts], marker="o", ms=3, lw=1,
                    color=plt.cm.tab20(i % 20), label=label)
        ax.axhline(1.0, color="k", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("density % (fraction of weights kept)")
        ax.set_ylabel("speed-up over dense (same run)")
        ax.set_title(f"{bench}: {shape}", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
        ax.grid(alpha=0.3, which="both")
    dev = rows[0].get("device_name", "")
    fig.suptitle(f"{bench} on {dev} ({rows[0].get('mode', '')}, commit {rows[0].get('commit', '')})", fontsize=9)
    return save_fig(fig, path, dpi=75)


def _breakdown(plt, rows: list[dict], path: Path) -> Path | None:
    bd = [r for r in rows if r["bench"] == "train_breakdown" and _num(r.get("median_ms")) is not None]
    steps = [r for r in rows if r["bench"] == "train_step" and _num(r.get("median_ms")) is not None]
    if not bd and not steps:
        return None
    fig, axes = plt.subplots(1, 2 if bd and steps else 1, figsize=(11 if bd and steps else 6, 4), squeeze=False)
    ax_i = 0
    if bd:
        ax = axes[0][ax_i]
        ax_i += 1
        provs = list(dict.fromkeys(r["provider"] for r in bd))
        bottom = [0.0] * len(provs)
        for phase, color in (("forward", "tab:blue"), ("backward", "tab:orange"), ("optimizer", "tab:green")):
            vals = []
            for p in provs:
                v = [_num(r["median_ms"]) for r in bd if r["provider"] == p and r["pass"] == phase]
                vals.append(v[0] if v else 0.0)
            ax.bar(range(len(provs)), vals, bottom=bottom, color=color, label=phase)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(range(len(provs)), provs, fontsize=8)
        ax.set_ylabel("ms per step (median per phase)")
        r0 = bd[0]
        ax.set_title(f"one training step, {r0['shape']} batch {r0['batch']}, density {r0['density']}", fontsize=9)
        ax.legend(fontsize=8)
    if steps:
        ax = axes[0][ax_i]
        labels = [f"{r['shape']}\n{r['provider']}" for r in steps]
        ax.bar(range(len(steps)), [_num(r["median_ms"]) for r in steps], color="tab:purple")
        ax.set_xticks(range(len(steps)), labels, fontsize=6, rotation=60)
        ax.set_yscale("log")
        ax.set_ylabel("ms per full step (bench_train_step)")
        ax.set_title("full training step (Sign-In at density 0.1)", fontsize=9)
    dev = (bd or steps)[0].get("device_name", "")
    fig.suptitle(f"training-step time on {dev}", fontsize=9)
    return save_fig(fig, path, dpi=75)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("csv", type=Path, help="a suite CSV written by bench/run_suite.py (sparse-engine bench)")
    p.add_argument("--out", type=Path, default=None, help="directory for the PNGs (default: runs/bench)")
    p.set_defaults(out=Path(__file__).resolve().parent.parent / "runs" / "bench")
    args = p.parse_args(argv)
    if not args.csv.is_file():
        print(f"plot: error: csv {str(args.csv)!r} does not exist", file=sys.stderr)
        return 2
    for path in plot_suite(args.csv, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
