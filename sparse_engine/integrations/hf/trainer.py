"""``SparseTrainerCallback``: a sparse_engine method's life inside ``transformers.Trainer``.

    method = make_method("signin", density=0.1, reset_every=50, reset_unit="step")
    method.prepare(model)                                    # sparsify, before the optimizer
    opt = sparse_engine.AdamW(model, lr=1e-3, weight_decay=0.01)
    trainer = Trainer(model, args, train_dataset=ds, optimizers=(opt, scheduler),
                      callbacks=[SparseTrainerCallback(method)])
    trainer.train()                                          # or train(resume_from_checkpoint=...)

What runs where (the method's own hooks, see :mod:`sparse_engine.methods.base`):

* train begin: ``method.apply(model, optimizer, epochs, steps_per_epoch)`` with Trainer's numbers; its
  per-step hook (Sign-In resets per step, weight-decay switch-off, mask updates) then runs inside
  ``optimizer.step()``.
* last step of each epoch (before that step's log and checkpoint): ``method.after_epoch(epoch,
  train_acc)``: Sign-In resets per epoch, PILoT's α controller. ``train_acc`` is the accuracy of the
  model's training forwards in that epoch (``logits`` against the ``labels`` argument, -100 ignored,
  shifted by one token for causal LMs), summed over every process when torch.distributed is running.
* last step of training (or train end, if training stopped early): ``method.end_of_training()``
  (PILoT's prune). PILoT's iterative prune-and-retrain rounds need one ``train()`` per round and are
  refused here.
* every Trainer log: the figures (``sparse/density``, ``sparse/sign_flips`` since the last log,
  ``sparse/beta_mean|min|max``, ``sparse/l1``, ``sparse/alpha``, ``sparse/resets``, what ``after_epoch``
  returned, ``sparse/pruned_to``) are added to the logged dict (``trainer.state.log_history``; reporters
  that come after this callback see them too: :meth:`SparseTrainerCallback.attach` puts it first).

Checkpoints: the method's state, the epoch bookkeeping and the accuracy counts so far ride in the
optimizer's state dict (key ``"sparse_engine_callback"``), which Trainer saves with every checkpoint and
loads on ``resume_from_checkpoint`` before training begins; the callback restores them after ``apply``,
and the optimizer's hyperparameters (α, weight decay after a switch-off) stay the checkpoint's. The
optimizer must be a sparse_engine SGD / AdamW given to Trainer as ``optimizers=(opt, scheduler)`` before
Trainer is built (the callback hooks its state dict when Trainer is initialised).
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from ...nn import diagnostics
from ...methods import Compose, Method, PILoT
from ...optim import SparseOptimizer

__all__ = ["SparseTrainerCallback"]

log = logging.getLogger("sparse_engine")

STATE_KEY = "sparse_engine_callback"


def _members(method: Method) -> list[Method]:
    return list(method.methods) if isinstance(method, Compose) else [method]


def _sparse_optimizer(optimizer) -> SparseOptimizer | None:
    """The sparse_engine optimizer under Trainer's wrappers (accelerate's AcceleratedOptimizer), or None."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, SparseOptimizer) and seen < 4:
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return optimizer if isinstance(optimizer, SparseOptimizer) else None


