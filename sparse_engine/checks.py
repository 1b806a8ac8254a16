"""Argument checks shared by the library: each raises ValueError in one line that names the argument,
what was expected and what came (the value checks that belong to one concept live with it:
``masks.check_density``, ``layout.check_block_shape``, ``param.check_beta``)."""
from __future__ import annotations

from collections.abc import Collection
from typing import Any


def check_choice(name: str, value: Any, choices: Collection[str]) -> Any:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_positive_int(name: str, value: Any) -> int:
    """``value`` if it is an int > 0 (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value
