"""The training recipes: dense, static (PaI), Sign-In, PILoT, the weight-decay switch-off, gradual
magnitude pruning (gmp) and AC/DC; static and Sign-In take masks from data and dynamic masks (RigL / SET).

    from sparse_engine.methods import make_method
    method = make_method("signin", density=0.1, wd_switchoff=0.5)   # Sign-In + switch-off at half time
    method = make_method("signin", density=0.1, dynamic="rigl", update_every=100)   # RigL + Sign-In

See :mod:`sparse_engine.methods.base` for the life of a method.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .acdc import ACDC, ACDCConfig
from .base import Method, MethodConfig, Retrain, check_density, option
from .compose import Compose
from .dense import Dense, DenseConfig
from .dynamic import MaskOptions
from .gmp import GMP, GMPConfig
from .pilot import PILoT, PILoTConfig
from .signin import SignIn, SignInConfig
from .static import Static, StaticConfig
from .wd_switchoff import WDSwitchOff, WDSwitchOffConfig

#: name -> method class
METHODS: dict[str, type[Method]] = {
    "dense": Dense,
    "static": Static,
    "signin": SignIn,
    "pilot": PILoT,
    "wd_switchoff": WDSwitchOff,
    "gmp": GMP,
    "acdc": ACDC,
}


def make_method(name: str, wd_switchoff: float | None = None, **options: Any) -> Method:
    """A method by name with its config options (``density``, ``distribution``, ``layout``, ``filter``,
    ``seed`` for every method, plus the method's own; an unknown option is an error).
    ``wd_switchoff=at`` composes the weight-decay switch-off (at that fraction of training) with it.
    """
    if name not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r}")
    cls = METHODS[name]
    method = cls(**options)
    if wd_switchoff is None:
        return method
    if name == "wd_switchoff":
        raise ValueError("wd_switchoff is already the method; give its switch-off point as at=...")
    common = {k: v for k, v in options.items() if k in ("seed",)}
    return Compose([method, WDSwitchOff(at=wd_switchoff, **common)])


_TYPES = {"float": float, "int": int, "str": str, "bool": bool}


@dataclass(frozen=True)
class Option:
    """One method option as the command line and the training configuration offer it.

    name: its name there (``--reset-every`` / ``TrainConfig.reset_every``); field: the config field;
    type: float, int, str or bool; default: the declared default; defaults: method name -> that method's
    default (a method may override it); common: declared on :class:`MethodConfig` (every method has it).
    """

    name: str
    field: str
    type: type
    help: str
    choices: tuple | None
    default: Any
    defaults: dict[str, Any]
    common: bool


def options() -> dict[str, Option]:
    """Every option declared with :func:`~sparse_engine.methods.base.option` in the method configs, by
    name: the common ones (MethodConfig) first, then each method's own in the order of :data:`METHODS`."""
    table: dict[str, Option] = {}
    common = {f.name for f in dataclasses.fields(MethodConfig)}
    for cls in (MethodConfig, *(m.config_class for m in METHODS.values())):
        for f in dataclasses.fields(cls):
            if "help" not in f.metadata or (cls is not MethodConfig and f.name in common):
                continue
            name = f.metadata["name"] or f.name
            if name not in table:
                kind = _TYPES[str(f.type).split("|")[0].strip()]
                table[name] = Option(name, f.name, kind, f.metadata["help"], f.metadata["choices"], f.default, {},
                                     cls is MethodConfig)
            for method, m in METHODS.items():
                if m.config_class is cls or cls is MethodConfig:
                    table[name].defaults.setdefault(method, _default(m.config_class, f.name))
    return table


def _default(cls: type[MethodConfig], name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default


__all__ = [
    "ACDC",
    "ACDCConfig",
    "GMP",
    "GMPConfig",
    "MaskOptions",
    "METHODS",
    "Compose",
    "Dense",
    "DenseConfig",
    "Method",
    "MethodConfig",
    "Option",
    "PILoT",
    "PILoTConfig",
    "Retrain",
    "SignIn",
    "SignInConfig",
    "Static",
    "StaticConfig",
    "WDSwitchOff",
    "WDSwitchOffConfig",
    "check_density",
    "make_method",
    "option",
    "options",
]
