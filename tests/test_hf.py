"""sparsify() on Hugging Face BERT models built from a tiny config (no download)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from _hf import bert_config, import_transformers  # noqa: E402

transformers = import_transformers()

from sparse_engine.nn import diagnostics  # noqa: E402
from sparse_engine.nn import SparseLinear, sparsify  # noqa: E402
from sparse_engine.nn.linear import SparseModule  # noqa: E402


def tiny_config(**kw):
    return bert_config(transformers, **kw)


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.fixture
def bert():
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(tiny_config()).eval()


def inputs():
    ids = torch.randint(0, 97, (2, 11))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("method", ["static", "dense", "signin"])
def test_bert_density_one_is_unchanged(bert, method):
    x = inputs()
    y0 = bert(**x).logits
    n_linear = len(linears(bert))
    report = sparsify(bert, method=method, density=1.0)
    assert (
        len(report) == n_linear == 14
    )  # q, k, v, attn out, intermediate, output per layer; pooler; classifier
    assert not linears(bert)
    y = bert(**x).logits
    if method == "signin":
        torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(y, y0)


def test_bert_exact_density_training_and_report(bert):
    total = sum(m.weight.numel() for m in linears(bert).values())
    embeddings = bert.bert.embeddings.word_embeddings.weight.detach().clone()
    report = sparsify(bert, method="signin", density=0.2, distribution="erk", seed=5)
    assert report.nnz == round(0.2 * total) and report.numel == total
    assert "bert.encoder.layer.0.attention.self.query" in str(report)
    q = bert.bert.encoder.layer[0].attention.self.query
    assert isinstance(q, SparseLinear)
    # code that reads module.weight (dtype, device, shape) keeps working
    assert q.weight.dtype == torch.float32 and q.weight.shape == (32, 32)
    assert bert.dtype == torch.float32
    # embeddings and LayerNorm untouched
    assert isinstance(bert.bert.embeddings.word_embeddings, nn.Embedding)
    assert torch.equal(bert.bert.embeddings.word_embeddings.weight, embeddings)
    assert isinstance(bert.bert.encoder.layer[0].output.LayerNorm, nn.LayerNorm)
    bert.train()
    out = bert(**inputs(), labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert q.param.m.grad is not None and q.param.w.grad is not None
    assert torch.all(q.param.w.grad[~q.param.mask] == 0)
    stats = diagnostics.layer_stats(bert)
    assert len(stats) == 14 and diagnostics.summary(stats)["nnz"] == report.nnz


def test_bert_state_dict_roundtrip(bert):
    sparsify(bert, method="signin", density=0.3, layout="csr", seed=1)
    x = inputs()
    y = bert(**x).logits
    buf = io.BytesIO()
    torch.save(bert.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(1)
    fresh = transformers.BertForSequenceClassification(tiny_config()).eval()
    sparsify(fresh, method="signin", density=0.3, layout="csr", seed=2)
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh(**x).logits, y)
    assert torch.equal(copy.deepcopy(bert)(**x).logits, y)


def test_bert_masked_lm_keeps_tied_decoder():
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(tiny_config(tie_word_embeddings=True)).eval()
    decoder = model.cls.predictions.decoder
    if decoder.weight is not model.bert.embeddings.word_embeddings.weight:
        pytest.skip("this transformers version does not tie the decoder to the embeddings by identity")
    x = inputs()
    y0 = model(**x).logits
    report = sparsify(model, method="static", density=1.0)
    assert any(name == "cls.predictions.decoder" and "tied" in why for name, why in report.skipped)
    assert model.cls.predictions.decoder is decoder
    assert torch.equal(model(**x).logits, y0)
    assert all(
        isinstance(m, SparseModule) for n, m in model.named_modules() if n.endswith("attention.self.query")
    )
