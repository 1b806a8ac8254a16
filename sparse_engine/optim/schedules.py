"""The schedules the methods run: Sign-In resets, weight-decay switch-off, PILoT's α.

Each is a small object with ``state_dict()`` / ``load_state_dict()`` so that a resumed run continues
exactly. They decide *when* and *how much*; the optimizer does the work (``signin_reset``, the group's
``weight_decay`` and ``alpha``). Counts are 1-based: "after step k" / "after epoch k".
"""
from __future__ import annotations

import math
from typing import Any

import torch

UNITS = ("epoch", "step")
ALPHA_SCHEDULES = ("constant", "harmonic", "quadratic", "geometric")


def _check_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _check_float(name: str, value, low: float, high: float | None = None, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if value < low or (low_open and value == low) or (high is not None and value > high):
        lo = f"> {low}" if low_open else f">= {low}"
        hi = "" if high is None else f" and <= {high}"
        raise ValueError(f"{name} must be {lo}{hi}, got {value}")
    return value


class ResetSchedule:
    """Sign-In reset every ``every`` epochs or steps, optionally only in the first part of training.

    Args:
        every: period p (in ``unit``s).
        unit: "epoch" or "step".
        until: fraction of training during which resets happen (1.0: to the end). A reset after unit k
            happens when k % every == 0 and k <= until * total.
        total: training length in ``unit``s (needed when until < 1).
    """

    def __init__(self, every: int, unit: str = "epoch", until: float = 1.0, total: int | None = None) -> None:
        self.every = _check_int("every", every)
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        self.unit = unit
        self.until = _check_float("until", until, 0.0, 1.0)
        if self.until < 1.0 and total is None:
            raise ValueError("total (training length in units) is needed when until < 1")
        self.total = None if total is None else _check_int("total", total)
        self.count = 0          # resets done
        self.last: int | None = None

    def due(self, k: int) -> bool:
        """Whether a reset is due after unit ``k`` (1-based); each k fires at most once."""
        if k < 1 or k % self.every != 0 or k == self.last:
            return False
        return self.until >= 1.0 or self.total is None or k <= self.until * self.total

    def fired(self, k: int) -> None:
        self.count += 1
        self.last = k

    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "unit": self.unit, "until": self.until, "total": self.total,
                "count": self.count, "last": self.last}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.__init__(sd["every"], sd["unit"], sd["until"], sd["total"])  # type: ignore[misc]
        self.count, self.last = int(sd["count"]), sd["last"]