class SparseTrainerCallback(TrainerCallback):
    """Runs ``method`` (a :class:`sparse_engine.methods.Method`, already ``prepare``-d on the model) inside
    Trainer; see the module docstring.

    Args:
        method: the method; its config's options decide everything (reset period and unit, α, ...).
        track_accuracy: measure the train accuracy per epoch (None: only when a PILoT α controller needs
            it). Logged as ``sparse/train_accuracy``.
        prefix: of the logged keys.
    """

    def __init__(self, method: Method, *, track_accuracy: bool | None = None, prefix: str = "sparse/") -> None:
        if not isinstance(method, Method):
            raise TypeError(f"method must be a sparse_engine.methods.Method, got {type(method).__name__}")
        for m in _members(method):
            if isinstance(m, PILoT) and m.config.iterative:
                raise ValueError("pilot with iterative=True prunes and retrains in rounds, one Trainer.train() each: "
                                 "not run by this callback; use iterative=False (one prune at the end)")
        self.method = method
        needs = any(isinstance(m, PILoT) and m.config.alpha_schedule == "controller" for m in _members(method))
        self.track_accuracy = needs if track_accuracy is None else bool(track_accuracy)
        self.prefix = prefix
        self._optimizer: SparseOptimizer | None = None
        self._hooked: set[int] = set()
        self._stash: dict[str, Any] | None = None
        self._forward_hook = None
        self._applied = False
        self._reset_progress()

    def _reset_progress(self) -> None:
        self.epochs_done = 0
        self.finished = False
        self._correct: Tensor | int = 0
        self._seen: Tensor | int = 0
        self._pending: dict[str, float] = {}

    def attach(self, trainer) -> SparseTrainerCallback:
        """Add this callback to ``trainer`` as its first callback (so that every reporter sees the figures)."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        self._hook_optimizer(trainer.optimizer)
        return self

    # ------------------------------------------------------------------------------ optimizer state

    def _hook_optimizer(self, optimizer) -> None:
        opt = _sparse_optimizer(optimizer)
        if opt is None or id(opt) in self._hooked:
            return
        opt.register_state_dict_post_hook(self._save_hook)
        opt.register_load_state_dict_pre_hook(self._load_hook)
        self._hooked.add(id(opt))

    def _save_hook(self, optimizer, state_dict: dict) -> dict:
        if self._applied:
            state_dict[STATE_KEY] = {"method": self.method.state_dict(), "epochs_done": self.epochs_done,
                                     "finished": self.finished, "correct": int(self._correct), "seen": int(self._seen),
                                     "pending": dict(self._pending)}
        return state_dict

    def _load_hook(self, optimizer, state_dict: dict) -> dict:
        if STATE_KEY in state_dict:
            state_dict = dict(state_dict)
            self._stash = state_dict.pop(STATE_KEY)
        return state_dict

    # -------------------------------------------------------------------------------- the events

    def on_init_end(self, args, state, control, optimizer=None, **kwargs):
        self._hook_optimizer(optimizer)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        opt = _sparse_optimizer(optimizer)
        if opt is None:
            raise TypeError("SparseTrainerCallback needs a sparse_engine optimizer: build Trainer with "
                            "optimizers=(sparse_engine.SGD(model, ...) or sparse_engine.AdamW(model, ...), scheduler); "
                            f"got {type(optimizer).__name__}")
        if id(opt) not in self._hooked and state.global_step > 0:
            raise RuntimeError("resuming, but this optimizer was given to Trainer after it was built: the method state "
                               "in the checkpoint was not read; pass optimizers=(opt, scheduler) to Trainer(...)")
        self._hook_optimizer(opt)
        steps = state.max_steps
        if train_dataloader is not None and hasattr(train_dataloader, "__len__"):
            steps = math.ceil(len(train_dataloader) / max(1, args.gradient_accumulation_steps))
        epochs = max(1, math.ceil(state.num_train_epochs))
        stash, self._stash = self._stash, None
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        self.method.apply(model, opt, epochs=epochs, steps_per_epoch=max(1, steps))
        self._applied = True
        self._reset_progress()
        if stash is not None:
            self.method.load_state_dict(stash["method"])
            for g, saved in zip(opt.param_groups, groups):  # the checkpoint's α / weight decay, not setup()'s
                g.update(saved)
            self.epochs_done, self.finished = int(stash["epochs_done"]), bool(stash["finished"])
            self._correct, self._seen, self._pending = int(stash["correct"]), int(stash["seen"]), dict(stash["pending"])
        elif state.global_step > 0:
            log.warning("sparse_engine: resuming at step %d from a checkpoint without method state: the method "
                        "starts afresh", state.global_step)
        self._model = model
        if self.track_accuracy:
            self._causal = _is_causal_lm(model)
            self._forward_hook = model.register_forward_hook(self._count, with_kwargs=True)

    def on_step_end(self, args, state, control, **kwargs):
        if state.epoch is not None and float(state.epoch).is_integer() and int(state.epoch) > self.epochs_done:
            self._end_epoch(int(state.epoch))
        if state.global_step >= state.max_steps and not self.finished:
            self._finish()

    def on_epoch_end(self, args, state, control, **kwargs):
        epoch = math.ceil(state.epoch - 1e-9) if state.epoch is not None else self.epochs_done
        if epoch > self.epochs_done:  # an epoch cut short (max_steps, a stop request)
            self._end_epoch(epoch)

    def on_train_end(self, args, state, control, **kwargs):
        if self._applied and not self.finished:
            self._finish()
        if self._forward_hook is not None:
            self._forward_hook.remove()
            self._forward_hook = None
        self.method.remove()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._applied or logs is None:
            return
        figures = self.figures()
        logs.update(figures)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step:
            last.update(figures)

    # ------------------------------------------------------------------------------------- work

    def _end_epoch(self, epoch: int) -> None:
        acc = self._epoch_accuracy()
        out = self.method.after_epoch(epoch, acc)
        if acc is not None:
            out = {**out, "train_accuracy": acc}
        self._pending.update({k: float(v) for k, v in out.items() if isinstance(v, (int, float))})
        self.epochs_done = epoch
        self._correct, self._seen = 0, 0

    def _finish(self) -> None:
        if self.method.end_of_training() is not None:  # refused in __init__; a Compose member may still ask
            raise RuntimeError(f"{self.method.name} asked for another round of training; run it with its own "
                               "Trainer.train()")
        pruned = self.method.log.get("pruned_to")
        if pruned is not None:
            self._pending["pruned_to"] = float(pruned)
        self.finished = True

    def figures(self) -> dict[str, float]:
        """What goes into the next log: the model's sparse statistics, α, resets, and the pending epoch
        results (prefixed). Sign flips count since the previous call."""
        stats = diagnostics.summary(self.method.model)
        out: dict[str, float] = {k: float(stats[k]) for k in ("density", "sign_flips", "l1", "beta_mean",
                                                               "beta_min", "beta_max") if stats.get(k) is not None}
        opt = self.method.optimizer
        out["alpha"] = max(float(g.get("alpha", 0.0)) for g in opt.param_groups)
        out["resets"] = float(opt.num_resets)
        out = {**self._pending, **out}  # the current figures win (a prune may follow after_epoch's ‖θ‖₁)
        self._pending = {}
        return {self.prefix + k: v for k, v in out.items()}

    # -------------------------------------------------------------------------------- accuracy

    def _count(self, module: nn.Module, args, kwargs, output) -> None:
        labels = kwargs.get("labels")
        logits = getattr(output, "logits", None) if not isinstance(output, dict) else output.get("logits")
        if not module.training or not isinstance(labels, Tensor) or not isinstance(logits, Tensor):
            return
        with torch.no_grad():
            pred = logits.argmax(-1)
            if self._causal:
                pred, labels = pred[..., :-1], labels[..., 1:]
            if pred.shape != labels.shape:
                return
            valid = labels != -100
            self._correct = self._correct + ((pred == labels) & valid).sum()
            self._seen = self._seen + valid.sum()

    def _epoch_accuracy(self) -> float | None:
        if not self.track_accuracy:
            return None
        counts = torch.tensor([int(self._correct), int(self._seen)], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            device = next(self._model.parameters()).device
            counts = counts.to(device)
            torch.distributed.all_reduce(counts)
        correct, seen = (float(v) for v in counts.tolist())
        if not seen:
            raise ValueError("no train accuracy to give the method: the model's training forwards returned no "
                             "'logits' or got no 'labels' (PILoT's α controller needs them)")
        return correct / seen


def _is_causal_lm(model: nn.Module) -> bool:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return False
    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
