"""`sparse-engine train --resume`: an interrupted run continues bit for bit; bad checkpoints and
mismatching options are refused with one line (exit code 2).

The runs are tiny (the 784-300-100-10 MLP on 192 synthetic teacher samples, 3 steps per epoch, float32 on
CPU with one thread) so that each straight / interrupted+resumed pair takes a few seconds. An
interruption is a KeyboardInterrupt raised in the middle of an epoch (the batch iterator of that epoch
raises after its first batch), as Ctrl-C would: the partial epoch is lost and the run continues from the
checkpoint of the last finished epoch.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from sparse_engine.app import cli
from sparse_engine.app import data as data_mod
from sparse_engine.app.checkpoint import CHECKPOINT_FILE, CheckpointError, read_checkpoint
from sparse_engine.app.config import ConfigError, TrainConfig
from sparse_engine.app.loop import train

BASE = {"model": "mlp", "density": 0.3, "data": "teacher", "n_train": 192, "n_test": 64, "batch_size": 64,
        "epochs": 4, "progress": False}
TINY = ["--data", "teacher", "--n-train", "192", "--n-test", "64", "--batch-size", "64", "--no-progress"]
TIMING = ("time_s", "samples_per_s")


def interrupt_in_epoch(monkeypatch, epoch: int) -> None:
    """Make the run stop with KeyboardInterrupt after the first batch of ``epoch`` (1-based, all rounds)."""
    real = data_mod.batches

    def batches(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if kwargs.get("epoch") == epoch and i == 1:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(data_mod, "batches", batches)


def assert_same(a, b, where: str = "") -> None:
    """Exact equality of nested checkpoint contents (tensors: same dtype, shape and bits)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        if a.is_floating_point():  # NaN == NaN here: the same bits are the same state
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), where
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
        assert a == b or both_nan, f"{where}: {a!r} != {b!r}"


def metrics(result: dict) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in result["epochs"]]


