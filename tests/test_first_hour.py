"""A new user's first steps: the package's attributes, what export ships, the command line's messages.

* ``import sparse_engine as se`` reaches ``se.optim``, ``se.nn``, ``se.methods``, ``se.ops``, ``se.export``
  (checked in a fresh interpreter: in this one other tests have imported the subpackages already).
* A PILoT run's exported model is the trained model: the run's checkpoint and the ``export`` file score
  exactly the test accuracy the run reported, with the layer densities it reported.
* The train command: every option of ``--help`` shows its default; a bad value prints one line; export
  of a file that is not a model never repeats torch's ``weights_only=False`` advice; resuming a finished
  run says it is finished.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_engine.app import cli
from sparse_engine.app.config import TrainConfig, load_data
from sparse_engine.app.loop import evaluate

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data", "teacher", "--n-train", "384", "--n-test", "128", "--batch-size", "64", "--no-progress"]


def run_cli(args, capsys):
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------- package attributes


def test_subpackages_are_attributes_of_a_fresh_import():
    code = ("import sparse_engine as se\n"
            "import torch\n"
            "assert se.optim.SGD is not None and se.nn.SparseLinear is not None\n"
            "assert se.methods.METHODS and se.ops.backends is not None and se.export.extract is not None\n"
            "opt = se.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)\n"
            "print(type(opt).__name__, sorted(n for n in ('optim', 'nn', 'methods', 'ops', 'export') if n in dir(se)))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["SGD", "['export',", "'methods',", "'nn',", "'ops',", "'optim']"], r.stdout


def test_unknown_attribute_names_itself():
    import sparse_engine as se

    with pytest.raises(AttributeError, match="no_such_thing"):
        se.no_such_thing  # noqa: B018


# ------------------------------------------------------------------------- export = trained model


def test_pilot_run_exports_the_trained_model(tmp_path, capsys):
    """The global prune at the end of a PILoT run leaves layers above and below the target; export
    ships exactly those masks (not each layer re-pruned to the target) and so the reported accuracy."""
    from sparse_engine.app.checkpoint import model_from_checkpoint, read_checkpoint
    from sparse_engine.export import io

    run = tmp_path / "run"
    code, out, err = run_cli(["train", "--method", "pilot", "--density", "0.1", "--epochs", "1", "--out", str(run),
                              *TINY], capsys)
    assert code == 0, err
    r = json.loads((run / "result.json").read_text())
    reported = {lay["name"]: lay["density"] for lay in r["layers"] if lay["kind"] == "pilot"}
    assert len(set(round(d, 3) for d in reported.values())) > 1, reported  # the global prune: unequal layers
    ds = load_data(TrainConfig(data="teacher", n_train=384, n_test=128))
    _, ckpt = read_checkpoint(run)
    trained = model_from_checkpoint(ckpt)[0]
    assert evaluate(trained, ds.x_test, ds.y_test) == (r["final"]["test_loss"], r["final"]["test_acc"])
    for fmt in ("dense", "csr", "auto"):
        path = tmp_path / f"{fmt}.sparse"
        code, out, err = run_cli(["export", str(run), "--format", fmt, "--out", str(path), "--batch-size", "8"],
                                 capsys)
        assert code == 0, err
        if fmt == "auto":  # the automatic choice says what it measured and why, layer by layer
            assert "auto: measured on this machine" in out and "at batch 8" in out, out
            assert sum("speed-up" in line and "input 8x" in line for line in out.splitlines()) == 3, out
        model = io.load(path)
        shipped = {name: m.density for name, m in model.named_modules() if hasattr(m, "extract_info")
                   or type(m).__name__.startswith("Infer")}
        for name, d in reported.items():
            assert shipped[name] == pytest.approx(d, abs=1e-9), (fmt, name, shipped[name], d)
        assert evaluate(model, ds.x_test, ds.y_test)[1] == r["final"]["test_acc"], fmt


# ------------------------------------------------------------------------------------ command line


def test_train_help_shows_every_default(capsys):
    code, out, _ = run_cli(["train", "--help"], capsys)
    assert code == 0
    # one entry per option: its flag line and the indented help lines after it
    entries, current = [], None
    for line in out.splitlines():
        stripped = line.strip()
        if line.startswith("  -"):  # a flag at the option column (help lines are indented further)
            current = [stripped]
            entries.append(current)
        elif current is not None and line.startswith("      ") and stripped:
            current.append(stripped)
        else:
            current = None
    assert len(entries) > 30
    missing = [e[0].split()[0] for e in entries if not e[0].startswith("-h") and "default" not in " ".join(e)]
    assert not missing, missing


@pytest.mark.parametrize("args, names", [
    (["--density", "abc"], "--density"),
    (["--method", "foo"], "--method"),
    (["--model", "resnet50"], "--model"),
    (["--epochs", "1.5"], "--epochs"),
])
def test_bad_train_option_prints_one_line(args, names):
    r = subprocess.run([sys.executable, "-m", "sparse_engine.app.cli", "train", *args], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("sparse-engine train: error: ") and names in lines[0], lines[0]


def test_export_of_a_random_file_gives_no_unsafe_advice(tmp_path, capsys):
    path = tmp_path / "random.bin"
    path.write_bytes(os.urandom(4096))
    code, out, err = run_cli(["export", str(path)], capsys)
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "random.bin" in err
    assert "weights_only=False" not in err + out and "weights_only" not in err + out


def test_resuming_a_finished_run_says_it_is_finished(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--method", "static", "--density", "0.25", "--epochs", "1", "--out", str(run),
                            *TINY], capsys)
    assert code == 0, err
    code, out, err = run_cli(["train", "--resume", str(run), "--no-progress"], capsys)
    assert code == 0, err
    assert "this run had finished (epochs: 1); nothing left to train" in out, out + err


# ---------------------------------------------------------------------------------- density asked


SHAPES = [(20, 10), (100, 64), (64, 64), (10, 300), (300, 784)]  # (out_features, in_features)


@pytest.mark.parametrize("layout", ["dense", "block", "csr", "bsr", "auto"])
def test_density_of_every_layout_is_exact_or_refused(layout):
    """Element layouts keep exactly round(density × numel) weights; the block layouts the nearest whole
    number of blocks, with a warning naming the achieved density when that is more than half a block
    off, and a refusal naming density and block_shape when not one block would be kept."""
    import warnings

    from sparse_engine.nn import SparseLinear

    refused, want_refused = 0, 0
    for out_f, in_f in SHAPES:
        for d in (0.5, 0.1, 0.03):
            numel = out_f * in_f
            blocks = -(-out_f // 32) * -(-in_f // 32)
            want_refused += layout in ("block", "bsr") and round(d * blocks) == 0
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    lin = SparseLinear(in_f, out_f, density=d, layout=layout)
                except ValueError as e:
                    assert layout in ("block", "bsr"), e
                    assert "density=" in str(e) and "block_shape=" in str(e), e
                    refused += 1
                    continue
            said = " ".join(str(w.message) for w in caught)
            if layout in ("dense", "csr", "auto"):
                assert lin.nnz() == round(d * numel), (out_f, in_f, d)
                assert (lin.nnz() == 0) == ("keeps no weight" in said), said
            else:
                assert lin.nnz() > 0
                off = abs(lin.nnz() - d * numel) > min(32, out_f) * min(32, in_f) / 2
                assert off == ("achieved density" in said), (out_f, in_f, d, lin.nnz(), said)
                if off:
                    assert f"{lin.nnz() / numel:.4f}" in said and "density=" in said, said
    assert refused == want_refused


def test_block_layouts_of_the_issue():
    from sparse_engine.nn import SparseConv2d, SparseLinear

    for layout in ("bsr", "block"):
        with pytest.raises(ValueError, match=r"density=0.5 keeps no whole block.*block_shape=\(32, 32\)"):
            SparseLinear(20, 10, density=0.5, layout=layout)
        with pytest.warns(UserWarning, match="achieved density 0.3600"):
            SparseLinear(100, 64, density=0.5, layout=layout)
        with pytest.raises(ValueError, match="block_shape"):
            SparseConv2d(2, 8, 3, density=0.5, layout=layout)
    lin = SparseLinear(20, 10, density=0.5, layout="bsr", block_shape=(5, 5))
    assert lin.density() == 0.5


def test_sparsify_of_nothing_says_so():
    from torch import nn

    from sparse_engine.nn import sparsify

    with pytest.raises(ValueError, match="no nn.Linear / nn.Conv1d / nn.Conv2d"):
        sparsify(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), "static", 0.1)
    with pytest.warns(UserWarning, match="replaced no layer.*dense_first_last"):
        report = sparsify(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), "static", 0.1, dense_first_last=True)
    assert len(report) == 0
    with pytest.warns(UserWarning, match="achieved density"):
        sparsify(nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 10)), "static", 0.1, layout="bsr")


# ------------------------------------------------------------------------------ automatic choices


def test_auto_format_is_stable_under_load(caplog):
    """Two runs of extract(format="auto") on a 4096² layer at 90 % sparsity, each measured afresh while
    another process spins on a CPU, choose the same format, and each logs what it measured and why."""
    import logging

    import torch
    from torch import nn

    from sparse_engine.export import extract as extract_fn
    from sparse_engine.export.extract import _cache
    from sparse_engine.nn import SparseLinear

    model = nn.Sequential(SparseLinear(4096, 4096, density=0.1))
    threads = torch.get_num_threads()
    # One thread: on a shared 2-core machine two OpenMP threads wait on each other at every barrier
    # whenever another process holds a core, which measures the machine's load, not the format.
    torch.set_num_threads(1)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        chosen, reasons = [], []
        for _ in range(2):
            _cache.clear()
            with caplog.at_level(logging.INFO, logger="sparse_engine"):
                caplog.clear()
                out = extract_fn(model, "auto")
            info = out[0].extract_info
            chosen.append(info["format"])
            reasons.append(info["reason"])
            logged = [r.getMessage() for r in caplog.records if "extract:" in r.getMessage()]
            assert logged and info["reason"] in logged[0] and info["format"] in logged[0], logged
            assert set(info["times"]) == {"dense", "csr"} and list(info["times"]["dense"]) == ["1x4096"]
    finally:
        busy.kill()
        busy.wait()
        _cache.clear()
        torch.set_num_threads(threads)
    assert chosen[0] == chosen[1], reasons
    assert all("csr speed-up" in r for r in reasons), reasons
    print(f"1 thread: chose {chosen}; {reasons}")


# ------------------------------------------------------------------------------- benchmark outputs


@pytest.mark.parametrize("script", ["bench_compact_linear", "bench_extract", "bench_sparse_conv", "plot", "run_suite"])
def test_bench_scripts_write_to_the_scratch_folder_by_default(script, monkeypatch):
    """A user's benchmark run writes into runs/bench (git ignores it) unless --out is given: no script
    replaces the committed bench/results by default."""
    import argparse
    import importlib

    class Parsed(Exception):
        pass

    def parse_args(self, args=None, namespace=None):
        raise Parsed(self.get_default("out"))

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    module = importlib.import_module(script)
    with pytest.raises(Parsed) as caught:
        module.main([])
    out = caught.value.args[0]
    scratch = ROOT / "runs" / "bench"
    if out is None:  # the path is made from the device name later
        source = Path(module.__file__).read_text()
        assert '"runs" / "bench"' in source and '"bench" / "results"' not in source
    else:
        assert Path(out).resolve() == scratch.resolve(), out


def test_bench_infer_interleaves_and_reports_the_spread(tmp_path, capsys, monkeypatch):
    """bench-infer times the file's model and its dense equivalent in the same interleaved rounds; the
    speed-up is the median of the per-round ratios, and a wide spread of them is printed as a warning."""
    from torch import nn

    from sparse_engine import tuning
    from sparse_engine.export import extract, io
    from sparse_engine.nn import SparseLinear

    path = tmp_path / "m.sparse"
    io.save(extract(nn.Sequential(SparseLinear(16, 8, density=0.5)), "csr"), path)
    calls = []
    rounds = {"sparse": [1.0, 2.0, 1.0, 4.0, 1.0], "dense": [2.0, 2.0, 2.0, 2.0, 3.0]}  # ratios 2, 1, 2, .5, 3

    def fake(fns, device=None, **kw):
        calls.append(sorted(fns))
        for fn in fns.values():
            fn()
        return {k: list(v) for k, v in rounds.items()}

    monkeypatch.setattr(tuning, "measure_rounds", fake)
    code, out, err = run_cli(["bench-infer", str(path), "--batch", "1,4", "--input-shape", "16"], capsys)
    assert code == 0, err
    assert calls == [["dense", "sparse"]] * 2  # both in one interleaved measurement per batch size
    lines = [ln.split() for ln in out.splitlines() if ln.split() and ln.split()[0] in ("1", "4")]
    assert [ln[-1] for ln in lines] == ["2.00x", "2.00x"], out
    assert out.count("warning: batch") == 2 and "1.00x to 2.00x" in out, out


def test_train_layout_auto_says_what_it_chose(tmp_path, capsys):
    args = [a for a in TINY if a != "--no-progress"]
    code, out, err = run_cli(["train", "--method", "static", "--layout", "auto", "--density", "0.1", "--epochs", "1",
                              "--out", str(tmp_path / "run"), *args], capsys)
    assert code == 0, err
    said = [ln for ln in err.splitlines() if "layout auto:" in ln]
    assert len(said) == 3, err  # the MLP's three layers
    assert all("->" in ln and ("ms" in ln or "only candidate" in ln) for ln in said), said
