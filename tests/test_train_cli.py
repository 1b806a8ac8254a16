"""`sparse-engine train` and the training loop: results, JSON, compare, step-in-backward, user errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_engine.app import cli
from sparse_engine.app.data import FASHION_MNIST_FILES, DataError, find_fashion_mnist
from sparse_engine.app.config import ConfigError, TrainConfig, load_data
from sparse_engine.app.loop import TrainingDiverged, evaluate, train

TINY = ["--data", "teacher", "--n-train", "384", "--n-test", "128", "--batch-size", "64", "--no-progress"]


def run_cli(args, capsys):
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_train_writes_table_and_json(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(["train", "--method", "signin", "--density", "0.2", "--epochs", "2",
                              "--reset-every", "3", "--reset-unit", "step", "--out", str(out_dir), *TINY], capsys)
    assert code == 0, err
    assert "signin" in out and "test acc" in out and str(out_dir) in out
    r = json.loads((out_dir / "result.json").read_text())
    assert r["status"] == "done" and r["config"]["method"] == "signin"
    assert [e["epoch"] for e in r["epochs"]] == [1, 2]
    for e in r["epochs"]:
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "time_s", "samples_per_s", "sign_flips",
                    "beta_mean"):
            assert key in e, key
    assert 0.0 <= r["final"]["test_acc"] <= 1.0 and len(r["time_per_epoch_s"]) == 2
    assert r["resets"] == 2 * 6 // 3  # 6 steps per epoch, a reset every 3 steps
    sparse = [lay for lay in r["layers"] if lay["kind"] == "signin"]
    assert sparse and all(0 < lay["density"] <= 1 for lay in sparse)
    assert abs(r["density"] - 0.2) < 0.01 and isinstance(r["sign_flips"], int)
    # the run directory holds the trained model: exported from it, it reproduces the final accuracy
    from sparse_engine.export import io

    code, _, err = run_cli(["export", str(out_dir), "--format", "dense", "--out", str(tmp_path / "m.sparse")], capsys)
    assert code == 0, err
    loaded = io.load(tmp_path / "m.sparse")
    ds = load_data(TrainConfig(data="teacher", n_train=384, n_test=128))
    assert evaluate(loaded, ds.x_test, ds.y_test)[1] == r["final"]["test_acc"]


def test_compare_prints_methods_side_by_side(tmp_path, capsys):
    code, out, err = run_cli(["train", "--compare", "dense,static,signin,pilot", "--density", "0.25",
                              "--epochs", "1", "--out", str(tmp_path), *TINY], capsys)
    assert code == 0, err
    rows = [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0] in
            ("dense", "static", "signin", "pilot")]
    assert rows[:4] == ["dense", "static", "signin", "pilot"]
    summary = json.loads((tmp_path / "compare.json").read_text())
    assert summary["methods"] == ["dense", "static", "signin", "pilot"]
    assert summary["results"]["dense"]["density"] == 1.0
    assert summary["results"]["pilot"]["density"] == pytest.approx(0.25, abs=0.01)
    for m in summary["methods"]:
        assert (tmp_path / m / "result.json").exists()
    assert (tmp_path / "table.txt").read_text() == summary["table"]


def test_compare_checks_every_method_before_the_first_trains(tmp_path, capsys):
    """An option one method of the comparison refuses (PILoT trains dense: no csr) stops the run before
    anything trains, instead of after the methods listed before it."""
    code, _, err = run_cli(["train", "--compare", "dense,static,pilot", "--layout", "csr", "--epochs", "1",
                            "--out", str(tmp_path), *TINY], capsys)
    assert code == 2 and "layout must be 'dense' or 'auto'" in err, err
    assert not (tmp_path / "dense").exists() and not (tmp_path / "static").exists()


def test_step_in_backward_gives_the_same_run():
    cfg = dict(model="mlp", method="signin", density=0.3, data="teacher", n_train=256, n_test=64, epochs=2,
               batch_size=64, progress=False, reset_every=2, reset_unit="step")
    a = train(TrainConfig(**cfg), write=False)
    b = train(TrainConfig(**cfg, step_in_backward=True), write=False)
    assert [e["train_loss"] for e in a["epochs"]] == [e["train_loss"] for e in b["epochs"]]
    assert a["final"] == b["final"]


@pytest.mark.parametrize("model, data", [("cnn", "teacher"), ("transformer", "sequences")])
def test_other_models_train(model, data):
    cfg = TrainConfig(model=model, method="signin", density=0.5, data=data, n_train=128, n_test=64, epochs=1,
                      batch_size=64, progress=False)
    r = train(cfg, write=False)
    assert r["status"] == "done" and r["layers"] and 0.0 <= r["final"]["test_acc"] <= 1.0


@pytest.mark.parametrize("args, match", [
    (["--method", "lottery"], "invalid choice: 'lottery'"),
    (["--model", "vgg"], "invalid choice: 'vgg'"),
    (["--density", "0"], r"density must be in \(0, 1\], got 0.0"),
    (["--density", "1.5"], r"density must be in \(0, 1\], got 1.5"),
    (["--density", "nan"], r"density must be in \(0, 1\]"),
    (["--epochs", "0"], "epochs must be a positive int"),
    (["--compare", "dense,lottery"], "method must be one of"),
    (["--lr", "-1"], "lr must be"),
    (["--model", "transformer", "--data", "teacher"], "transformer"),
    (["--method", "pilot", "--layout", "csr"], "layout must be 'dense' or 'auto'"),
])
def test_user_errors_exit_nonzero_without_traceback(args, match, capsys, tmp_path):
    code, _, err = run_cli(["train", *args, "--out", str(tmp_path), *TINY[:2]], capsys)
    assert code == 2
    assert "Traceback" not in err
    import re
    assert re.search(match, err), err


def test_missing_data_directory(capsys, tmp_path):
    code, _, err = run_cli(["train", "--data-dir", str(tmp_path / "nowhere"), "--epochs", "1", "--no-progress"],
                           capsys)
    assert code == 2 and "does not exist" in err and "Traceback" not in err


def test_corrupt_idx_file(capsys, tmp_path):
    for name in FASHION_MNIST_FILES.values():
        (tmp_path / name).write_bytes(b"\x00\x00\x08\x03garbage, not an IDX file")
    code, _, err = run_cli(["train", "--data-dir", str(tmp_path), "--epochs", "1", "--no-progress"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "idx" in err.lower() or "ubyte" in err


def test_nan_loss_exits_with_a_message(capsys, tmp_path):
    code, _, err = run_cli(["train", "--method", "static", "--lr", "1e30", "--epochs", "2", "--out",
                            str(tmp_path), *TINY], capsys)
    assert code == 3 and "diverged" in err and "Traceback" not in err
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["status"] == "diverged" and "error" in r


def test_nonfinite_raise_policy_stops_training():
    cfg = TrainConfig(method="static", lr=1e30, data="teacher", n_train=256, n_test=64, epochs=2, batch_size=64,
                      progress=False, nonfinite="raise")
    with pytest.raises(TrainingDiverged):
        train(cfg, write=False)


def test_train_config_validation_errors():
    with pytest.raises(ConfigError, match="density"):
        TrainConfig(density=0.0).validate()
    with pytest.raises(ConfigError, match="device"):
        TrainConfig(device="tpu:0").validate()
    with pytest.raises(ConfigError, match="reset_policy"):
        train(TrainConfig(data="teacher", n_train=64, n_test=64, reset_policy="flip", progress=False), write=False)
    with pytest.raises(DataError):
        train(TrainConfig(data_dir="/nonexistent/dir", progress=False), write=False)


def test_cli_usage_and_unknown_command(capsys):
    code, _, err = run_cli([], capsys)
    assert code == 2 and "train" in err
    code, _, err = run_cli(["frobnicate"], capsys)
    assert code == 2 and "unknown command 'frobnicate'" in err
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "train" in out


def test_entry_point_process_reports_user_errors_cleanly(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "sparse_engine.app.cli", "train", "--density", "2"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False)
    assert proc.returncode == 2
    assert "density must be in (0, 1]" in proc.stderr and "Traceback" not in proc.stderr


def _fashion_mnist_dir() -> Path | None:
    try:
        return find_fashion_mnist(download=False)
    except DataError:
        return None


@pytest.mark.slow
def test_main_job_command_on_fashion_mnist_subset(tmp_path, capsys):
    """README's main job, shortened (1 epoch on 3000 images), on the real files."""
    d = _fashion_mnist_dir()
    if d is None:
        pytest.skip("Fashion-MNIST files not found (apt-get install dataset-fashion-mnist, or set SPARSE_ENGINE_DATA)")
    code, _, err = run_cli(["train", "--compare", "dense,static,signin,pilot", "--density", "0.1", "--epochs", "1",
                              "--n-train", "3000", "--n-test", "1000", "--no-progress", "--out", str(tmp_path)],
                             capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "compare.json").read_text())
    for m in ("dense", "static", "signin", "pilot"):
        assert summary["results"][m]["final"]["test_acc"] > 0.5  # far above chance (0.1) after one epoch


