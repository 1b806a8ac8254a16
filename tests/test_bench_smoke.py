"""Smoke test of the kernel benchmarks: each runs with --quick into a temporary directory (on CPU: tiny
sizes under the Triton interpreter) and writes a well-formed CSV; gpu_check.sh refuses a machine without
a GPU quickly and clearly. The timings themselves are meaningless here and are not checked."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
BENCHES = {  # script -> (csv name, providers that must have a timing)
    "bench_masked_linear.py": ("masked_linear", {"dense", "naive", "reparam_cublas", "ours"}),
    "bench_block_sparse_linear.py": ("block_sparse_linear", {"dense", "naive", "ours"}),
    "bench_fused_step.py": ("fused_step", {"naive", "ours", "ours_multi", "ours_signin", "ours_unfused"}),
    "bench_prune_threshold.py": ("prune_threshold", {"naive", "topk", "ours"}),
}

pytest.importorskip("triton", reason="triton is not installed: the benchmarks' Triton providers cannot run")


def _load(script: str):
    """Import a bench script as a module (the scripts import their helpers as ``common``)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    name = "common" if script == "common.py" else f"_bench_{Path(script).stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / script)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="a GPU is visible: bench/gpu_check.sh runs the real benchmarks"
)
@pytest.mark.parametrize("script", sorted(BENCHES))
def test_bench_quick_writes_wellformed_csv(script, tmp_path):
    common = _load("common.py")
    name, must_time = BENCHES[script]
    assert _load(script).main(["--quick", "--out", str(tmp_path)]) == 0
    path = tmp_path / f"{name}.csv"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == common.ROW_FIELDS + common.ENV_FIELDS
        rows = list(reader)
    assert rows, f"{path} has no rows"
    timed = set()
    for r in rows:
        assert r["bench"] == name
        assert r["mode"] == "quick-interpreter" and r["torch"] == torch.__version__ and r["commit"]
        if r["time_ms"]:
            t = float(r["time_ms"])
            assert math.isfinite(t) and t > 0
            timed.add(r["provider"])
            for col in ("tflops", "gbps", "vs_dense", "vs_naive"):
                if r[col]:
                    assert math.isfinite(float(r[col])) and float(r[col]) >= 0
        elif r["provider"] != "copy":
            assert r["note"], f"row without a time must say why: {r}"
    assert must_time <= timed, f"providers without a timing: {sorted(must_time - timed)}"
    # ratios are against baselines of the same run: dense / naive rows have ratio 1 to themselves
    for r in rows:
        if r["provider"] == "naive" and r["time_ms"]:
            assert float(r["vs_naive"]) == pytest.approx(1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: nothing to refuse")
@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_gpu_check_fails_fast_without_gpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA GPU" in proc.stdout + proc.stderr
    assert (out / "gpu_check.log").exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_gpu_check_usage_and_syntax():
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")]).returncode == 0
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in (proc.stdout + proc.stderr).lower()


def test_bench_sparse_conv_quick_writes_its_csv(tmp_path):
    """bench/bench_sparse_conv.py --quick: every provider on every shape, ratios against nn.Conv2d."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_sparse_conv.py"), "--quick", "--threads", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "sparse_conv_cpu_quick.csv")))
    assert {r["provider"] for r in rows} == {"nn.Conv2d", "layout=dense", "layout=csr", "layout=csr custom op",
                                            "F.unfold only"}
    assert len(rows) == 5 * 3
    for r in rows:
        assert float(r["time_ms"]) > 0 and r["commit"] and r["torch"]
        if r["provider"] == "nn.Conv2d":
            assert float(r["vs_dense"]) == pytest.approx(1.0)


def test_bench_resnet_epoch_writes_its_csv(tmp_path):
    """bench/bench_resnet_epoch.py on a small Fashion-MNIST-shaped folder: one row per provider, the dense
    row at 1.0x, the dense channels_last baseline, the csr row with every layer csr."""
    from test_data import fake_fashion_dir

    data_dir = fake_fashion_dir(tmp_path / "fm", n_train=256)
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_resnet_epoch.py"), "--threads", "1", "--images", "256", "--rounds", "1",
         "--layouts", "csr", "--data-dir", str(data_dir), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "resnet_epoch_cpu.csv")))
    assert [r["provider"] for r in rows] == ["dense", "signin layout=csr", "dense channels_last"]
    assert float(rows[0]["vs_dense_best"]) == pytest.approx(1.0)
    assert float(rows[1]["best_s"]) > 0 and rows[1]["commit"] and rows[1]["loadavg"]
    assert rows[1]["layouts"] and all(part.endswith(":csr") for part in rows[1]["layouts"].split())
    assert float(rows[2]["best_s"]) > 0 and not rows[2]["layouts"]
    assert float(rows[2]["vs_dense_channels_last_best"]) == pytest.approx(1.0)
