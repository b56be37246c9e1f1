"""The public functions: measure (and, with the planner, compile, plan, apply)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .analysis import as_tuple
from .modelfile import default_loss
from .planner.optimizers import check_optimizer, make_optimizer
from .runtime.measure import StepMeasurement, measure_step


def measure(module: nn.Module, example_inputs: Any, targets: Any = None, *,
            loss_fn: Callable | None = None, optimizer: str = "sgd",
            optimizer_instance: torch.optim.Optimizer | None = None, steps: int = 3,
            warmup: int = 1) -> StepMeasurement:
    """Run real training steps of ``module`` and report measured peak and step time.

    The peak is the README's definition: bytes held at the start of a step (parameters,
    buffers, optimizer state, the batch) plus the peak of what PyTorch allocates during
    the step, from the profiler's memory events on CPU (CUDA allocator statistics on GPU).
    The module is trained for ``warmup + steps + 1`` steps: pass a copy if that matters.
    """
    inputs = as_tuple(example_inputs)
    if targets is None:
        targets = torch.zeros(inputs[0].shape[0], dtype=torch.long, device=inputs[0].device)
    check_optimizer(optimizer)
    opt = optimizer_instance or make_optimizer(optimizer, module.parameters())
    return measure_step(module, inputs, targets, loss_fn or default_loss, opt, steps=steps,
                        warmup=warmup)