class WeightDecaySwitchOff:
    """λ_t = λ for t < T_off, 0 afterwards, with T_off = ⌈at · total_steps⌉; logs the dose A = Σ η_k λ_k.

    Call :meth:`begin` before the first step and :meth:`after_step` after every optimizer step (the
    method does both: ``apply`` and a step hook). ``after_step`` adds this step's η·λ to each group's dose
    (tensor arithmetic: no device sync); both switch the weight decay off once T_off steps are done, so
    ``at=0`` never decays, not even on step 1, and ``at >= 1`` never switches off (dose only).

    It switches off every parameter group's ``weight_decay``: whatever the optimizer decays (the factors
    m, w, and also plain weights, biases and norm parameters where their group has a decay). A group
    created with ``weight_decay=0`` is left as it is.
    """

    def __init__(self, at: float = 0.5, total_steps: int = 1) -> None:
        self.at = _check_float("at", at, 0.0)
        self.total_steps = _check_int("total_steps", total_steps)
        self.switched = False
        self.switch_step: int | None = None
        self.saved: list[float] = []     # the group weight decays before the switch
        self._dose: list[torch.Tensor] = []

    @property
    def off_step(self) -> int:
        return math.ceil(self.at * self.total_steps)

    def begin(self, optimizer, steps_done: int = 0) -> None:
        """Before training (or before step ``steps_done + 1``): switch off now if T_off steps are done."""
        self._ensure_dose(optimizer)
        self._switch_if_due(optimizer, steps_done)

    def after_step(self, optimizer, step: int) -> None:
        self._ensure_dose(optimizer)
        for d, g in zip(self._dose, optimizer.param_groups):
            if g["weight_decay"]:
                d.add_(g["lr"].to(d.device) * g["weight_decay"])
        self._switch_if_due(optimizer, step)

    def _ensure_dose(self, optimizer) -> None:
        groups = optimizer.param_groups
        if len(self._dose) != len(groups):
            self._dose = [torch.zeros((), dtype=torch.float64, device=g["lr"].device) for g in groups]

    def _switch_if_due(self, optimizer, steps_done: int) -> None:
        groups = optimizer.param_groups
        if not self.switched and self.at < 1.0 and steps_done >= self.off_step:
            self.saved = [float(g["weight_decay"]) for g in groups]
            for g in groups:
                g["weight_decay"] = 0.0
            self.switched = True
            self.switch_step = steps_done

    def dose(self) -> list[float]:
        """Accumulated Σ η_k λ_k per parameter group."""
        return [float(d) for d in self._dose]

    def state_dict(self) -> dict[str, Any]:
        return {"at": self.at, "total_steps": self.total_steps, "switched": self.switched,
                "switch_step": self.switch_step, "saved": list(self.saved), "dose": self.dose()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.at, self.total_steps = float(sd["at"]), int(sd["total_steps"])
        self.switched, self.switch_step, self.saved = bool(sd["switched"]), sd["switch_step"], list(sd["saved"])
        self._dose = [torch.tensor(float(d), dtype=torch.float64) for d in sd["dose"]]


class AlphaController:
    """PILoT's α controller (Algorithm 1 of the paper, as reconstructed), called once per epoch.

    With factor δ > 1, target L1 norm K and T epochs: after epoch k, if the train accuracy did not drop
    (by more than ``tolerance``) against the previous epoch, ‖m ⊙ w‖₁ ≥ K and k ≤ T/2, then α ← α·δ (not
    sparse yet: push harder); otherwise α ← α/δ (decay, so that ∫α stays finite).
    """

    def __init__(self, alpha: float, delta: float = 1.2, target_l1: float = 0.0, epochs: int = 1,
                 tolerance: float = 0.0) -> None:
        self.alpha = _check_float("alpha", alpha, 0.0)
        self.delta = _check_float("delta", delta, 1.0, low_open=True)
        self.target_l1 = _check_float("target_l1", target_l1, 0.0)
        self.epochs = _check_int("epochs", epochs)
        self.tolerance = _check_float("tolerance", tolerance, 0.0)
        self.prev_acc: float | None = None
        self.history: list[float] = [self.alpha]

    def update(self, epoch: int, train_acc: float, l1: float) -> float:
        """New α after epoch ``epoch`` (1-based), given that epoch's train accuracy and ‖θ‖₁."""
        if not (math.isfinite(train_acc) and math.isfinite(l1)):
            raise ValueError(f"train_acc and l1 must be finite, got {train_acc}, {l1}")
        no_drop = self.prev_acc is None or train_acc >= self.prev_acc - self.tolerance
        if no_drop and l1 >= self.target_l1 and epoch <= self.epochs / 2:
            self.alpha *= self.delta
        else:
            self.alpha /= self.delta
        self.prev_acc = float(train_acc)
        self.history.append(self.alpha)
        return self.alpha

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "delta": self.delta, "target_l1": self.target_l1, "epochs": self.epochs,
                "tolerance": self.tolerance, "prev_acc": self.prev_acc, "history": list(self.history)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for k in ("alpha", "delta", "target_l1", "tolerance"):
            setattr(self, k, float(sd[k]))
        self.epochs, self.prev_acc, self.history = int(sd["epochs"]), sd["prev_acc"], list(sd["history"])


class AlphaSchedule:
    """A fixed α schedule over epochs: α_k for k = 0, 1, 2, ... (k = completed epochs).

    constant α₀; harmonic α₀/(k+1); quadratic α₀/(k+1)²; geometric α₀·rate^k (rate 0.95 by default).
    ``update`` has the controller's signature so a method can hold either.
    """

    def __init__(self, kind: str = "constant", alpha: float = 1e-4, rate: float = 0.95) -> None:
        if kind not in ALPHA_SCHEDULES:
            raise ValueError(f"kind must be one of {ALPHA_SCHEDULES}, got {kind!r}")
        self.kind = kind
        self.alpha0 = _check_float("alpha", alpha, 0.0)
        self.rate = _check_float("rate", rate, 0.0, 1.0, low_open=True)
        self.alpha = self.alpha0
        self.history: list[float] = [self.alpha]

    def value(self, k: int) -> float:
        if self.kind == "constant":
            return self.alpha0
        if self.kind == "harmonic":
            return self.alpha0 / (k + 1)
        if self.kind == "quadratic":
            return self.alpha0 / (k + 1) ** 2
        return self.alpha0 * self.rate**k

    def update(self, epoch: int, train_acc: float | None = None, l1: float | None = None) -> float:
        """α for the epoch after ``epoch`` (1-based count of completed epochs)."""
        self.alpha = self.value(epoch)
        self.history.append(self.alpha)
        return self.alpha

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "alpha0": self.alpha0, "rate": self.rate, "alpha": self.alpha,
                "history": list(self.history)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.__init__(sd["kind"], sd["alpha0"], sd["rate"])  # type: ignore[misc]
        self.alpha, self.history = float(sd["alpha"]), list(sd["history"])
