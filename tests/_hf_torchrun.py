"""Run by tests/test_hf_trainer_ddp.py under ``torchrun --nproc_per_node 2``: a tiny BERT trained by
transformers.Trainer with SparseTrainerCallback (Sign-In, resets every 2 steps) on Trainer's own DDP
launch (gloo, CPU). Each rank writes its final state dict and the callback's logged figures to
``<out>/rank<k>.pt``; the test compares the ranks."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import transformers

import sparse_engine
from sparse_engine.integrations.hf import SparseTrainerCallback
from sparse_engine.methods import make_method

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _hf import bert_config, first_token_task  # noqa: E402

N = 32


def main(out: Path) -> None:
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(bert_config(transformers, num_labels=2))
    method = make_method("signin", density=0.2, reset_every=2, reset_unit="step")
    method.prepare(model)
    opt = sparse_engine.AdamW(model, lr=3e-3, weight_decay=0.1)
    args = transformers.TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=4, num_train_epochs=2, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, ddp_backend="gloo", seed=0, disable_tqdm=True,
        dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=first_token_task(N), optimizers=(opt, None),
                                   callbacks=[SparseTrainerCallback(method)])
    trainer.train()
    rank = int(os.environ["RANK"])
    torch.save({"world": torch.distributed.get_world_size(), "state": {k: v.detach().clone() for k, v in
                model.state_dict().items() if isinstance(v, torch.Tensor)},
                "logs": [h for h in trainer.state.log_history if "sparse/resets" in h]}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
