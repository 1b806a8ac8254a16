"""What one training run is: :class:`TrainConfig`, its checks, the method and the data it names.

``TrainConfig`` holds the options of the run itself (model, data, optimisation, output) and every method
option. The method options are not written here: they are derived from the method configs'
declarations (:func:`sparse_engine.methods.options`), so a new option of a method reaches the
configuration and the command line (cli.py) by being declared once, in its config dataclass.

    from sparse_engine.app.config import TrainConfig
    cfg = TrainConfig(model="mlp", method="signin", density=0.1, epochs=5, reset_every=2)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..masks import check_density
from ..methods import METHODS, Method, make_method, options
from ..optim import NONFINITE_POLICIES
from . import data as data_mod
from .models import MODELS, build_model

DATASETS = ("auto", "fashion-mnist", "teacher", "sequences")
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "constant")


class ConfigError(ValueError):
    """A training option is invalid (the message names it)."""


@dataclass
class RunConfig:
    """The options of a run that belong to no method (the base of :class:`TrainConfig`)."""

    model: str = "mlp"
    method: str = "signin"
    data: str = "auto"
    data_dir: str | None = None
    n_train: int | None = None
    n_test: int | None = None
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    step_in_backward: bool = False
    nonfinite: str = "skip"
    fsdp: bool = False  # several processes: FSDP2 (sharded parameters) instead of DDP
    channels_last: bool = False  # model and image batches in torch.channels_last (NHWC) memory format
    progress: bool = True
    out_dir: str | None = None

    def validate(self) -> TrainConfig:
        """Check every option (ConfigError naming the first bad one); the method checks its own."""
        for name, choices in (("model", MODELS), ("method", METHODS), ("data", DATASETS),
                              ("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES),
                              ("nonfinite", NONFINITE_POLICIES)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {tuple(choices)}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "n_train", "n_test", "threads"):
            _positive_int(name, getattr(self, name), allow_none=name not in ("epochs", "batch_size"))
        _number("lr", self.lr, low_open=True)
        _number("momentum", self.momentum, high=1.0)
        _number("weight_decay", self.weight_decay)
        try:
            check_density(self.density)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an int, got {self.seed!r}")
        if not isinstance(self.channels_last, bool):
            raise ConfigError(f"channels_last must be True or False, got {self.channels_last!r}")
        if self.channels_last and self.fsdp:
            raise ConfigError("channels_last and fsdp together are not supported: train channels_last with "
                              "DistributedDataParallel (drop --fsdp) or drop --channels-last")
        self._check_data_and_device()
        method = make_method_of(self)  # the method's options, checked by its config
        if self.fsdp and not method.shardable:
            raise ConfigError(f"fsdp: the method {self.method!r} cannot train a sharded model (it reads whole "
                              "weights to decide); train it with DistributedDataParallel (drop --fsdp)")
        return self  # type: ignore[return-value]

    def _check_data_and_device(self) -> None:
        if self.data == "sequences" and self.model != "transformer":
            raise ConfigError(f"data='sequences' (token ids) needs model='transformer', got model={self.model!r}")
        if self.data in ("fashion-mnist", "teacher") and self.model == "transformer":
            raise ConfigError(f"model='transformer' reads token sequences (data='sequences'), got data={self.data!r}")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"device must be a torch device such as 'cpu' or 'cuda', got {self.device!r} ({e})")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={self.device!r} requested but no CUDA GPU is visible to torch")

    def method_options(self) -> dict[str, Any]:
        """The options for ``make_method(self.method, ...)``: those its config has that are set here (a
        method option left at None takes the method's own default; a dense method's density is 1)."""
        method = METHODS[self.method]
        fields = {f.name for f in dataclasses.fields(method.config_class)}
        opts: dict[str, Any] = {"seed": self.seed}
        for opt in options().values():
            value = getattr(self, opt.name)
            if value is not None and opt.field in fields:
                opts[opt.field] = value
        if method.sparsify_as is None:
            opts["density"] = 1.0
        return opts


def _method_option_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    """TrainConfig's fields for the method options: a common option (every method has it) defaults to
    MethodConfig's default, a method's own to None (= that method's default)."""
    out = []
    for opt in options().values():
        out.append((opt.name, f"{opt.type.__name__} | None", dataclasses.field(default=opt.default if opt.common
                                                                                 else None)))
    return out


TrainConfig = dataclasses.make_dataclass("TrainConfig", _method_option_fields(), bases=(RunConfig,),
                                         namespace={"__module__": __name__})
TrainConfig.__doc__ = """Everything a run needs: the run's own options (RunConfig) and every method option
(sparse_engine.methods.options()). ``None`` for a method option means the method's own default; an option
applies only to the methods that have it, so one config can drive ``compare``."""


def _positive_int(name: str, v: Any, allow_none: bool = False) -> None:
    if allow_none and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{name} must be a positive int, got {v!r}")


def _number(name: str, v: Any, low: float = 0.0, low_open: bool = False, high: float | None = None) -> None:
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    ok = ok and (v > low if low_open else v >= low) and (high is None or v <= high)
    if not ok:
        rng = f"{'>' if low_open else '>='} {low}" + ("" if high is None else f" and <= {high}")
        raise ConfigError(f"{name} must be a finite number {rng}, got {v!r}")


def make_method_of(cfg: TrainConfig) -> Method:
    """The method ``cfg`` asks for; its options are checked here (ConfigError: they come from the user)."""
    try:
        wd_off = None if cfg.method == "wd_switchoff" else cfg.wd_switchoff  # for that method it is its `at`
        return make_method(cfg.method, wd_switchoff=wd_off, **cfg.method_options())
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_model_and_method(cfg: TrainConfig, input_shape: tuple[int, ...], n_classes: int,
                           vocab_size: int | None = None, batch: tuple | None = None) -> tuple[nn.Module, Method, Any]:
    """(model, method, sparsify report) for samples of ``input_shape``: the model built from the seed (so
    every method starts from the same dense init) and sparsified in place by the method (``batch``: what a
    mask from data, ``--mask snip``, is scored on)."""
    method = make_method_of(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, input_shape, n_classes, vocab_size)
    return model, method, method.prepare(model, batch)


def load_data(cfg: TrainConfig) -> data_mod.Dataset:
    """The dataset of ``cfg`` (``data="auto"``: Fashion-MNIST, or token sequences for the transformer)."""
    kind = cfg.data if cfg.data != "auto" else ("sequences" if cfg.model == "transformer" else "fashion-mnist")
    if kind == "fashion-mnist":
        ds = data_mod.load_fashion_mnist(cfg.data_dir, flatten=cfg.model != "cnn")
    elif kind == "teacher":
        ds = data_mod.synthetic_teacher(cfg.n_train or 8192, cfg.n_test or 2048, seed=cfg.seed)
    else:
        ds = data_mod.synthetic_sequences(cfg.n_train or 8192, cfg.n_test or 2048, seed=cfg.seed)
    if cfg.n_train is not None and cfg.n_train < ds.n_train:
        ds.x_train, ds.y_train = ds.x_train[: cfg.n_train], ds.y_train[: cfg.n_train]
    if cfg.n_test is not None and cfg.n_test < ds.n_test:
        ds.x_test, ds.y_test = ds.x_test[: cfg.n_test], ds.y_test[: cfg.n_test]
    return ds


def default_threads(cfg: TrainConfig) -> int | None:
    """CPU threads for a run when ``cfg.threads`` is None: 1 for the MLP, torch's default otherwise.

    The MLP's matmuls are too small for intra-op parallelism to pay, and OpenMP threads that spin-wait
    collapse as soon as another process wants the CPU: on the 2-core development machine under load, an
    epoch of static + signin took 38-42 s with 2 threads and 13-14 s with 1 (`--threads` to override).
    """
    if cfg.threads is not None:
        return cfg.threads
    return 1 if cfg.model == "mlp" and torch.device(cfg.device).type == "cpu" else None


def default_out_dir(cfg: TrainConfig, methods: list[str] | None = None, root: str = "runs") -> str:
    what = "compare-" + "-".join(methods) if methods else cfg.method
    return str(Path(root) / f"{cfg.model}-{what}-d{cfg.density:g}-s{cfg.seed}")
