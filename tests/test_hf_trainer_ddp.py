"""SparseTrainerCallback under Trainer's own DDP launch: ``torchrun --nproc_per_node 2`` (gloo, CPU) runs
tests/_hf_torchrun.py; both replicas must end identical (weights, factors, masks) with the Sign-In resets
at the same steps. Bounded: the launch is killed after 300 s."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _hf import import_transformers

import_transformers()
pytest.importorskip("accelerate", reason="accelerate is not installed (pip install -e '.[hf]'); Trainer needs it")

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_trainer_ddp_replicas_identical(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(HERE / "_hf_torchrun.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    a, b = (r["state"] for r in ranks)
    assert a.keys() == b.keys() and any(k.endswith(".param.mask") for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"replicas differ in {different}"
    resets = [[h["sparse/resets"] for h in r["logs"]] for r in ranks]
    assert resets[0] == resets[1] and max(resets[0]) == 4, resets  # 8 steps, a reset every 2 steps
