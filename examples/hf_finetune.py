"""Fine-tune a small BERT with Sign-In at 90 % sparsity under transformers.Trainer, extract it, ship it.

    python examples/hf_finetune.py --out runs/hf_finetune                # builds a small BERT from a config
    python examples/hf_finetune.py --out DIR --model-dir BERT_DIR         # a BERT folder of your own

Steps (everything local, nothing downloaded):

1. The model comes from a local folder (``--model-dir``: a BERT with its tokenizer). Without one, a small
   BERT (random weights) and a word-level tokenizer are built from a config and saved to ``OUT/base``.
2. The task is generated here: sentences of filler words with a few positive and negative words, some
   negated by a preceding "not"; the label says whether positive words outnumber negative ones after the
   negations (an odd count, so never a tie).
3. The same start is fine-tuned twice with the same Trainer settings and sparse_engine.AdamW: dense, and
   with Sign-In at ``--density`` (10 %: 90 % sparse; resets every epoch) through SparseTrainerCallback.
4. The Sign-In model is extracted (inference layers), ``save_pretrained`` to ``OUT/extracted``, reloaded
   with ``sparse_engine.from_pretrained`` and checked to give the same logits.
5. Printed: test accuracy of dense / Sign-In / reloaded extracted model, weight-file sizes, and inference
   time of the reloaded extracted model against the reloaded dense one (1 torch thread, the two models
   interleaved call by call, the fastest of the repeats: on a shared CPU slower calls are other
   processes' noise).

Results also go to ``OUT/results.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch

POSITIVE = ("good", "great", "fine", "superb", "lovely", "brilliant", "pleasant", "excellent", "happy",
            "nice")
NEGATIVE = ("bad", "awful", "poor", "dull", "terrible", "boring", "weak", "sad", "nasty", "horrible")
FILLER = tuple(f"f{i}" for i in range(80)) + ("the", "a", "movie", "plot", "actor", "scene", "was", "and",
                                              "very")
NEGATION = "not"
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


@dataclass
class Options:
    out: str
    model_dir: str | None = None
    density: float = 0.1
    epochs: int = 10
    n_train: int = 2000
    n_test: int = 500
    seq_len: int = 36
    hidden: int = 128
    layers: int = 2
    batch: int = 32
    lr: float = 1e-3
    layout: str = "auto"
    seed: int = 0
    threads: int = 1  # torch threads for everything (0: torch's default); timings always use 1


def make_texts(n: int, seed: int) -> tuple[list[str], list[int]]:
    """n sentences of 8-20 filler words with 1, 3, 5 or 7 sentiment words, each preceded by "not" (which
    flips it) with probability 0.3; label 1 when the (flipped) positive words outnumber the negative ones."""
    g = torch.Generator().manual_seed(seed)

    def draw(high: int) -> int:
        return int(torch.randint(0, high, (), generator=g))

    texts, labels = [], []
    for _ in range(n):
        items = [[FILLER[draw(len(FILLER))]] for _ in range(8 + draw(13))]  # units never split: "not good"
        score = 0
        for _ in range((1, 3, 5, 7)[draw(4)]):
            positive = draw(2) == 1
            unit = [(POSITIVE if positive else NEGATIVE)[draw(10)]]
            if draw(10) < 3:
                unit, positive = [NEGATION] + unit, not positive
            score += 1 if positive else -1
            items.insert(draw(len(items) + 1), unit)
        texts.append(" ".join(w for unit in items for w in unit))
        labels.append(int(score > 0))
    return texts, labels


def build_base(transformers, opts: Options) -> str:
    """A small BERT built from a config plus a word-level tokenizer, saved to OUT/base (the local folder)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(SPECIAL + (NEGATION,) + POSITIVE + NEGATIVE + FILLER)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=opts.hidden, num_hidden_layers=opts.layers,
        num_attention_heads=max(1, opts.hidden // 64), intermediate_size=4 * opts.hidden,
        max_position_embeddings=max(64, opts.seq_len), num_labels=2)
    torch.manual_seed(opts.seed)
    path = os.path.join(opts.out, "base")
    transformers.BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class Encoded(torch.utils.data.Dataset):
    def __init__(self, tokenizer, texts: list[str], labels: list[int], seq_len: int) -> None:
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
        self.ids, self.mask, self.labels = enc["input_ids"], enc["attention_mask"], torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def fine_tune(transformers, base: str, train: Encoded, opts: Options, method_name: str | None):
    """The model of ``base`` fine-tuned on ``train`` (dense, or sparsified by ``method_name``)."""
    import sparse_engine
    from sparse_engine.integrations.hf import SparseTrainerCallback
    from sparse_engine.methods import make_method

    model = transformers.BertForSequenceClassification.from_pretrained(base, num_labels=2)
    callbacks = []
    if method_name is not None:
        method = make_method(method_name, density=opts.density, layout=opts.layout, seed=opts.seed)
        method.prepare(model)
        callbacks.append(SparseTrainerCallback(method))
    opt = sparse_engine.AdamW(model, lr=opts.lr, weight_decay=0.01)
    steps = opts.epochs * math.ceil(len(train) / opts.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps))
    args = transformers.TrainingArguments(
        output_dir=os.path.join(opts.out, f"trainer-{method_name or 'dense'}"),
        per_device_train_batch_size=opts.batch, num_train_epochs=opts.epochs, logging_steps=max(1, steps // 10),
        save_strategy="no", report_to="none", use_cpu=True, seed=opts.seed, disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train, optimizers=(opt, sched),
                                   callbacks=callbacks)
    trainer.remove_callback(transformers.PrinterCallback)  # the logs stay in trainer.state.log_history
    t0 = time.perf_counter()
    trainer.train()
    return model.eval(), time.perf_counter() - t0, trainer.state.log_history


@torch.no_grad()
def accuracy(model, data: Encoded, batch: int = 128) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(data), batch):
        logits = model(input_ids=data.ids[i:i + batch], attention_mask=data.mask[i:i + batch]).logits
        correct += int((logits.argmax(-1) == data.labels[i:i + batch]).sum())
    return correct / len(data)


