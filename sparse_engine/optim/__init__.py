"""Fused optimizers over parameterized weights, the step-in-backward mode, and the method schedules.

    from sparse_engine.optim import SGD
    opt = SGD(model, lr=0.1, momentum=0.9, weight_decay=5e-4)   # roles discovered from the model
    opt.attach()                                                # optional: update inside backward
"""
from .adamw import AdamW
from .base import (
    NONFINITE_POLICIES,
    RESET_POLICIES,
    ROLES,
    NonFiniteGradError,
    SparseOptimizer,
    parameterizations,
)
from .reset import transform_adam, transform_momentum
from .schedules import ALPHA_SCHEDULES, AlphaController, AlphaSchedule, ResetSchedule, WeightDecaySwitchOff
from .sgd import SGD

__all__ = [
    "ALPHA_SCHEDULES",
    "NONFINITE_POLICIES",
    "RESET_POLICIES",
    "ROLES",
    "SGD",
    "AdamW",
    "AlphaController",
    "AlphaSchedule",
    "NonFiniteGradError",
    "ResetSchedule",
    "SparseOptimizer",
    "WeightDecaySwitchOff",
    "parameterizations",
    "transform_adam",
    "transform_momentum",
]
