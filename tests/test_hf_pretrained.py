"""save_pretrained -> sparse_engine.from_pretrained of sparsified and extracted Hugging Face models.

Models are built from tiny configs (no download). Every method x layout round-trips exactly (same state
tensor for tensor, same layer options, same outputs); extracted encoder and decoder models reload with
identical outputs, generate() and run in pipelines; their files shrink with the density.
"""
from __future__ import annotations

import os

import pytest
import torch

from _hf import CASES, bert_config, import_transformers, llama_config, sparsify_case, word_tokenizer

transformers = import_transformers()

import sparse_engine  # noqa: E402
from sparse_engine.export.extract import extract  # noqa: E402
from sparse_engine.export.infer import InferLinear  # noqa: E402
from sparse_engine.nn import sparsify  # noqa: E402
from sparse_engine.nn.linear import SparseModule  # noqa: E402

def inputs(vocab: int = 97, batch: int = 2, length: int = 9):
    ids = torch.randint(0, vocab, (batch, length))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def sparse_bert(method: str, layout: str, seed: int = 0, cls=None):
    torch.manual_seed(seed)
    model = (cls or transformers.BertForSequenceClassification)(bert_config(transformers)).eval()
    return sparsify_case(model, method, layout, inputs(), seed, density=0.3, block_shape=(8, 8), beta=0.7)


def layer_options(model):
    return {n: (type(m).__name__, m.kind, m.layout, m.resolved_layout, m.storage, m.block_shape, m.seed,
                m.beta_init, m.target_density, float(m.param.beta))
            for n, m in model.named_modules() if isinstance(m, SparseModule)}


def assert_same(a, b, x):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(a(**x).logits, b(**x).logits)


@pytest.mark.parametrize("method,layout", CASES)
def test_save_pretrained_round_trip_is_exact(method, layout, tmp_path):
    model = sparse_bert(method, layout)
    model.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "model.safetensors")
    loaded = sparse_engine.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    assert layer_options(loaded) == layer_options(model)
    for (n, a), (_, b) in zip(model.named_modules(), loaded.named_modules()):
        if isinstance(a, SparseModule):
            ma, mb = a.dense_mask(), b.dense_mask()
            assert (ma is None and mb is None) or torch.equal(ma, mb), n
    assert_same(model, loaded, inputs())


@pytest.mark.parametrize("method,layout", [("signin", "csr"), ("static", "bsr"), ("pilot-pruned", "dense")])
def test_sharded_save_pretrained_round_trip(method, layout, tmp_path):
    model = sparse_bert(method, layout)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    assert_same(model, sparse_engine.from_pretrained(tmp_path), inputs())


def test_tied_decoder_stays_tied(tmp_path):
    model = sparse_bert("signin", "csr", cls=transformers.BertForMaskedLM)
    model.save_pretrained(tmp_path)
    loaded = sparse_engine.from_pretrained(tmp_path)
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    assert_same(model, loaded, inputs())


def test_load_into_a_given_model_and_dense_sparse_mismatches(tmp_path):
    model = sparse_bert("signin", "csr")
    model.save_pretrained(tmp_path / "sparse")
    into = sparse_bert("signin", "dense", seed=3)  # sparse, another layout, masks and values
    out = sparse_engine.from_pretrained(tmp_path / "sparse", model=into)
    assert out is into
    with torch.no_grad():  # same weights, another compute layout: the sums are ordered differently
        x = inputs()
        torch.testing.assert_close(out(**x).logits, model(**x).logits, rtol=1e-5, atol=1e-6)
        assert torch.equal(out.classifier.theta(), model.classifier.theta())
    dense = transformers.BertForSequenceClassification(bert_config(transformers))
    with pytest.raises(ValueError, match=r"the checkpoint holds a sparse SparseLinear \(kind=signin, layout=csr\) "
                                         r"but the model has a Linear there"):
        sparse_engine.from_pretrained(tmp_path / "sparse", model=dense)
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="holds a dense model .*load it with transformers"):
        sparse_engine.from_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="the checkpoint holds a dense weight"):
        sparse_bert("signin", "csr").load_state_dict(dense.state_dict())


# ------------------------------------------------------------------------------------- extracted models


def test_extracted_bert_save_reload_and_feature_extraction_pipeline(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertModel(bert_config(transformers)).eval()
    sparsify(model, "signin", 0.2, layout="csr")
    out = extract(model, "auto", example_inputs=inputs())
    out.save_pretrained(tmp_path)
    loaded = sparse_engine.from_pretrained(tmp_path)
    assert type(loaded) is transformers.BertModel
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in out.modules()]
    assert [m.format for m in loaded.modules() if isinstance(m, InferLinear)] == \
        [m.format for m in out.modules() if isinstance(m, InferLinear)]
    x = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(**x).last_hidden_state, out(**x).last_hidden_state)
    tok = word_tokenizer(transformers, 97)
    feats = transformers.pipeline("feature-extraction", model=loaded, tokenizer=tok, device="cpu")("w1 w5 w7")
    assert torch.tensor(feats).shape == (1, 3, 32)


def test_extracted_decoder_save_reload_generate_and_text_generation_pipeline(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(transformers)).eval()
    sparsify(model, "signin", 0.2)
    x = inputs(96, 1, 8)
    out = extract(model, "csr")
    with torch.no_grad():
        gen = out.generate(**x, max_new_tokens=5, do_sample=False, pad_token_id=0)
    out.save_pretrained(tmp_path)
    loaded = sparse_engine.from_pretrained(tmp_path)
    assert type(loaded) is transformers.LlamaForCausalLM
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, out(**x).logits)
        assert torch.equal(loaded.generate(**x, max_new_tokens=5, do_sample=False, pad_token_id=0), gen)
    tok = word_tokenizer(transformers, 96)
    pipe = transformers.pipeline("text-generation", model=loaded, tokenizer=tok, device="cpu")
    text = pipe("w3 w4 w5", max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert text.startswith("w3 w4 w5") and len(text.split()) >= 4


def _layer_bytes(path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if ".layers." in key and (".mlp." in key or ".self_attn." in key):
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    return total


def test_extracted_file_size_is_proportional_to_density(tmp_path):
    sizes = {}
    for density in (0.1, 0.4):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(llama_config(transformers, hidden_size=64, intermediate_size=128))
        sparsify(model, "signin", density, distribution="uniform")
        extract(model, "dense", inplace=True).save_pretrained(tmp_path / str(density))  # dense format: CSR on disk
        sizes[density] = _layer_bytes(tmp_path / str(density))
    dense_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, InferLinear))
    # CSR: 4 bytes of value + 4 of column index per nonzero, plus the row pointers
    assert sizes[0.1] < 0.25 * dense_bytes
    assert 3.0 < sizes[0.4] / sizes[0.1] < 4.5
