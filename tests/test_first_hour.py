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
    for fmt in ("dense", "csr"):
        path = tmp_path / f"{fmt}.sparse"
        code, _, err = run_cli(["export", str(run), "--format", fmt, "--out", str(path)], capsys)
        assert code == 0, err
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
    assert "finished" in (out + err).lower(), out + err