CASES = {
    "static": ({"method": "static"}, 3),
    "signin-step-resets": ({"method": "signin", "reset_every": 2, "reset_unit": "step"}, 3),  # across epochs
    "signin-adamw-csr-wdoff": ({"method": "signin", "optimizer": "adamw", "lr": 0.01, "layout": "csr",
                                "wd_switchoff": 0.5}, 2),
    "pilot-controller": ({"method": "pilot"}, 4),
    # iterative PILoT: 2 epochs, then rounds of 1 epoch at 0.8, 0.64, 0.6; stops inside the second round
    "pilot-iterative-weight-rewind": ({"method": "pilot", "iterative": True, "rewind": "weight", "density": 0.6,
                                       "epochs": 2}, 4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_interrupted_and_resumed_run_is_bit_identical(case, tmp_path, monkeypatch):
    opts, stop_epoch = CASES[case]
    cfg = dict(BASE, **opts)
    straight = train(TrainConfig(**cfg, out_dir=str(tmp_path / "straight")))

    with monkeypatch.context() as m:
        interrupt_in_epoch(m, stop_epoch)
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(**cfg, out_dir=str(tmp_path / "resumed")))
    partial = json.loads((tmp_path / "resumed" / "result.json").read_text())
    assert partial["status"] == "interrupted" and len(partial["epochs"]) == stop_epoch - 1
    _, ck = read_checkpoint(tmp_path / "resumed")
    assert ck["position"]["epoch"] == stop_epoch - 1  # the last finished epoch

    resumed = train(TrainConfig(**cfg, out_dir=str(tmp_path / "resumed")), resume=tmp_path / "resumed")
    assert resumed["resumed"] == [{"checkpoint": str(tmp_path / "resumed" / CHECKPOINT_FILE),
                                   "after_epoch": stop_epoch - 1}]
    assert metrics(resumed) == metrics(straight)  # losses, accuracies, lr, sign flips, β, α, ... per epoch
    for key in ("final", "density", "layers", "sign_flips", "signs_changed_vs_init", "resets", "method_log",
                "skipped_steps"):
        assert resumed[key] == straight[key], key
    # the state after the last epoch: parameters (m, w, masks, β), optimizer buffers, step counts, lr and
    # its schedule, the method's schedules, the random generators
    _, a = read_checkpoint(tmp_path / "straight")
    _, b = read_checkpoint(tmp_path / "resumed")
    for key in ("position", "model_state", "optimizer_state", "scheduler_state", "method_state", "method_logs",
                "rng", "signs0", "flips_total"):
        if key == "position":
            a[key].pop("elapsed_s"), b[key].pop("elapsed_s")
        assert_same(a[key], b[key], key)
    assert any(v for v in a["optimizer_state"]["state"].values())  # there was optimizer state to restore
    # the exported models are the same too
    for run in ("straight", "resumed"):
        assert cli.main(["export", str(tmp_path / run), "--format", "dense", "--out", str(tmp_path / f"{run}.sparse")]) == 0
    assert (tmp_path / "straight.sparse").read_bytes() == (tmp_path / "resumed.sparse").read_bytes()


def test_resume_continues_the_random_streams(tmp_path, monkeypatch):
    """Input noise drawn from torch's, numpy's and Python's global generators (as augmentation or dropout
    would) continues the same streams after a resume: their states are part of the checkpoint."""
    import random

    import numpy as np

    real = data_mod.batches

    def noisy(*args, **kwargs):
        for xb, yb in real(*args, **kwargs):
            noise = 0.1 * torch.randn_like(xb) + float(np.random.rand()) + random.random()
            yield xb + noise, yb

    monkeypatch.setattr(data_mod, "batches", noisy)
    cfg = dict(BASE, method="static", epochs=3)

    def seeded_train(out, **kwargs):
        np.random.seed(1)
        random.seed(2)
        return train(TrainConfig(**cfg, out_dir=str(tmp_path / out)), **kwargs)

    straight = seeded_train("a")
    with monkeypatch.context() as m:
        interrupt_in_epoch(m, 3)
        with pytest.raises(KeyboardInterrupt):
            seeded_train("b")
    np.random.seed(99)  # whatever the generators hold now, the resumed run continues the saved streams
    random.seed(99)
    torch.manual_seed(99)
    resumed = train(TrainConfig(**cfg, out_dir=str(tmp_path / "b")), resume=tmp_path / "b")
    assert metrics(resumed) == metrics(straight) and resumed["final"] == straight["final"]


def test_resume_keeps_the_measured_layouts(tmp_path, monkeypatch):
    """layout="auto" (the main job's): a resumed run uses the layouts its first part measured, not a new
    measurement, which may choose otherwise (here: forced to) and would rebuild the weights' storage
    under the optimizer."""
    from sparse_engine.nn import autolayout

    def measurements_choose(layout):
        monkeypatch.setattr(autolayout, "choose", lambda key, make_runners, **kw: autolayout.Decision(layout))

    cfg = dict(BASE, method="signin", layout="auto", epochs=3)
    measurements_choose("dense")
    straight = train(TrainConfig(**cfg, out_dir=str(tmp_path / "a")))
    with monkeypatch.context() as m:
        interrupt_in_epoch(m, 3)
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(**cfg, out_dir=str(tmp_path / "b")))
    _, ck = read_checkpoint(tmp_path / "b")
    assert ck["layouts"] and set(ck["layouts"].values()) == {"dense"}
    measurements_choose("csr")
    resumed = train(TrainConfig(**cfg, out_dir=str(tmp_path / "b")), resume=tmp_path / "b")
    assert metrics(resumed) == metrics(straight) and resumed["final"] == straight["final"]
    assert {lay["name"]: lay["kind"] for lay in resumed["layers"]} == {lay["name"]: lay["kind"] for lay in
                                                                        straight["layers"]}


def test_a_resume_that_loses_state_would_be_caught(tmp_path, monkeypatch):
    """The comparison above can fail: the same interrupted run resumed with its momentum buffers zeroed
    (what a resume that restores the weights alone does) ends elsewhere."""
    from sparse_engine.app.checkpoint import digest as _digest
    from sparse_engine.app.checkpoint import save_atomic as _save_atomic

    cfg = dict(BASE, method="signin", epochs=3)
    straight = train(TrainConfig(**cfg, out_dir=str(tmp_path / "a")))
    with monkeypatch.context() as m:
        interrupt_in_epoch(m, 3)
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(**cfg, out_dir=str(tmp_path / "b")))
    path, ck = read_checkpoint(tmp_path / "b")
    for state in ck["optimizer_state"]["state"].values():
        state["momentum_buffer"].zero_()
    ck["sha256"] = _digest(ck)
    _save_atomic(ck, path)
    broken = train(TrainConfig(**cfg, out_dir=str(tmp_path / "b")), resume=path)
    assert metrics(broken)[:2] == metrics(straight)[:2]
    assert metrics(broken)[2] != metrics(straight)[2]


# ------------------------------------------------------------------------------------------------ CLI


