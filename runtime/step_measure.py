"""Measure a whole training step run by :func:`fedplan.runtime.step.train_step`.

The same measurement as :func:`fedplan.runtime.measure.measure_step` (bytes held at the
start of the step plus the peak allocated during it, from the profiler's memory events,
never the resident-set size), with the step-level decisions of ``StepOptions`` applied.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .measure import StepMeasurement, held_bytes, profiled_peak
from .step import Inputs, StepOptions, _tensors, train_step


def measure_train_step(module: nn.Module, inputs: Inputs, targets: Any, loss_fn: Callable,
                       optimizer: torch.optim.Optimizer, *, options: StepOptions | None = None,
                       steps: int = 3, warmup: int = 1) -> StepMeasurement:
    """Run ``warmup + steps`` steps of ``train_step`` and measure one more.

    The warm-up creates the optimizer state, so the measured step starts where every later
    step of a training loop starts: gradients None, optimizer state allocated.
    ``step_seconds`` is the median wall time of the ``steps`` unprofiled steps.
    """
    if steps < 1:
        raise ValueError(f"expected steps >= 1; found {steps}")
    options = StepOptions() if options is None else options
    device = _tensors(inputs)[0].device

    def step() -> float:
        return float(train_step(module, inputs, targets, loss_fn, optimizer, options=options))

    for _ in range(max(warmup, 1)):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    optimizer.zero_grad(set_to_none=True)
    start_bytes = held_bytes(module, optimizer, _tensors(inputs) + _tensors(targets))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        loss = step()
        torch.cuda.synchronize(device)
        step_peak = torch.cuda.max_memory_allocated(device) - base
    else:
        step_peak, loss = profiled_peak(step)
    return StepMeasurement(peak_bytes=start_bytes + step_peak, start_bytes=start_bytes,
                           step_peak_bytes=step_peak, step_seconds=statistics.median(times),
                           steps=steps, loss=loss)
