"""Measure candidates and choose one: the engine behind ``layout="auto"`` (nn/autolayout.py, training
layouts) and ``extract(..., "auto")`` (export/extract.py, inference formats).

* :func:`measure` times a set of runners (zero-argument callables) in interleaved rounds, so that load
  from other processes hits every candidate alike, and keeps each one's fastest call: the call least
  disturbed by that load.
* :func:`decide` applies the rule: a candidate replaces the baseline ("dense") only when it is more than
  ``margin`` faster than the baseline in *every* measured case (e.g. every batch size); among those, the
  lowest geometric mean of its time ratios to the baseline wins. The baseline wins ties within the margin.
* :func:`verdict` applies the same rule to the per-round samples of :func:`measure_rounds` with a spread
  check, so that a noisy machine cannot flip the choice: a case counts as won only when two estimates
  agree, the fastest calls (least disturbed by load) and the median of the per-round ratios (each round
  times every candidate under the same load); where they disagree the case is "within noise". A caller
  measures again once, and if the answer is still within noise keeps the baseline, the prior that is
  never slower than what was measured. The verdict carries a sentence saying what was measured and why.

Caching what was measured, and building the runners, is the callers' business.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

#: a candidate must beat the baseline by more than this fraction to be chosen
MARGIN = 0.05
BASELINE = "dense"


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(runners: Mapping[str, Callable[[], Any]], device: torch.device | str | None = None,
            **options: Any) -> dict[str, float]:
    """Seconds per call of each runner: the fastest single call over interleaved rounds (``options``:
    the keyword arguments of :func:`measure_rounds`)."""
    return {name: min(s) for name, s in measure_rounds(runners, device, **options).items()}


def measure_rounds(
    runners: Mapping[str, Callable[[], Any]],
    device: torch.device | str | None = None,
    *,
    warmup: int = 2,
    rounds: int = 7,
    budget_s: float = 1.0,
    burst_s: float = 0.0,
    drop_slower: float = math.inf,
) -> dict[str, list[float]]:
    """Per round, the fastest call of each runner (seconds): the rounds interleave the runners, so the
    i-th samples of two runners were taken under about the same load.

    ``warmup`` calls of each first. A round calls each runner once, or, with ``burst_s`` > 0, as many
    times as fill about ``burst_s`` seconds (sized on one timed call; at most 200). After 3 rounds the
    measuring stops once ``budget_s`` has passed, and a runner already ``drop_slower`` times slower than
    the first (the baseline) is measured no further (its list is then shorter). CUDA work is
    synchronised around every call.
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
    samples: dict[str, list[float]] = {name: [] for name in names}
    active = list(names)
    start = time.perf_counter()
    for r in range(rounds):
        for name in active:
            fn, fastest = runners[name], math.inf
            for _ in range(calls[name]):
                t0 = time.perf_counter()
                fn()
                _sync(device)
                fastest = min(fastest, time.perf_counter() - t0)
            samples[name].append(fastest)
        if r >= 2:
            if time.perf_counter() - start > budget_s:
                break
            base = min(samples[names[0]])
            active = [n for n in active if n == names[0] or min(samples[n]) <= drop_slower * base]
    return samples


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


# --------------------------------------------------------------------------------- robust verdict


@dataclass
class Verdict:
    """What :func:`verdict` decided: the ``choice``, whether the measurements left it ``unsure`` (a case
    within noise), and ``reason``, one sentence of what was measured and why."""

    choice: str
    unsure: bool
    reason: str


def _estimates(cand: list[float], base: list[float]) -> tuple[float, float]:
    """(ratio of the fastest calls, median of the paired per-round ratios) of a candidate to the baseline."""
    n = min(len(cand), len(base))
    paired = statistics.median(c / b for c, b in zip(cand[:n], base[:n])) if n else math.inf
    return min(cand, default=math.inf) / min(base), paired


def _case_name(case: Any, unit: str) -> str:
    return f"{unit} {case}" if case is not None else "the measured case"


def verdict(samples: Mapping[str, Mapping[Any, list[float]]], margin: float = MARGIN, baseline: str = BASELINE,
            unit: str = "batch") -> Verdict:
    """The rule of :func:`decide` on per-round samples (candidate -> {case: [seconds per round]}) with the
    spread check of the module docstring. ``unit`` names the cases in the reason ("batch": "batch 64")."""
    if baseline not in samples:
        raise ValueError(f"samples must include the {baseline!r} baseline, got {sorted(samples)}")
    base = samples[baseline]
    need = 1.0 / (1.0 + margin)  # a ratio below this is a win
    winners, unsure, notes = {}, [], []
    for name, cases in samples.items():
        if name == baseline:
            continue
        est = {c: _estimates(cases[c], base[c]) for c in base}
        won = [c for c, (fast, typ) in est.items() if fast < need and typ < need]
        lost = [c for c, (fast, typ) in est.items() if fast >= need and typ >= need]
        if len(won) == len(est):
            winners[name] = math.exp(sum(math.log(f) for f, _ in est.values()) / len(est))
        elif not lost:
            unsure.append(name)
        worst = max(est, key=lambda c: est[c][0])
        fast, typ = est[worst]
        paired = f"paired median {1 / typ:.2f}x" if math.isfinite(typ) else "stopped early as much slower"
        notes.append(f"{name} speed-up {1 / fast:.2f}x ({paired}) at {_case_name(worst, unit)}")
    measured = "; ".join(notes)
    need_pct = f"{margin:.0%}"
    if winners:
        best = min(winners, key=winners.get)
        return Verdict(best, False, f"{best}: faster than {baseline} by more than {need_pct} at every measured "
                                    f"{unit} in both estimates ({measured}; slowest case shown)")
    if unsure:
        return Verdict(baseline, True, f"{', '.join(unsure)} within the noise of this machine ({measured}): "
                                       f"kept {baseline}, which is never slower than measured")
    return Verdict(baseline, False, f"no candidate faster than {baseline} by more than {need_pct} at every "
                                    f"measured {unit} ({measured}; slowest case shown)")