def run_cli(args, capsys):
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_interrupt_then_resume(tmp_path, capsys, monkeypatch):
    args = ["train", "--method", "signin", "--density", "0.3", "--epochs", "3", "--reset-every", "2",
            "--reset-unit", "step", *TINY]
    code, out, err = run_cli([*args, "--out", str(tmp_path / "straight")], capsys)
    assert code == 0, err
    with monkeypatch.context() as m:
        interrupt_in_epoch(m, 2)
        code, out, err = run_cli([*args, "--out", str(tmp_path / "run")], capsys)
    assert code == 130 and "Traceback" not in err
    assert f"--resume {tmp_path / 'run'}" in err  # says how to continue
    # the configuration comes from the checkpoint: no other option needed (--threads may change)
    code, out, err = run_cli(["train", "--resume", str(tmp_path / "run"), "--threads", "1"], capsys)
    assert code == 0, err
    assert "resumed from" in err and "after epoch 1" in err and "signin" in out
    a = json.loads((tmp_path / "straight" / "result.json").read_text())
    b = json.loads((tmp_path / "run" / "result.json").read_text())
    assert metrics(a) == metrics(b) and a["final"] == b["final"] and b["status"] == "done"
    # options that agree with the checkpoint are accepted; --out writes the continuation elsewhere
    code, _, err = run_cli(["train", "--resume", str(tmp_path / "run" / CHECKPOINT_FILE), "--method", "signin",
                            "--density", "0.3", "--out", str(tmp_path / "copy"), "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "copy" / "result.json").read_text())["final"] == a["final"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    train(TrainConfig(**dict(BASE, method="pilot", epochs=1), out_dir=str(d)))
    return d


@pytest.mark.parametrize("option, value, shown", [
    ("--density", "0.2", "--density is 0.2 here but 0.3"),
    ("--method", "signin", "--method is 'signin' here but 'pilot'"),
    ("--epochs", "5", "--epochs is 5 here but 1"),
    ("--model", "cnn", "--model is 'cnn' here but 'mlp'"),
    ("--lr", "0.05", "--lr is 0.05 here but 0.1"),
    ("--n-train", "128", "--n-train is 128 here but 192"),
    ("--alpha", "0.01", "--alpha is 0.01 here but None"),
    ("--seed", "1", "--seed is 1 here but 0"),
])
def test_cli_resume_refuses_a_different_configuration(option, value, shown, finished_run, capsys):
    code, _, err = run_cli(["train", "--resume", str(finished_run), option, value], capsys)
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparse-engine train: error: cannot resume"), err
    assert shown in lines[0], err


def test_cli_resume_refuses_compare_on_a_single_run(finished_run, capsys):
    code, _, err = run_cli(["train", "--resume", str(finished_run), "--compare", "static,pilot"], capsys)
    assert code == 2 and "--compare" in err and "Traceback" not in err


def test_api_resume_refuses_a_different_configuration(finished_run):
    with pytest.raises(ConfigError, match=r"density is 0\.5 here but 0\.3"):
        train(TrainConfig(**dict(BASE, method="pilot", epochs=1, density=0.5)), write=False, resume=finished_run)
    # the data behind the same options must be the same samples too
    from sparse_engine.app.data import synthetic_teacher

    other = synthetic_teacher(192, 64, seed=7)
    with pytest.raises(ConfigError, match="the data differs"):
        train(TrainConfig(**dict(BASE, method="pilot", epochs=1)), other, write=False, resume=finished_run)


def _largest_tensor_data(path: Path) -> int:
    """Offset of the middle of the largest tensor's bytes in a torch.save file (a zip archive): the
    middle of the file may be zip structure or alignment padding, which torch.load never reads."""
    import zipfile

    raw = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    off = info.header_offset  # local file header: 30 bytes, then the name and the extra field
    data = off + 30 + int.from_bytes(raw[off + 26:off + 28], "little") + int.from_bytes(raw[off + 28:off + 30], "little")
    return data + info.file_size // 2


def _bad_files(tmp_path: Path, good: Path) -> dict[str, tuple[Path, str]]:
    raw = (good / CHECKPOINT_FILE).read_bytes()
    files: dict[str, tuple[Path, str]] = {}

    def add(name: str, data: bytes, match: str) -> None:
        (tmp_path / name).write_bytes(data)
        files[name] = (tmp_path / name, match)

    add("garbage.pt", b"this is not a checkpoint at all\n", "not a torch.save file")
    add("empty.pt", b"", "not a torch.save file")
    add("truncated.pt", raw[: len(raw) // 2], "corrupt or truncated")
    flipped = bytearray(raw)
    start = _largest_tensor_data(good / CHECKPOINT_FILE)
    for i in range(start, start + 8):  # inside tensor data: torch.load does not notice
        flipped[i] ^= 0x10
    add("flipped.pt", bytes(flipped), "corrupt")
    assert cli.main(["export", str(good), "--format", "dense", "--out", str(tmp_path / "model.sparse")]) == 0
    files["exported"] = (tmp_path / "model.sparse", "exported model")
    torch.save({"weights": torch.ones(3)}, tmp_path / "foreign.pt")
    files["foreign"] = (tmp_path / "foreign.pt", "not a `sparse-engine train` checkpoint")
    torch.save({"module": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")
    files["pickled"] = (tmp_path / "pickled.pt", "weights_only")
    files["missing"] = (tmp_path / "nowhere", "does not exist")
    (tmp_path / "emptydir").mkdir()
    files["emptydir"] = (tmp_path / "emptydir", "holds no checkpoint.pt")
    return files


def test_cli_resume_refuses_corrupt_and_foreign_files(tmp_path, finished_run, capsys):
    for name, (path, match) in _bad_files(tmp_path, finished_run).items():
        code, _, err = run_cli(["train", "--resume", str(path)], capsys)
        assert code == 2, (name, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (name, err)
        assert match in err, (name, err)
        with pytest.raises(CheckpointError):
            read_checkpoint(path)


def test_checkpoint_is_written_atomically_and_loads_safely(tmp_path, monkeypatch):
    cfg = TrainConfig(**dict(BASE, method="signin", epochs=2), out_dir=str(tmp_path))
    train(cfg)
    path = tmp_path / CHECKPOINT_FILE
    before = path.read_bytes()
    ck = torch.load(path, weights_only=True)  # tensors and plain containers only
    assert ck["format"] == "sparse_engine.train_checkpoint" and ck["position"]["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "result.json"]

    real_save = torch.save

    def failing_save(obj, f, *a, **k):  # writes half a file, then the disk is full
        real_save(obj, f, *a, **k)
        f.seek(0)
        f.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        train(cfg)
    monkeypatch.undo()
    assert path.read_bytes() == before  # the previous checkpoint is untouched
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # and no temporary file is left


# -------------------------------------------------------------------------------------------- compare


def test_compare_resume_reuses_finished_methods_and_continues_the_interrupted_one(tmp_path, capsys, monkeypatch):
    args = ["train", "--compare", "dense,static,signin", "--density", "0.3", "--epochs", "2", *TINY]
    code, straight_out, err = run_cli([*args, "--out", str(tmp_path / "straight")], capsys)
    assert code == 0, err

    # stop in signin's second epoch: dense and static have finished
    real = data_mod.batches
    calls = {"n": 0}

    def batches(*a, **k):
        calls["n"] += 1
        for i, b in enumerate(real(*a, **k)):
            if calls["n"] == 6 and i == 1:  # 2 epochs each: the 6th epoch is signin's second
                raise KeyboardInterrupt
            yield b

    with monkeypatch.context() as m:
        m.setattr(data_mod, "batches", batches)
        code, _, err = run_cli([*args, "--out", str(tmp_path / "run")], capsys)
    assert code == 130 and f"--resume {tmp_path / 'run'}" in err
    assert not (tmp_path / "run" / "compare.json").exists()
    dense_result = (tmp_path / "run" / "dense" / "result.json").read_text()

    code, out, err = run_cli(["train", "--resume", str(tmp_path / "run"), "--no-progress"], capsys)
    assert code == 0, err
    assert (tmp_path / "run" / "dense" / "result.json").read_text() == dense_result  # not trained again
    a = json.loads((tmp_path / "straight" / "compare.json").read_text())
    b = json.loads((tmp_path / "run" / "compare.json").read_text())
    assert a["methods"] == b["methods"] == ["dense", "static", "signin"]
    for m in a["methods"]:
        ra, rb = a["results"][m], b["results"][m]
        assert ra["final"] == rb["final"] and ra["test_acc_per_epoch"] == rb["test_acc_per_epoch"], m
    strip = lambda text: [re.sub(r"\s+\S+$", "", line) for line in text.splitlines() if not line.startswith("results:")]
    assert strip(out) == strip(straight_out)  # the same table (s/epoch aside)

    # a different method list or configuration is refused
    code, _, err = run_cli(["train", "--resume", str(tmp_path / "run"), "--compare", "dense,signin"], capsys)
    assert code == 2 and "--compare is dense,signin here" in err
    code, _, err = run_cli(["train", "--resume", str(tmp_path / "run"), "--density", "0.5"], capsys)
    assert code == 2 and "--density is 0.5 here but 0.3" in err
