"""Smoke test of bench/experiments/*.py: each runs alone in --quick mode and writes well-formed JSON
(and a PNG when matplotlib is installed). Values are not checked: quick runs are seconds long and mean
nothing; the structure (every run recorded, mean ± std summaries over the seeds) is what is checked.
The last tests check report.py, which prints the tables of docs/RESULTS.md from the committed results."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXP = ROOT / "bench" / "experiments"

try:
    import matplotlib  # noqa: F401

    HAS_MPL = True
except ImportError:
    HAS_MPL = False


def run_quick(name: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / name
    proc = subprocess.run(check=False, args=[sys.executable, str(EXP / f"{name}.py"), "--quick", "--out", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} --quick failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    files = {p.name for p in out.iterdir()}
    stem = name
    assert f"{stem}.json" in files, f"{name} wrote {sorted(files)}"
    if HAS_MPL:
        png = out / f"{stem}.png"
        assert png.is_file() and png.stat().st_size > 1000, f"{name}: no PNG"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size < 200_000, "PNGs are committed: keep them small"
    data = json.loads((out / f"{stem}.json").read_text())
    assert data["quick"] is True
    env = data["environment"]
    for key in ("cpu", "torch", "commit", "date"):
        assert env[key], f"environment.{key} missing"
    return data


def check_stat(s: dict, n: int) -> None:
    assert set(s) >= {"mean", "std", "n", "values"}
    assert s["n"] == n == len(s["values"])
    assert math.isfinite(s["mean"]) and s["std"] >= 0


def test_signin_vs_static(tmp_path):
    data = run_quick("signin_vs_static", tmp_path, "--seeds", "0", "1", "--models", "mlp")
    assert data["seeds"] == [0, 1]
    # every (sparsity, seed, method) ran once, with per-layer flips per epoch
    keys = {(r["sparsity"], r["seed"], r["method"]) for r in data["runs"]}
    assert keys == {(s, seed, m) for s in data["sparsities"] for seed in (0, 1) for m in ("static", "signin")}
    for r in data["runs"]:
        assert 0 <= r["final"]["test_acc"] <= 1
        assert r["epochs"] and all(set(e["flips_per_layer"]) == set(r["active_per_layer"]) for e in r["epochs"])
    for s in data["sparsities"]:
        summ = data["summary"][f"mlp@{s:g}"]
        for m in ("static", "signin", "paired_diff"):
            check_stat(summ[m], 2)
        assert isinstance(summ["exceeds_spread"], bool)


def test_mask_sources(tmp_path):
    data = run_quick("mask_sources", tmp_path, "--seeds", "0", "1")
    keys = {(r["sparsity"], r["seed"], r["condition"]) for r in data["runs"]}
    assert keys == {(s, seed, c) for s in data["sparsities"] for seed in (0, 1) for c in data["conditions"]}
    for r in data["runs"]:
        assert 0 <= r["final"]["test_acc"] <= 1
    summ = data["summary"]["mlp@0.9"]
    for c in data["conditions"]:
        check_stat(summ["conditions"][c]["test_acc"], 2)
    assert summ["conditions"]["rigl+signin"]["regrown"]["n"] == 2  # the dynamic runs count their regrowth
    assert summ["conditions"]["signin"]["beta_mean"]["n"] == 2
    for pair in ("signin - static", "rigl+signin - rigl", "acdc+signin - acdc", "gmp - pilot"):
        check_stat(summ["pairs"][pair]["diff"], 2)
        assert isinstance(summ["pairs"][pair]["exceeds_spread"], bool)


def test_pilot_oneshot(tmp_path):
    data = run_quick("pilot_oneshot", tmp_path)
    assert len(data["runs"]) == len(data["variants"]) * len(data["seeds"])
    for r in data["runs"]:
        assert set(r["pruned"]) == {f"{s:g}" for s in data["sparsities"]}
        assert all(0 <= v <= 1 for v in r["pruned"].values())
    assert any(v["beta0_start"] for v in data["variants"].values())  # the spred baseline is part of it
    for s in data["summary"].values():
        check_stat(s["unpruned"], len(data["seeds"]))


def test_wd_switchoff(tmp_path):
    data = run_quick("wd_switchoff", tmp_path)
    assert {r["condition"] for r in data["runs"]} == set(data["conditions"])
    for s in data["summary"].values():
        for key in ("test_acc", "pruned_acc", "l1", "beta_mean"):
            check_stat(s[key], len(data["seeds"]))
    assert set(data["vs_constant"]) == set(data["conditions"]) - {"constant"}


def test_sparse_regression(tmp_path):
    data = run_quick("sparse_regression", tmp_path)
    assert len(data["runs"]) == 2 * len(data["variants"]) * len(data["seeds"])
    for r in data["runs"]:
        steps = [c["step"] for c in r["curve"]]
        assert steps == sorted(steps) and steps[0] == 0
        assert all(math.isfinite(c["rel_error"]) for c in r["curve"])
    assert all(isinstance(r["support_recovered"], bool) for r in data["runs"])


def test_signin_ablation(tmp_path):
    data = run_quick("signin_ablation", tmp_path)
    assert {r["condition"] for r in data["runs"]} == set(data["conditions"])
    assert "static (PaI)" in data["summary"] and "signin default" in data["summary"]
    for name, s in data["summary"].items():
        check_stat(s["test_acc"], len(data["seeds"]))
        if name != "static (PaI)":
            check_stat(s["paired_diff_vs_static"], len(data["seeds"]))


def _report():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_report", EXP / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_decay_only_beta_follows_the_momentum_formula():
    """Weight decay alone on both factors, with momentum μ, erodes β as exp(−2 Σ ηλ / (1 − μ)), not as
    exp(−4 Σ ηλ): the step-by-step recurrence agrees with the former for small steps."""
    report = _report()
    lrs, lam = [1e-3] * 20000, 5e-3
    dose = lam * sum(lrs)
    for mu in (0.0, 0.9):
        assert report.decay_only_beta(lrs, lam, mu) == pytest.approx(math.exp(-2 * dose / (1 - mu)), rel=2e-3)
    assert report.decay_only_beta(lrs, lam, 0.9, off=10000) == pytest.approx(math.exp(-dose / 0.1), rel=2e-3)


def test_report_prints_the_numbers_the_results_page_quotes(capsys):
    """docs/RESULTS.md quotes these rows; they come from the committed result files."""
    report = _report()
    assert report.main([]) == 0
    out = capsys.readouterr().out
    for row in ("| signin_ablation: no reset | 0.0005 | 632 | 0.0079 | 0.854 | 0.857 | 0.854 |",
                "| signin_ablation_strong_wd_matched: signin no reset wd 2.5e-3 | 0.0025 | 632 | 0.0396 | 0.453 |",
                "| signin_ablation_strong_wd: signin no reset wd 5e-3 | 0.005 | 632 | 0.0791 | 0.205 | 0.209 | 0.208 |",
                "| 90% | 86.24 ± 0.15 | 78.71 ± 1.63: -7.54 (beyond spread) |",
                "| mlp | 98% | rigl - static | +1.14 ± 0.29 (n=3) | yes |",
                "| mlp | 90% | signin - static | -0.47 ± 0.12 (n=3) | yes |",
                "| mlp | 98% | gmp - pilot | +34.92 ± 6.65 (n=3) | yes |",
                ("90%: spred (b=0) a=1e-3 (within spread of pilot a=1e-3); 95%: spred (b=0) a=1e-3 (within spread "
                 "of pilot a=1e-3); 98%: spred (b=0) a=1e-3 (beyond spread of pilot a=1e-3)")):
        assert row in out, row
