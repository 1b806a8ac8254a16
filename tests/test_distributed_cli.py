"""`sparse-engine train` on 2 gloo processes (CPU): `--nproc 2` (DDP) and `--nproc 2 --fsdp` (FSDP2) equal
one process; a multi-process run interrupted in its second epoch and resumed equals the run that was never
interrupted, bit for bit; the errors a user can cause are one line, before any process starts (checked in this process: the
launcher's checks run before it starts any).

Each run is a tiny MLP on 200 synthetic teacher samples (4 steps per epoch, 2 epochs) and each command
runs under a timeout. Every run is made once per module (``runs``) and shared by the tests.
An interruption is a KeyboardInterrupt raised after the first batch of epoch 2 in every process (as Ctrl-C
gives every process of the terminal's group): the processes are then started here with the environment
torchrun gives them (so that the interruption can be planted), which also covers the torchrun path.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from sparse_engine.app import cli

TIMEOUT_S = 240
CHILD = "import sys; from sparse_engine.app.cli import main; sys.exit(main())"  # the installed command
#: the same command, stopped by a KeyboardInterrupt after the first batch of epoch 2
INTERRUPTED = """
import sys
import sparse_engine.app.data as data_mod
real = data_mod.batches
def batches(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
        if kwargs.get("epoch") == 2 and i == 1:
            raise KeyboardInterrupt
        yield batch
data_mod.batches = batches
from sparse_engine.app.cli import main
sys.exit(main())
"""
TINY = ["--density", "0.2", "--epochs", "2", "--data", "teacher", "--n-train", "200", "--n-test", "64",
        "--batch-size", "50", "--no-progress"]
CASES = {"signin-csr": ["--method", "signin", "--layout", "csr"],
         "static-dense": ["--method", "static", "--layout", "dense", "--momentum", "0.5"],
         "pilot": ["--method", "pilot"]}  # α from ‖θ‖₁ over the shards, the final prune selected over them
TIMING = ("time_s", "samples_per_s")


def _train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, "train", *args], capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def _interrupted(world: int, *args: str) -> list[int]:
    """Run ``train args`` on ``world`` processes started as torchrun would, each interrupted in epoch 2."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", INTERRUPTED, "train", *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                       WORLD_SIZE=str(world), RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(world)]
    try:
        for p in procs:
            p.communicate(timeout=TIMEOUT_S)
        return [p.returncode for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


class Runs:
    """Each run made once (lazily): name -> its checkpoint.pt contents and stdout."""

    def __init__(self, root) -> None:
        self.root, self.done = root, {}

    def dir(self, name: str) -> str:
        return str(self.root / name)

    def get(self, name: str, *args: str) -> tuple[dict, str]:
        if name not in self.done:
            done = _train(*args, "--out", self.dir(name))
            assert done.returncode == 0, done.stderr[-3000:]
            self.done[name] = (self.load(name), done.stdout)
        return self.done[name]

    def load(self, name: str) -> dict:
        return torch.load(os.path.join(self.dir(name), "checkpoint.pt"), weights_only=True)

    def one(self, case: str) -> dict:
        return self.get(f"one-{case}", *CASES[case], *TINY)[0]

    def fsdp(self, case: str) -> tuple[dict, str]:
        return self.get(f"fsdp-{case}", *CASES[case], *TINY, "--nproc", "2", "--fsdp", "--step-in-backward")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("cli"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].is_floating_point()
               else float((a[k] != b[k]).sum()) for k in a if isinstance(a[k], torch.Tensor))


def _metrics(ckpt: dict) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in ckpt["result"]["epochs"]]


def _same_printed_numbers(one: dict, two: dict) -> None:
    """Every number a run prints is global: the one-process numbers (the loss and the sums over the
    weights up to float32 summation order)."""
    for e1, e2 in zip(one["result"]["epochs"], two["result"]["epochs"], strict=True):
        assert e1["train_acc"] == e2["train_acc"] and e1["test_acc"] == e2["test_acc"]
        assert e1["sign_flips"] == e2["sign_flips"]
        assert e1["train_loss"] == pytest.approx(e2["train_loss"], rel=1e-6)
        assert e1["test_loss"] == pytest.approx(e2["test_loss"], rel=1e-6)
        assert e1["l1"] == pytest.approx(e2["l1"], rel=1e-6)
        assert (e1["beta_mean"] is None) == (e2["beta_mean"] is None)
        if e1["beta_mean"] is not None:
            assert e1["beta_mean"] == pytest.approx(e2["beta_mean"], rel=1e-6)
    for key in ("sign_flips", "signs_changed_vs_init", "active_weights", "density", "parameters", "resets"):
        assert one["result"][key] == two["result"][key], key
    assert one["result"]["layers"] == two["result"]["layers"]


def test_train_cli_on_two_processes_equals_one(runs):
    one = runs.one("signin-csr")
    two, out = runs.get("ddp-signin-csr", *CASES["signin-csr"], *TINY, "--nproc", "2")
    assert "(2 processes)" in out
    assert two["world_size"] == 2 and "shards" not in two
    assert _max_diff(one["model_state"], two["model_state"]) <= 1e-6  # float32, another summation order
    _same_printed_numbers(one, two)