def test_wd_switchoff_and_iterative_pilot_from_the_cli(tmp_path, capsys):
    code, _, err = run_cli(["train", "--method", "wd_switchoff", "--wd-switchoff", "0.3", "--epochs", "2",
                            "--out", str(tmp_path / "wd"), *TINY], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "wd" / "result.json").read_text())
    assert r["method"] == "wd_switchoff@0.3" and [e["wd_off"] for e in r["epochs"]] == [True, True]
    assert r["epochs"][0]["wd_dose"] == r["epochs"][1]["wd_dose"] > 0  # no decay after the switch-off
    code, _, err = run_cli(["train", "--method", "pilot", "--iterative", "--retrain-epochs", "1", "--density", "0.6",
                            "--epochs", "1", "--out", str(tmp_path / "pilot"), *TINY], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "pilot" / "result.json").read_text())
    assert [e["phase"] for e in r["epochs"]] == ["train", "retrain1", "retrain2", "retrain3"]  # 0.8, 0.64, 0.6
    assert r["density"] == pytest.approx(0.6, abs=0.01)


def test_export_the_dense_baseline_of_a_compare_run(tmp_path, capsys):
    """`train --compare dense,...` leaves the dense baseline's checkpoint; export writes it as a
    compact file of dense inference layers (the same network), refuses sparse formats, and bench-infer
    reads the file."""
    from sparse_engine.export import io
    from sparse_engine.export.infer import InferModule

    code, _, err = run_cli(["train", "--compare", "dense,static", "--density", "0.25", "--epochs", "1",
                            "--out", str(tmp_path), *TINY], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "dense" / "result.json").read_text())
    ds = load_data(TrainConfig(data="teacher", n_train=384, n_test=128))
    for fmt in ("auto", "dense"):
        out = tmp_path / f"dense-{fmt}.sparse"
        code, text, err = run_cli(["export", str(tmp_path / "dense"), "--format", fmt, "--out", str(out)], capsys)
        assert code == 0, err
        assert "wrote" in text and "trained dense" in text
        model = io.load(out)
        layers = [m for m in model.modules() if isinstance(m, InferModule)]
        assert len(layers) == 3 and {m.format for m in layers} == {"dense"} and all(m.density == 1.0 for m in layers)
        # the same network: the run's final test loss and accuracy, exactly
        assert evaluate(model, ds.x_test, ds.y_test) == (r["final"]["test_loss"], r["final"]["test_acc"])
    code, _, err = run_cli(["export", str(tmp_path / "dense"), "--format", "csr"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "dense model" in err and "--format dense" in err
    code, text, err = run_cli(["bench-infer", str(tmp_path / "dense-auto.sparse"), "--batch", "1,2", "--budget", "0.01",
                               "--json"], capsys)
    assert code == 0, err
    assert [row["batch"] for row in json.loads(text)["rows"]] == [1, 2]


def test_export_a_run_that_has_not_finished(tmp_path, capsys):
    """A run directory exports from its checkpoint: the per-epoch one of a stopped run, the last one of a
    finished run (the only record of the model a run directory holds)."""
    from sparse_engine.export import io

    cfg = TrainConfig(method="signin", density=0.25, data="teacher", n_train=384, n_test=128, epochs=1,
                      batch_size=64, progress=False, out_dir=str(tmp_path / "run"))
    r = train(cfg)
    code, _, err = run_cli(["export", str(tmp_path / "run"), "--format", "csr", "--out", str(tmp_path / "m.sparse")],
                           capsys)
    assert code == 0, err
    ds = load_data(cfg)
    assert evaluate(io.load(tmp_path / "m.sparse"), ds.x_test, ds.y_test)[1] == r["final"]["test_acc"]


def test_channels_last_trains_the_cnn_as_the_contiguous_run():
    """--channels-last: the same run in NHWC memory format (dense and csr convs, batch norms), equal up to
    the rounding of sums taken in another order."""
    base = dict(model="cnn", method="signin", density=0.3, data="teacher", n_train=192, n_test=64, epochs=1,
                batch_size=64, progress=False)
    import torch

    seen = []  # the memory format of every batch norm's input during training, the stem's included

    def record(module, args):
        if isinstance(module, torch.nn.BatchNorm2d) and module.training:
            seen.append(args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous())

    for layout in ("dense", "csr"):
        a = train(TrainConfig(**base, layout=layout), write=False)
        handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
        try:
            b = train(TrainConfig(**base, layout=layout, channels_last=True), write=False)
        finally:
            handle.remove()
        assert seen and all(seen), f"{layout}: {seen.count(False)} of {len(seen)} batch norms ran NCHW"
        seen.clear()
        assert a["status"] == b["status"] == "done"
        assert b["epochs"][0]["train_loss"] == pytest.approx(a["epochs"][0]["train_loss"], rel=1e-4)
        assert b["final"]["test_loss"] == pytest.approx(a["final"]["test_loss"], rel=1e-4)
    with pytest.raises(ConfigError, match="channels_last and fsdp"):
        TrainConfig(channels_last=True, fsdp=True).validate()
