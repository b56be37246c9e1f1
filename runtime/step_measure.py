"""Measure a whole training step run by :func:`fedplan.runtime.step.train_step`.

The same measurement as :func:`fedplan.runtime.measure.measure_step` (bytes held at the
start of the step plus the peak allocated during it, from the profiler's memory events,
never the resident-set size), with the step-level decisions of ``StepOptions`` applied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .measure import StepMeasurement, measure_step
from .step import Inputs, StepOptions


def measure_train_step(module: nn.Module, inputs: Inputs, targets: Any, loss_fn: Callable,
                       optimizer: torch.optim.Optimizer, *, options: StepOptions | None = None,
                       steps: int = 3, warmup: int = 1) -> StepMeasurement:
    """Run ``warmup + steps`` steps of ``train_step`` and measure one more
    (``measure_step`` with ``options``; default: the ordinary step)."""
    return measure_step(module, inputs, targets, loss_fn, optimizer, steps=steps,
                        warmup=warmup, options=StepOptions() if options is None else options)
