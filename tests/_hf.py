"""Importing transformers in tests, and the tiny models the Hugging Face tests build from configs."""
from __future__ import annotations

import pytest


def import_transformers():
    """transformers (the test module is skipped, with the reason printed, when it is not installed)."""
    return pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install -e '.[hf]'); the HF tests need it"
    )


def bert_config(transformers, **kw):
    """A 2-layer BERT small enough for a unit test (vocab 97, hidden 32), no dropout."""
    return transformers.BertConfig(**{
        **dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        **kw})


def llama_config(transformers, **kw):
    """A 2-layer Llama-style decoder (vocab 96, hidden 32, grouped-query attention)."""
    return transformers.LlamaConfig(**{
        **dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64),
        **kw})


def word_tokenizer(transformers, vocab_size: int):
    """A whitespace word-level fast tokenizer over the words w0 ... w{n-3} plus [PAD], [UNK] (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(vocab_size - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


#: (method, layout) pairs that sparsify accepts; "pilot-pruned" is PILoT after its prune (a mask)
CASES = [(m, lay) for m in ("static", "signin") for lay in ("dense", "block", "csr", "bsr", "auto")] + [
    ("pilot", "dense"), ("pilot", "auto"), ("pilot-pruned", "dense")]


def sparsify_case(model, method: str, layout: str, example: dict, seed: int, **options):
    """Sparsify ``model`` for a CASES entry, resolve "auto" on ``example`` (keyword inputs), then give every
    factor values a fresh model cannot have by chance, and prune "pilot-pruned" to a random mask."""
    import torch

    from sparse_engine.nn import sparsify
    from sparse_engine.nn.linear import SparseModule
    from sparse_engine.param import Parameterization

    sparsify(model, method=method.replace("-pruned", ""), layout=layout, seed=seed, **options)
    with torch.no_grad():
        if layout == "auto":
            model(**example)
        for mod in model.modules():
            if isinstance(mod, Parameterization):
                for p in mod.parameters():
                    p.add_(torch.randn_like(p) * 0.01)
        if method == "pilot-pruned":
            for mod in model.modules():
                if isinstance(mod, SparseModule):
                    mod.set_mask(torch.rand(mod.weight_shape) < 0.4)
    return model.eval()


def first_token_task(n: int, vocab: int = 97, length: int = 10, seed: int = 0):
    """A generated classification dataset for Trainer tests: ``n`` sequences of ``length`` token ids, label =
    whether the first id is below half the vocabulary (Trainer's dict examples)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    labels = (ids[:, 0] < vocab // 2).long()
    mask = torch.ones(length, dtype=torch.long)
    return [{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(n)]
