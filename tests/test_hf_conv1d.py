"""transformers' Conv1D (GPT-2): converted to the equivalent nn.Linear and sparsified like one."""
import torch

import sparse_engine as se
from _hf import import_transformers

transformers = import_transformers()


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=61, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).double().eval()


def test_conv1d_becomes_the_linear_it_is():
    from sparse_engine.integrations.hf.conv1d import linears_from_conv1d

    model = tiny_gpt2()
    ids = torch.randint(0, 61, (2, 9))
    before = model(ids).logits
    names = linears_from_conv1d(model)
    assert len(names) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in names)
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-12, atol=1e-12)


def test_sparsify_replaces_gpt2s_conv1d_layers():
    model = tiny_gpt2()
    ids = torch.randint(0, 61, (2, 9))
    before = model(ids).logits
    report = se.sparsify(model, method="signin", density=1.0, layout="dense")
    replaced = {layer.name for layer in report.layers}
    assert {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"} <= replaced
    assert "lm_head" not in replaced  # tied to the token embedding
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-9, atol=1e-9)  # density 1: same function
    se.sparsify(tiny_gpt2(), method="signin", density=0.1, layout="csr")  # compact layout builds
