"""Sparse models' state_dict holds tensors only: torch.save(weights_only), safetensors, DCP round trips.

Every method x layout of sparsify, on a small model with a Conv2d and two Linears (no transformers needed
here: the Hugging Face round trips are in test_hf_pretrained.py).
"""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from _hf import CASES, sparsify_case
from sparse_engine.nn.linear import SparseModule

def _model(method: str, layout: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 4))
    return sparsify_case(model, method, layout, {"input": torch.randn(2, 3, 8, 8)}, seed, density=0.3,
                         block_shape=(4, 4), beta=0.5)


def assert_same_state(a: nn.Module, b: nn.Module, layer_records: bool = True) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if not layer_records and k.endswith("_extra_state") and ".param." not in k:
            continue
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("method,layout", CASES)
def test_state_dict_is_tensors_only_and_loads_with_weights_only(method, layout):
    model = _model(method, layout)
    sd = model.state_dict()
    assert all(isinstance(t, torch.Tensor) for t in sd.values()), [k for k, t in sd.items()
                                                                  if not isinstance(t, torch.Tensor)]
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = _model(method, layout, seed=1)  # other values and masks (another nnz)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert_same_state(model, fresh)


@pytest.mark.parametrize("method,layout", CASES)
def test_safetensors_save_model_load_model(method, layout, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
    model = _model(method, layout)
    safetensors_torch.save_model(model, str(tmp_path / "m.safetensors"))
    fresh = _model(method, layout, seed=1)
    missing, unexpected = safetensors_torch.load_model(fresh, str(tmp_path / "m.safetensors"))
    assert not missing and not unexpected
    assert_same_state(model, fresh)


@pytest.mark.parametrize("method,layout", [("signin", "dense"), ("signin", "csr"), ("static", "bsr"),
                                           ("pilot-pruned", "dense")])
def test_distributed_checkpoint_round_trip(method, layout, tmp_path):
    dcp = pytest.importorskip("torch.distributed.checkpoint", reason="this torch has no distributed checkpoint")
    model = _model(method, layout)
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path))
    fresh = _model(method, layout)  # DCP loads in place: same structure (masks), other values
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    sd = fresh.state_dict()
    dcp.load(sd, checkpoint_id=str(tmp_path))
    fresh.load_state_dict(sd)
    assert_same_state(model, fresh)


def test_checkpoints_with_dict_records_still_load():
    # What state_dict held before the records were tensors: a dict per parameterization, none per layer.
    model = _model("signin", "csr")
    sd = {k: v for k, v in model.state_dict().items() if not (k.endswith("_extra_state") and ".param." not in k)}
    for k in [k for k in sd if k.endswith("param._extra_state")]:
        pz = model.get_submodule(k[: -len("._extra_state")])
        sd[k] = {"kind": pz.kind, "layout": pz.layout, "weight_shape": list(pz.weight_shape),
                 "block_shape": list(pz.block_shape)}
    fresh = _model("signin", "csr", seed=1)
    fresh.load_state_dict(sd)
    assert_same_state(model, fresh, layer_records=False)  # without a record a layer keeps its own options


def test_dense_checkpoint_into_a_sparse_model_is_one_clear_error():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    sparse = _model("signin", "dense")
    sd = dense.state_dict()
    with pytest.raises(ValueError, match=r"^0: the checkpoint holds a dense weight \(0.weight\) but this layer is a "
                                         r"SparseConv2d .*load the checkpoint into the dense model, then sparsify"):
        sparse.load_state_dict(sd)


def test_a_checkpoint_of_another_kind_changes_nothing():
    a, b = _model("signin", "csr"), _model("static", "csr")
    before = {k: v.clone() for k, v in b.state_dict().items()}
    with pytest.raises(ValueError, match="checkpoint has kind='signin' but this parameterization has kind='masked'"):
        b.load_state_dict(a.state_dict())
    after = b.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_auto_layer_adopts_the_saved_choice():
    model = _model("signin", "auto")
    choice = {n: m.resolved_layout for n, m in model.named_modules() if isinstance(m, SparseModule)}
    assert all(v is not None for v in choice.values())
    fresh = _model("signin", "auto", seed=1)
    for m in fresh.modules():
        if isinstance(m, SparseModule):
            m._resolved = None  # unresolved: would measure again at the first forward
    fresh.load_state_dict(model.state_dict())
    assert {n: m.resolved_layout for n, m in fresh.named_modules() if isinstance(m, SparseModule)} == choice
