"""examples/hf_finetune.py end to end at a tiny size (the README's numbers come from its default size)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from _hf import import_transformers

transformers = import_transformers()
pytest.importorskip("accelerate", reason="accelerate is not installed (pip install -e '.[hf]'); Trainer needs it")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_finetune.py"


def _example():
    spec = importlib.util.spec_from_file_location("hf_finetune", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_generated_task_is_balanced_and_never_tied():
    ex = _example()
    texts, labels = ex.make_texts(400, seed=3)
    assert 0.3 < sum(labels) / len(labels) < 0.7
    for text, label in zip(texts, labels):
        words = text.split()
        pos, neg = sum(w in ex.POSITIVE for w in words), sum(w in ex.NEGATIVE for w in words)
        assert (pos + neg) % 2 == 1 and label == int(pos > neg)


@pytest.mark.slow
def test_example_runs_end_to_end(tmp_path, capsys):
    res = _example().main(["--out", str(tmp_path), "--n-train", "128", "--n-test", "64", "--hidden", "32",
                           "--layers", "1", "--epochs", "1", "--batch", "32"])
    out = capsys.readouterr().out
    assert "extracted, reloaded" in out and "speed-up" in out
    assert res["reloaded_logits_identical"] is True
    assert abs(res["density"] - 0.1) < 0.01 and res["resets"] == 1
    assert res["accuracy"]["extracted_reloaded"] == res["accuracy"]["signin"] or \
        abs(res["accuracy"]["extracted_reloaded"] - res["accuracy"]["signin"]) <= 1 / 64  # summation order
    assert res["weight_file_bytes"]["extracted"] < res["weight_file_bytes"]["dense"]
    assert json.loads((tmp_path / "results.json").read_text())["options"]["epochs"] == 1
    for sub in ("base", "dense", "extracted"):
        assert (tmp_path / sub / "config.json").is_file()
