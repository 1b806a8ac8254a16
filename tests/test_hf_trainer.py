"""SparseTrainerCallback: the methods' schedules inside transformers.Trainer, logs, checkpoints, resume.

A tiny BERT (built from a config) on a generated token-classification-free task: label = whether the first
token id is below half the vocabulary. 48 examples, batch 8: 6 optimizer steps per epoch, CPU.
"""
from __future__ import annotations

import math

import pytest
import torch

from _hf import bert_config, first_token_task, import_transformers

transformers = import_transformers()
pytest.importorskip("accelerate", reason="accelerate is not installed (pip install -e '.[hf]'); Trainer needs it")

import sparse_engine  # noqa: E402
from sparse_engine.integrations.hf import SparseTrainerCallback  # noqa: E402
from sparse_engine.methods import make_method  # noqa: E402

N, BATCH, VOCAB = 48, 8, 97
STEPS_PER_EPOCH = N // BATCH


def task(seed: int = 0) -> list[dict]:
    return first_token_task(N, VOCAB, seed=seed)


class Crash(Exception):
    pass


class CrashAt(transformers.TrainerCallback):
    """Raises before the optimizer step after ``step`` (a checkpoint at ``step`` is already written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Crash


def build(method_name: str, **options):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(bert_config(transformers, num_labels=2))
    method = make_method(method_name, **options)
    method.prepare(model)
    opt = sparse_engine.AdamW(model, lr=3e-3, weight_decay=0.1)
    total = 2 * STEPS_PER_EPOCH
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / (total + 1))
    return model, method, opt, sched


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, num_train_epochs=2, logging_steps=1,
                save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    return transformers.TrainingArguments(**{**base, **kw})


def train(tmp_path, method_name: str, extra_callbacks=(), resume=None, targs=None, **options):
    model, method, opt, sched = build(method_name, **options)
    cb = SparseTrainerCallback(method)
    trainer = transformers.Trainer(model=model, args=targs or args(tmp_path), train_dataset=task(),
                                   optimizers=(opt, sched), callbacks=[cb, *extra_callbacks])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model, opt, cb


def logs(trainer) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for row in trainer.state.log_history:
        out.setdefault(row["step"], {}).update(row)
    return out


def test_signin_resets_per_steps_happen_at_the_configured_steps(tmp_path):
    trainer, model, _, _ = train(tmp_path, "signin", density=0.2, beta=1.0, reset_every=4, reset_unit="step")
    rows = logs(trainer)
    for step in range(1, 2 * STEPS_PER_EPOCH + 1):
        row = rows[step]
        assert row["sparse/resets"] == step // 4, step
        if step % 4 == 0:  # logged right after the reset: β is back to 1 on every trained coordinate
            assert abs(row["sparse/beta_mean"] - 1.0) < 1e-5 and abs(row["sparse/beta_min"] - 1.0) < 1e-5, step
        else:  # weight decay and the gradients erode it
            assert row["sparse/beta_mean"] < 1.0 - 1e-4, step
        assert abs(row["sparse/density"] - 0.2) < 0.01
    assert "loss" in rows[1] and "sparse/sign_flips" in rows[1]


def test_signin_resets_per_epoch_and_logs_beta_before_reset(tmp_path):
    trainer, _, opt, _ = train(tmp_path, "signin", density=0.2, reset_every=1, reset_unit="epoch")
    rows = logs(trainer)
    assert opt.num_resets == 2
    for epoch in (1, 2):
        row = rows[epoch * STEPS_PER_EPOCH]
        assert row["sparse/resets"] == epoch and row["sparse/beta_before_reset"] < 1.0
        assert abs(row["sparse/beta_mean"] - 1.0) < 1e-5
    assert rows[STEPS_PER_EPOCH - 1]["sparse/resets"] == 0 and rows[STEPS_PER_EPOCH + 1]["sparse/resets"] == 1


def test_pilot_alpha_controller_and_prune_inside_trainer(tmp_path):
    trainer, model, opt, _ = train(tmp_path, "pilot", density=0.25, alpha=1e-3, target_l1_ratio=0.1)
    rows = logs(trainer)
    first, last = rows[STEPS_PER_EPOCH], rows[2 * STEPS_PER_EPOCH]
    # epoch 1: accuracy did not drop (no previous), ‖θ‖₁ above target, first half: α grows by δ = 1.2
    assert math.isclose(first["sparse/alpha"], 1.2e-3, rel_tol=1e-9)
    assert 0.0 <= first["sparse/train_accuracy"] <= 1.0
    assert rows[1]["sparse/density"] == 1.0 and rows[STEPS_PER_EPOCH - 1]["sparse/alpha"] == 1e-3
    # the prune: at the last step, in that step's log, to the target density
    assert last["sparse/pruned_to"] == 0.25 and abs(last["sparse/density"] - 0.25) < 0.01
    assert all("sparse/pruned_to" not in r for s, r in rows.items() if s < 2 * STEPS_PER_EPOCH)
    assert abs(sparse_engine.nn.diagnostics.summary(model)["density"] - 0.25) < 0.01


@pytest.mark.slow
@pytest.mark.parametrize("method_name,options", [
    ("signin", dict(density=0.2, reset_every=5, reset_unit="step", wd_switchoff=0.5)),
    ("pilot", dict(density=0.3, alpha=1e-3)),
], ids=["signin+wd_switchoff", "pilot"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, method_name, options):
    steps = dict(save_strategy="steps", save_steps=4)
    full, model_a, opt_a, cb_a = train(tmp_path / "a", method_name, targs=args(tmp_path / "a", **steps), **options)
    with pytest.raises(Crash):  # after checkpoint-4: mid-epoch (6 steps an epoch), before the reset at 5
        train(tmp_path / "b", method_name, extra_callbacks=[CrashAt(4)], targs=args(tmp_path / "b", **steps),
              **options)
    resumed, model_b, opt_b, cb_b = train(tmp_path / "b", method_name, targs=args(tmp_path / "b", **steps),
                                          resume=str(tmp_path / "b" / "checkpoint-4"), **options)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    oa, ob = opt_a.state_dict(), opt_b.state_dict()
    for i, st in oa["state"].items():
        for name, t in st.items():
            assert torch.equal(t, ob["state"][i][name]), (i, name)
    assert [g["weight_decay"] for g in oa["param_groups"]] == [g["weight_decay"] for g in ob["param_groups"]]
    assert [g["alpha"] for g in oa["param_groups"]] == [g["alpha"] for g in ob["param_groups"]]
    assert oa[sparse_engine.integrations.hf.trainer.STATE_KEY] == ob[sparse_engine.integrations.hf.trainer.STATE_KEY]
    la, lb = logs(full), logs(resumed)
    for step in range(5, 2 * STEPS_PER_EPOCH + 1):
        assert la[step]["loss"] == lb[step]["loss"], step
        for key in ("sparse/resets", "sparse/beta_mean", "sparse/alpha", "sparse/density"):
            assert la[step].get(key) == lb[step].get(key), (step, key)


def test_checkpoint_folder_loads_with_from_pretrained(tmp_path):
    trainer, model, _, _ = train(tmp_path, "signin", targs=args(tmp_path, save_strategy="steps", save_steps=12),
                                 density=0.2, layout="csr")
    loaded = sparse_engine.from_pretrained(tmp_path / "checkpoint-12")
    x = task()[0]
    with torch.no_grad():
        model.eval()
        ids, mask = x["input_ids"][None], x["attention_mask"][None]
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)


def test_needs_a_sparse_engine_optimizer(tmp_path):
    model, method, _, _ = build("signin", density=0.2)
    trainer = transformers.Trainer(model=model, args=args(tmp_path), train_dataset=task(),
                                   callbacks=[SparseTrainerCallback(method)])
    with pytest.raises(TypeError, match="needs a sparse_engine optimizer"):
        trainer.train()
    with pytest.raises(ValueError, match="iterative=True"):
        SparseTrainerCallback(make_method("pilot", iterative=True))


def test_attach_puts_the_figures_before_every_reporter(tmp_path):
    model, method, opt, sched = build("signin", density=0.2)
    seen = []

    class Reporter(transformers.TrainerCallback):  # stands for TensorBoard, wandb, ...
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    trainer = transformers.Trainer(model=model, args=args(tmp_path, max_steps=2), train_dataset=task(),
                                   optimizers=(opt, sched), callbacks=[Reporter()])
    SparseTrainerCallback(method).attach(trainer)
    trainer.train()
    assert len(seen) == 3 and all("sparse/density" in row for row in seen)