@torch.no_grad()
def time_models(models: dict, data: Encoded, batch: int, rounds: int = 30) -> dict[str, float]:
    """Seconds per forward of each model at ``batch``: the fastest of ``rounds`` calls, interleaved."""
    x = {"input_ids": data.ids[:batch], "attention_mask": data.mask[:batch]}
    times: dict[str, list[float]] = {name: [] for name in models}
    for m in models.values():
        m(**x)  # warm-up
    for _ in range(rounds):
        for name, m in models.items():
            t0 = time.perf_counter()
            m(**x)
            times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}


def weight_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def run(opts: Options) -> dict:
    from transformers.utils import logging as hf_logging

    import sparse_engine
    from sparse_engine.export import extract

    transformers = _transformers()
    if opts.threads:  # on a shared machine two spinning OpenMP threads cost ~10x the CPU time of one
        torch.set_num_threads(opts.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.makedirs(opts.out, exist_ok=True)
    base = opts.model_dir or build_base(transformers, opts)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    train = Encoded(tokenizer, *make_texts(opts.n_train, opts.seed), opts.seq_len)
    test = Encoded(tokenizer, *make_texts(opts.n_test, opts.seed + 1), opts.seq_len)
    dense, dense_s, _ = fine_tune(transformers, base, train, opts, None)
    sparse, sparse_s, history = fine_tune(transformers, base, train, opts, "signin")
    example = {"input_ids": test.ids[:32], "attention_mask": test.mask[:32]}
    extracted = extract(sparse, "auto", example_inputs=example, batch_sizes=(1, 32))
    paths = {name: os.path.join(opts.out, name) for name in ("dense", "extracted")}
    dense.save_pretrained(paths["dense"])
    extracted.save_pretrained(paths["extracted"])
    tokenizer.save_pretrained(paths["extracted"])
    reloaded = sparse_engine.from_pretrained(paths["extracted"])
    dense_reloaded = transformers.BertForSequenceClassification.from_pretrained(paths["dense"]).eval()
    with torch.no_grad():
        same = torch.equal(reloaded(**example).logits, extracted(**example).logits)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        speed = {b: time_models({"dense": dense_reloaded, "extracted": reloaded}, test, b) for b in (1, 32)}
    finally:
        torch.set_num_threads(threads)
    formats: dict[str, int] = {}
    for row in sparse_engine.export.report(reloaded):
        formats[row["format"]] = formats.get(row["format"], 0) + 1
    last = [r for r in history if "sparse/resets" in r][-1]
    return {
        "options": asdict(opts), "torch": torch.__version__, "transformers": transformers.__version__,
        "loadavg": _loadavg(), "accuracy": {"dense": accuracy(dense, test), "signin": accuracy(sparse, test),
                                           "extracted_reloaded": accuracy(reloaded, test)},
        "train_seconds": {"dense": dense_s, "signin": sparse_s}, "reloaded_logits_identical": same,
        "density": last["sparse/density"], "resets": last["sparse/resets"], "extracted_formats": formats,
        "weight_file_bytes": {name: weight_bytes(p) for name, p in paths.items()},
        "seconds_per_forward": {str(b): t for b, t in speed.items()},
    }


def report(res: dict) -> str:
    acc, size, spf = res["accuracy"], res["weight_file_bytes"], res["seconds_per_forward"]
    o = res["options"]
    lines = [
        f"BERT {o['layers']}x{o['hidden']} fine-tuned {o['epochs']} epochs on "
        f"{o['n_train']} generated sentences (test {o['n_test']}); torch "
        f"{res['torch']}, transformers {res['transformers']}; load average {res['loadavg']}",
        f"Sign-In: density {res['density']:.3f}, {int(res['resets'])} resets; extracted layer formats "
        f"{res['extracted_formats']}; reloaded logits identical to the extracted model: "
        f"{res['reloaded_logits_identical']}",
        "",
        "model                  test acc %   weights (safetensors)",
        f"dense                  {100 * acc['dense']:10.2f}   {size['dense'] / 1e6:8.2f} MB",
        f"Sign-In (training)     {100 * acc['signin']:10.2f}",
        f"extracted, reloaded    {100 * acc['extracted_reloaded']:10.2f}   {size['extracted'] / 1e6:8.2f} MB",
        "",
        "inference, 1 thread   dense ms   extracted ms   speed-up",
    ]
    for b, t in spf.items():
        lines.append(f"batch {b:>3}             {1e3 * t['dense']:8.2f}   {1e3 * t['extracted']:12.2f}   "
                     f"{t['dense'] / t['extracted']:7.2f}x")
    lines.append(f"training time: dense {res['train_seconds']['dense']:.0f} s, Sign-In "
                 f"{res['train_seconds']['signin']:.0f} s")
    return "\n".join(lines)


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise SystemExit("this example needs transformers and accelerate: pip install -e '.[hf]'") from None
    return transformers


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the models and results.json (a scratch folder)")
    p.add_argument("--model-dir", help="a local BERT folder (config, weights, tokenizer); default: build one")
    for field, default in asdict(Options(out="")).items():
        if field not in ("out", "model_dir"):
            p.add_argument("--" + field.replace("_", "-"), type=type(default), default=default)
    opts = Options(**vars(p.parse_args(argv)))
    res = run(opts)
    print(report(res))
    with open(os.path.join(opts.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
