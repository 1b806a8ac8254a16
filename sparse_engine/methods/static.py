"""static: random pruning at initialisation (PaI) with a fixed mask; θ trained directly.

With ``mask=`` the mask comes from magnitudes, SNIP or SynFlow scores or the user, and with ``dynamic=``
it moves while training (RigL / SET, see methods.dynamic).

The mask is drawn once (ER / ERK / uniform layer densities, see masks.py) and never changes; pruned
weights stay exactly 0 and carry no optimizer state. This is the "Random" baseline of the Sign-In paper
(Gadhikar, Jacobs, Zhou, Burkholz 2025), which Sign-In improves on.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Method, MethodConfig
from .dynamic import MaskOptions, MovingMask


@dataclass
class StaticConfig(MaskOptions, MethodConfig):
    pass


class Static(MovingMask, Method):
    """Random static mask, θ = M ⊙ w trained with the base optimizer."""

    name = "static"
    config_class = StaticConfig
    sparsify_as = "static"

    def describe(self) -> str:
        words = self.mask_words()
        return f"static({', '.join(words)})" if words else "static"
