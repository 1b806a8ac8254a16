"""What every method shares: its config dataclass, the two calls, and its hooks.

Life of a method (``train.py`` does exactly this; a user's own loop does the same):

    method = make_method("signin", density=0.1)     # or SignIn(SignInConfig(density=0.1))
    report = method.prepare(model)                  # sparsify the model in place (before the optimizer)
    opt = method.make_optimizer(model, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)  # or your own
    method.apply(model, opt, epochs=E, steps_per_epoch=S)   # binds roles, registers the per-step hook
    for epoch in range(1, E + 1):
        for x, y in batches:                        # optimizer.step() runs the per-step hook itself
            ...; opt.step()
        method.after_epoch(epoch, train_acc)        # per-epoch schedules (resets, α)
    retrain = method.end_of_training()              # PILoT: prune; may ask for retraining rounds

The per-step hook is an optimizer step post-hook, so it also runs in step-in-backward mode (where
``step()`` applies nothing but still marks the end of the iteration). A step the optimizer skipped for a
non-finite gradient does not count.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..checks import check_choice
from ..layout import LAYOUTS
from ..masks import DISTRIBUTIONS, check_density


def option(default: Any, help: str, *, choices: tuple | None = None, name: str | None = None) -> Any:
    """A method option: a config field whose help text (and choices) the command line and the training
    configuration read, so that an option is declared only here. ``name``: its name there, when it is not
    the field's (the weight-decay switch-off point ``at`` is ``wd_switchoff``)."""
    return field(default=default, metadata={"help": help, "choices": choices, "name": name})


@dataclass
class MethodConfig:
    """Options every method understands.

    density: fraction of weights kept (for PILoT: the target of the final prune).
    distribution: how density is spread over layers for random masks: "uniform", "er" or "erk".
    layout: storage of the sparse layers (see sparse_engine.nn): "dense", "block", "csr", "bsr", "auto".
    filter: ``(name, module) -> bool`` choosing the layers to sparsify (None: sparsify's default).
    seed: seed of the random masks.
    """

    density: float = option(0.1, "fraction of weights kept, in (0, 1]")
    distribution: str = option("erk", "how the density spreads over layers", choices=DISTRIBUTIONS)
    layout: str = option("dense", "storage and kernels of the sparse layers", choices=LAYOUTS)
    filter: Callable[[str, nn.Module], bool] | None = None
    seed: int = 0

    def validate(self) -> None:
        self.density = check_density(self.density)
        check_choice("distribution", self.distribution, DISTRIBUTIONS)
        check_choice("layout", self.layout, LAYOUTS)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")


@dataclass
class FactoredConfig(MethodConfig):
    """The options of the methods that train θ = m ⊙ w (Sign-In, PILoT)."""

    beta: float = option(1.0, "the scale m² − w² of the factors (at initialisation, and what a Sign-In reset "
                              "restores)")
    factor_lr_scale: float = option(1.0, "lr multiplier of the factors m, w")

    def validate(self) -> None:
        super().validate()
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0 < self.beta < float("inf"):
            raise ValueError(f"beta must be a finite number > 0, got {self.beta!r}")
        if isinstance(self.factor_lr_scale, bool) or not isinstance(self.factor_lr_scale, (int, float)) \
                or not self.factor_lr_scale > 0:
            raise ValueError(f"factor_lr_scale must be > 0, got {self.factor_lr_scale}")


@dataclass
class Retrain:
    """A request from :meth:`Method.end_of_training` for one more round of training.

    epochs: length of the round. The caller restarts the learning-rate schedule (learning-rate
    rewinding; with weight rewinding the method has already restored the weights).
    """

    epochs: int
    round: int
    density: float


