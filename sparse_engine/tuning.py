"""Measure candidates and choose one: the engine behind ``layout="auto"`` (nn/autolayout.py, training
layouts) and ``extract(..., "auto")`` (export/extract.py, inference formats).

* :func:`measure` times a set of runners (zero-argument callables) in interleaved rounds, so that load
  from other processes hits every candidate alike, and keeps each one's fastest call: the call least
  disturbed by that load.
* :func:`decide` applies the rule: a candidate replaces the baseline ("dense") only when it is more than
  ``margin`` faster than the baseline in *every* measured case (e.g. every batch size); among those, the
  lowest geometric mean of its time ratios to the baseline wins. The baseline wins ties within the margin.

Caching what was measured, and building the runners, is the callers' business.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

#: a candidate must beat the baseline by more than this fraction to be chosen
MARGIN = 0.05
BASELINE = "dense"


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    runners: Mapping[str, Callable[[], Any]],
    device: torch.device | str | None = None,
    *,
    warmup: int = 2,
    rounds: int = 7,
    budget_s: float = 1.0,
    burst_s: float = 0.0,
    drop_slower: float = math.inf,
) -> dict[str, float]:
    """Seconds per call of each runner: the fastest single call over interleaved rounds.

    ``warmup`` calls of each first. A round calls each runner once, or, with ``burst_s`` > 0, as many
    times as fill about ``burst_s`` seconds (sized on one timed call; at most 200). After 3 rounds the
    measuring stops once ``budget_s`` has passed, and a runner already ``drop_slower`` times slower than
    the first (the baseline) is measured no further. CUDA work is synchronised around every call.
    """
    device = None if device is None else torch.device(device)
    names = list(runners)
    for _ in range(warmup):
        for fn in runners.values():
            fn()
    _sync(device)
    calls = dict.fromkeys(names, 1)
    if burst_s > 0:
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            calls[name] = max(1, min(200, int(burst_s / max(time.perf_counter() - t0, 1e-7))))
    best = dict.fromkeys(names, math.inf)
    active = list(names)
    start = time.perf_counter()
    for r in range(rounds):
        for name in active:
            fn = runners[name]
            for _ in range(calls[name]):
                t0 = time.perf_counter()
                fn()
                _sync(device)
                best[name] = min(best[name], time.perf_counter() - t0)
        if r >= 2:
            if time.perf_counter() - start > budget_s:
                break
            active = [n for n in active if n == names[0] or best[n] <= drop_slower * best[names[0]]]
    return best


def _cases(times: Mapping[str, float | Mapping[Any, float]]) -> dict[str, dict[Any, float]]:
    return {k: (dict(v) if isinstance(v, Mapping) else {None: v}) for k, v in times.items()}


def ratio(times: Mapping[str, float | Mapping[Any, float]], name: str, baseline: str = BASELINE) -> float:
    """Geometric mean over the cases of ``times[name] / times[baseline]`` (< 1: faster than the baseline)."""
    cases = _cases(times)
    base, t = cases[baseline], cases[name]
    return math.exp(sum(math.log(t[c] / base[c]) for c in base) / len(base))


def decide(times: Mapping[str, float | Mapping[Any, float]], margin: float = MARGIN,
           baseline: str = BASELINE) -> str:
    """The rule of the module docstring. ``times``: candidate -> seconds, or candidate -> {case: seconds}
    (the same cases for every candidate); non-finite times never win."""
    if baseline not in times:
        raise ValueError(f"times must include the {baseline!r} baseline, got {sorted(times)}")
    cases = _cases(times)
    base = cases[baseline]
    winners = [name for name, t in cases.items() if name != baseline
               and all(math.isfinite(t[c]) and t[c] * (1.0 + margin) < base[c] for c in base)]
    return min(winners, key=lambda name: ratio(cases, name, baseline)) if winners else baseline
