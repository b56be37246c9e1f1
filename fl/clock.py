"""Simulated wall clock of a synchronous federation.

A client's round time is its local steps times its step time under its plan on this
machine, divided by its relative speed (a device at speed 0.25 takes four times as
long). The step time is the plan cache's analytic one (``PlanCache``: FLOPs and bytes at
a calibrated rate, recomputation included), so the clock is the same on every run with
the same seed. A round lasts as long as its slowest selected client that trained; with a
deadline, a client over it is dropped as a straggler and the round lasts the deadline.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["client_seconds", "round_seconds"]


def client_seconds(steps: int, step_seconds: float, speed: float) -> float:
    """Device seconds of ``steps`` local steps of ``step_seconds`` each at ``speed``."""
    if speed <= 0 or not math.isfinite(speed):
        raise ValueError(f"speed must be a positive number; got {speed!r}")
    return steps * step_seconds / speed


def round_seconds(client_times: Iterable[float], deadline: float | None = None) -> float:
    """The slowest client's time, capped at ``deadline`` (stragglers are cut off)."""
    times = list(client_times)
    if not times:
        return 0.0
    slowest = max(times)
    return min(slowest, deadline) if deadline is not None else slowest
