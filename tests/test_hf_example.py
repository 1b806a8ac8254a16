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
    negated = 0
    for text, label in zip(texts, labels):
        words = text.split()
        score, count = 0, 0
        for i, w in enumerate(words):
            if w in ex.POSITIVE or w in ex.NEGATIVE:
                flip = i > 0 and words[i - 1] == ex.NEGATION
                negated += flip
                score += (1 if w in ex.POSITIVE else -1) * (-1 if flip else 1)
                count += 1
        assert count % 2 == 1 and label == int(score > 0)
    assert negated > 100


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
