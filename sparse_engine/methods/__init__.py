"""The training recipes: dense, static (random PaI), Sign-In, PILoT, and the weight-decay switch-off.

    from sparse_engine.methods import make_method
    method = make_method("signin", density=0.1, wd_switchoff=0.5)   # Sign-In + switch-off at half time

See :mod:`sparse_engine.methods.base` for the life of a method.
"""
from __future__ import annotations

from typing import Any

from .base import Method, MethodConfig, Retrain, check_density
from .compose import Compose
from .dense import Dense, DenseConfig
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


__all__ = [
    "METHODS",
    "Compose",
    "Dense",
    "DenseConfig",
    "Method",
    "MethodConfig",
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
]