class Method:
    """Base class of the methods. Subclasses set ``name`` and ``config_class`` and override hooks."""

    name = "base"
    config_class: type[MethodConfig] = MethodConfig
    #: the ``method`` argument of nn.sparsify (None: the model stays dense)
    sparsify_as: str | None = None
    #: whether it trains a model whose parameters are sharded (FSDP2's fully_shard)
    shardable = True

    def __init__(self, config: MethodConfig | None = None, **kwargs: Any) -> None:
        if config is None:
            fields = {f.name for f in dataclasses.fields(self.config_class)}
            unknown = sorted(set(kwargs) - fields)
            if unknown:
                raise ValueError(f"{self.name}: unknown option(s) {unknown}; known: {sorted(fields)}")
            config = self.config_class(**kwargs)
        elif kwargs:
            raise ValueError("give either a config or keyword options, not both")
        if not isinstance(config, self.config_class):
            raise TypeError(f"{self.name} needs a {self.config_class.__name__}, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.model: nn.Module | None = None
        self.optimizer = None
        self.epochs = 0
        self.steps_per_epoch = 0
        self._hook = None
        self._last_step = 0
        self.log: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------ the calls

    def prepare(self, model: nn.Module, batch: tuple | None = None, loss_fn: Callable | None = None) -> Any:
        """Sparsify ``model`` in place for this method; returns sparsify's report (None for dense).

        ``batch`` ``(inputs, targets)`` and ``loss_fn``: what a mask from data (``mask="snip"``) is scored on.
        """
        if self.sparsify_as is None:
            return None
        from ..nn import sparsify  # late: nn imports the kernels' dispatch, not needed for dense runs

        return sparsify(model, **self.sparsify_options(), batch=batch, loss_fn=loss_fn)

    def sparsify_options(self) -> dict[str, Any]:
        """The keyword arguments of nn.sparsify for this method's config."""
        c = self.config
        kwargs: dict[str, Any] = dict(method=self.sparsify_as, density=c.density, distribution=c.distribution,
                                      layout=c.layout, seed=c.seed)
        if c.filter is not None:
            kwargs["filter"] = c.filter
        beta = getattr(c, "beta", None)
        if beta is not None:
            kwargs["beta"] = beta
        if hasattr(c, "mask_dict"):
            kwargs.update(mask=c.mask_dict(), mask_scope=c.mask_scope)
        return kwargs

    @property
    def factor_lr_scale(self) -> float | None:
        """Learning-rate multiplier for the factors m, w (None: the same lr as everything else)."""
        scale = getattr(self.config, "factor_lr_scale", None)
        return None if scale is None or scale == 1.0 else scale

    def make_optimizer(self, model: nn.Module, name: str = "sgd", lr: float = 0.1, **kwargs: Any):
        """The method's recommended optimizer: ``name`` "sgd" or "adamw"; the factors get
        ``lr * factor_lr_scale`` when the method sets one."""
        from ..optim import SGD, AdamW

        classes = {"sgd": SGD, "adamw": AdamW}
        if name not in classes:
            raise ValueError(f"optimizer must be one of {tuple(classes)}, got {name!r}")
        factor_lr = lr * self.factor_lr_scale if self.factor_lr_scale and self._has_factors(model) else None
        return classes[name](model, lr=lr, factor_lr=factor_lr, **kwargs)

    @staticmethod
    def _has_factors(model: nn.Module) -> bool:
        from ..optim import parameterizations

        return any(pz.factored for _, pz in parameterizations(model))

    def apply(self, model: nn.Module, optimizer, *, epochs: int = 1, steps_per_epoch: int = 1) -> Method:
        """Attach to ``model`` and ``optimizer`` (a sparse_engine optimizer): bind roles, register hooks."""
        from ..optim import SparseOptimizer

        if not isinstance(optimizer, SparseOptimizer):
            raise TypeError(f"optimizer must be a sparse_engine.optim optimizer (SGD or AdamW), "
                            f"got {type(optimizer).__name__}")
        for name, v in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not self.shardable and any(getattr(p, "placements", None) is not None for p in model.parameters()):
            raise ValueError(f"model: {self.name} cannot train a sharded (FSDP2) model: it reads the whole "
                             "weights to decide; use DistributedDataParallel")
        self.remove()
        self.model, self.optimizer = model, optimizer
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        optimizer.bind(model)
        self._last_step = optimizer.num_steps
        self._hook = optimizer.register_step_post_hook(self._step_hook)
        self.setup()
        return self

    def remove(self) -> None:
        """Unregister the per-step hook."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _step_hook(self, optimizer, args, kwargs) -> None:
        if optimizer.num_steps == self._last_step:  # the optimizer skipped this step
            return
        self._last_step = optimizer.num_steps
        self.after_step(optimizer.num_steps)

    # ------------------------------------------------------------------------------------ the hooks

    def setup(self) -> None:
        """Called at the end of :meth:`apply`."""

    def after_step(self, step: int) -> None:
        """After optimizer step ``step`` (1-based, counting applied steps)."""

    def after_epoch(self, epoch: int, train_acc: float | None = None) -> dict[str, Any]:
        """After epoch ``epoch`` (1-based); returns what to log for this epoch."""
        return {}

    def end_of_training(self) -> Retrain | None:
        """After the last epoch: final work (PILoT's prune); a :class:`Retrain` asks for one more round."""
        return None

    # --------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "epochs": self.epochs, "steps_per_epoch": self.steps_per_epoch,
                "last_step": self._last_step}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("name") != self.name:
            raise ValueError(f"state_dict is for method {sd.get('name')!r}, this is {self.name!r}")
        self.epochs, self.steps_per_epoch, self._last_step = sd["epochs"], sd["steps_per_epoch"], sd["last_step"]

    def describe(self) -> str:
        return self.name

    @torch.no_grad()
    def l1(self) -> float:
        """‖θ‖₁ over the parameterized weights of the model."""
        from .. import distributed
        from ..optim import parameterizations

        if self.model is None:
            return 0.0
        total, sharded = 0.0, False
        for _, pz in parameterizations(self.model):
            sharded = sharded or distributed.is_sharded(pz.w)  # FSDP2: this rank's rows, summed below
            total += float(pz.local_values().detach().abs().sum())
        return float(distributed.sum_over_ranks([total])[0]) if sharded else total