@pytest.mark.parametrize("case", CASES)
def test_fsdp_on_two_processes_equals_one(runs, case):
    one = runs.one(case)
    two, out = runs.fsdp(case)
    assert "(2 processes)" in out
    # checkpoint.pt holds the whole (gathered) model, the optimizer state is in the sharded folder
    assert two["model_state"].keys() == one["model_state"].keys()
    assert two["optimizer_state"] is None and (runs.root / f"fsdp-{case}" / two["shards"] / ".metadata").is_file()
    assert _max_diff(one["model_state"], two["model_state"]) <= 1e-6
    _same_printed_numbers(one, two)
    if case == "signin-csr":
        assert one["result"]["resets"] > 0 and one["result"]["sign_flips"] > 0  # the counts compared are not 0
    if case == "pilot":  # it pruned (the same weights: the model states above are equal)
        assert one["result"]["density"] < 0.5


def test_export_reads_the_checkpoint_of_an_fsdp_run(runs, capsys):
    runs.fsdp("signin-csr")
    out = runs.root / "fsdp.sparse"
    assert cli.main(["export", runs.dir("fsdp-signin-csr"), "--out", str(out)]) == 0, capsys.readouterr().err
    assert out.is_file() and out.stat().st_size > 0


@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_resumed_multiprocess_run_equals_the_uninterrupted_one(runs, wrap):
    if wrap == "ddp":
        args = [*CASES["signin-csr"], *TINY]
        whole, _ = runs.get("ddp-signin-csr", *args, "--nproc", "2")
    else:
        args = [*CASES["static-dense"], *TINY, "--fsdp", "--step-in-backward"]
        whole, _ = runs.fsdp("static-dense")
    where = runs.dir(f"resumed-{wrap}")
    codes = _interrupted(2, *args, "--out", where)
    assert codes == [130, 130], codes
    partial = runs.load(f"resumed-{wrap}")
    assert partial["position"]["epoch"] == 1 and not partial["position"]["finished"]
    done = _train("--resume", where, "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = runs.load(f"resumed-{wrap}")
    assert resumed["position"]["finished"]
    assert _max_diff(whole["model_state"], resumed["model_state"]) == 0
    assert _metrics(whole) == _metrics(resumed)
    if wrap == "ddp":
        assert _max_diff(whole["optimizer_state"]["state"][0], resumed["optimizer_state"]["state"][0]) == 0
    else:  # the folder of epoch 1 was replaced by the final one
        assert sorted(os.listdir(os.path.join(where, "checkpoint.shards"))) == ["epoch2-end"]


def _one_line_error(capsys, args: list[str], says: str) -> None:
    """The launcher's checks run before any process starts: here, in this process."""
    capsys.readouterr()
    code = cli.main(["train", *args])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and says in lines[0], err


@pytest.mark.parametrize("extra, says", [
    (["--nproc", "0"], "--nproc must be >= 1"),
    (["--nproc", "2", "--layout", "auto", "--epochs", "1"], "--layout auto: not on several"),
    (["--nproc", "2", "--compare", "static,signin"], "--compare: runs in one process only"),
    (["--fsdp"], "--fsdp: shards the model over several processes"),
    (["--nproc", "2", "--fsdp", "--method", "static", "--dynamic", "rigl"], "'static' cannot train a sharded model"),
])
def test_train_cli_multiprocess_errors_are_one_line(extra, says, capsys):
    _one_line_error(capsys, extra, says)


def test_resume_on_another_number_of_processes_is_refused_in_one_line(runs, capsys):
    runs.one("signin-csr")
    runs.get("ddp-signin-csr", *CASES["signin-csr"], *TINY, "--nproc", "2")
    _one_line_error(capsys, ["--resume", runs.dir("one-signin-csr"), "--nproc", "2"],
                    "written by 1 process(es), this one has 2; resume with one process")
    _one_line_error(capsys, ["--resume", runs.dir("ddp-signin-csr")], "written by 2 process(es), this one has 1; resume "
                    "with --nproc 2")
    _one_line_error(capsys, ["--resume", runs.dir("ddp-signin-csr"), "--nproc", "2", "--fsdp"],
                    "--fsdp is True here but False in the checkpoint")


#: a child that refuses as every rank of a real run does, rank 0 more slowly than the others
SLOW_RANK0_REFUSAL = """
import os, sys, time
sys.stderr.write("sparse-engine train: error: the same refusal\\n")
sys.stderr.flush()
if os.environ["RANK"] == "0":
    time.sleep(1.0)
sys.exit(2)
"""


def test_a_refusal_is_said_once_when_rank_0_ends_last(monkeypatch, capfd):
    """The launcher lets the ranks that meet the same user error end by themselves: rank 0, killed after
    writing its line, made the others' copies of it appear too (a race seen once in the test below)."""
    monkeypatch.setattr(cli, "_CHILD", SLOW_RANK0_REFUSAL)
    assert cli._launch([], 2) == 2
    assert capfd.readouterr().err.count("the same refusal") == 1


def test_a_refusal_at_start_is_one_line_from_all_processes(tmp_path):
    """PILoT's weight rewinding refuses sharded parameters when it is applied, on every rank: said once."""
    done = _train("--method", "pilot", "--iterative", "--rewind", "weight", *TINY, "--nproc", "2", "--fsdp",
                  "--out", str(tmp_path / "run"))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "weight rewinding cannot train a sharded" in lines[0]
