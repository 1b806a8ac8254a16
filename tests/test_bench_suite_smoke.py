"""``sparse-engine bench`` (bench/run_suite.py, bench/plot.py, sparse_engine/bench_cli.py).

The fast tests check the pure parts (the crossover rule, the CSV mappers) on hand-made rows and run the
suite end to end on its smallest grids for the two cheapest benchmarks; the slow one runs every
benchmark at the smoke level. Timings are never checked (the CI machine is shared); the outputs are.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

try:
    import matplotlib  # noqa: F401

    HAS_MPL = True
except ImportError:
    HAS_MPL = False


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def suite():
    return load("run_suite")


def row(density, ratio, provider="cpp", shape="8x8", batch="1", bench="compact_linear", mode="quick"):
    return {"bench": bench, "device_name": "cpu", "shape": shape, "batch": batch, "pass": "fwd", "provider": provider,
            "density": str(density), "ratio_vs_baseline": str(ratio), "baseline": "dense", "mode": mode}


def test_crossover_rule(suite):
    rows = [row(0.02, 3.0), row(0.05, 1.5), row(0.1, 0.9), row(0.2, 1.1),  # a win at 0.2 after a loss: not counted
            row(0.1, 1.0, provider="dense"),                               # the baseline itself is no provider
            row(0.02, 0.5, provider="torch_sparse"), row(0.1, 0.4, provider="torch_sparse"),
            row(0.1, 9.0, provider="triton", mode="quick-interpreter")]   # interpreter rows say nothing
    out = {r["provider"]: r for r in suite.crossover(rows)}
    assert set(out) == {"cpp", "torch_sparse"}
    assert out["cpp"]["beats_dense_up_to_density"] == "0.05"
    assert out["cpp"]["densities"] == "0.02 0.05 0.1 0.2"
    assert out["torch_sparse"]["beats_dense_up_to_density"] == ""
    assert "never" in out["torch_sparse"]["verdict"]


def test_mappers_keep_values_and_compute_ratios(suite):
    env = {"device_name": "cpu", "machine": "m", "torch": "t", "triton": "x", "commit": "c", "date": "d"}
    cl = suite.map_compact_linear([{"N": "64", "K": "32", "sparsity": "0.9", "batch": "4", "provider": "cpp",
                                    "variant": "", "median_ms": "2.5", "gflops": "3.0", "speedup_vs_dense": "1.7"}],
                                  env, "quick")
    assert cl[0]["shape"] == "64x32" and cl[0]["density"] == "0.1" and cl[0]["median_ms"] == "2.5"
    assert cl[0]["ratio_vs_baseline"] == "1.7" and cl[0]["tflops"] == "0.003"
    ex = suite.map_extract([{"model": "mlp", "density": "0.1", "provider": "dense", "latency_b1_ms": "2.0"},
                            {"model": "mlp", "density": "0.1", "provider": "csr", "latency_b1_ms": "0.5"}], env, "q")
    assert [r["ratio_vs_baseline"] for r in ex] == ["1", "4"]
    for r in cl + ex:
        assert set(suite.FIELDS) <= set(r) | {"min_ms", "max_ms"}


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(check=False, args=[sys.executable, "-m", "sparse_engine.bench_cli", "--out", str(tmp_path), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)


def check_outputs(tmp_path: Path, expect: set[str]) -> list[dict]:
    with open(tmp_path / "suite_cpu.csv", newline="") as f:
        reader = csv.DictReader(f)
        suite_fields = reader.fieldnames
        rows = list(reader)
    assert suite_fields == load("run_suite").FIELDS
    assert {r["bench"] for r in rows} == expect
    timed = [r for r in rows if r["median_ms"]]
    assert timed and all(float(r["median_ms"]) > 0 for r in timed)
    for r in timed:
        assert r["machine"] and r["torch"] and r["commit"] and r["device_name"] and r["provider"]
        if r["ratio_vs_baseline"]:
            assert float(r["ratio_vs_baseline"]) > 0
    with open(tmp_path / "crossover_cpu.csv", newline="") as f:
        cross = list(csv.DictReader(f))
    assert all(r["verdict"] for r in cross)
    status = json.loads((tmp_path / "status_cpu.json").read_text())
    assert set(expect) <= set(status["benches"])
    if HAS_MPL:
        pngs = list(tmp_path.glob("*.png"))
        assert pngs and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    return rows


def test_bench_smoke_subset(tmp_path):
    proc = run_cli(tmp_path, "--smoke", "--only", "compact_linear", "train_breakdown")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = check_outputs(tmp_path, {"compact_linear", "train_breakdown"})
    phases = {(r["provider"], r["pass"]) for r in rows if r["bench"] == "train_breakdown" and r["median_ms"]}
    assert {("dense", "forward"), ("dense", "backward"), ("dense", "optimizer")} <= phases
    if HAS_MPL:
        assert (tmp_path / "train_breakdown_cpu.png").is_file()
        assert (tmp_path / "speedup_compact_linear_cpu.png").is_file()


def test_bench_rejects_unknown_benchmark(tmp_path):
    proc = run_cli(tmp_path, "--smoke", "--only", "no_such_bench")
    assert proc.returncode == 2 and "no_such_bench" in proc.stderr


def test_bench_dir_must_hold_the_suite(tmp_path):
    from sparse_engine.bench_cli import main
    from sparse_engine.cli import UserError

    with pytest.raises(UserError, match="run_suite.py"):
        main(["--bench-dir", str(tmp_path)])


@pytest.mark.slow
def test_bench_smoke_everything(tmp_path):
    proc = run_cli(tmp_path, "--smoke")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_outputs(tmp_path, {"compact_linear", "train_step", "extract", "train_breakdown"})
    status = json.loads((tmp_path / "status_cpu.json").read_text())
    import torch

    if not torch.cuda.is_available():  # the Triton benchmarks say why they did not run
        for name in ("masked_linear", "block_sparse_linear", "fused_step"):
            assert status["benches"][name]["status"].startswith("skipped: Triton kernels need a GPU")


def test_the_suite_writes_to_a_scratch_folder_by_default(suite):
    """A user's `sparse-engine bench` must not overwrite the committed bench/results/."""
    out = suite.parser().parse_args([]).out
    assert not out.resolve().is_relative_to(ROOT / "bench" / "results"), out
    assert suite.parser().parse_args(["--out", "x"]).out == Path("x")
    assert suite.shown(ROOT / "bench" / "results" / "a.csv") == str(Path("bench") / "results" / "a.csv")
