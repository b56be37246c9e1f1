"""Measure what a training step really costs: peak bytes and step time.

The peak is defined (README, "What the budget means") as the bytes held at the start of
a step (parameters, buffers, optimizer state, the batch) plus the peak of the bytes
PyTorch allocates during the step (forward, loss, backward, optimizer step) as the
profiler's memory events record them (``profile_memory=True``). Gradients are set to
``None`` before the step, so they count inside the step, where they are allocated.
The resident-set size is not used: it is noisy and under-reports.

On CUDA the same quantity is read from the caching allocator's statistics.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedplan.planner.capture import ModelCall
from fedplan.planner.cost import tensors_in
from fedplan.planner.profiling import memory_profile, peak_allocated

from .step import StepOptions
from .step import train_step as run_train_step


@dataclass(frozen=True)
class StepMeasurement:
    peak_bytes: int           # start_bytes + step_peak_bytes
    start_bytes: int          # held when the step begins
    step_peak_bytes: int      # peak allocated during the step, above start
    step_seconds: float       # median wall time of a step (without the profiler)
    steps: int
    loss: float

    def to_json(self) -> dict:
        return dict(self.__dict__)


def held_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
               batch: Sequence[Any]) -> int:
    """Bytes of distinct storages held by parameters, buffers, optimizer state and batch."""
    storages: dict[int, int] = {}

    def add(tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()

    for tensor in list(module.parameters()) + list(module.buffers()):
        add(tensor)
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    add(value)
    for tensor in tensors_in(list(batch)):
        add(tensor)
    return sum(storages.values())


def profiled_peak(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``fn`` under the profiler; return (peak bytes allocated above entry, result)."""
    with memory_profile() as prof:
        result = fn()
    return peak_allocated(prof), result


def measure_step(module: torch.nn.Module, inputs: Any, targets: Any,
                 loss_fn: Callable, optimizer: torch.optim.Optimizer, *, steps: int = 3,
                 warmup: int = 1, options: StepOptions | None = None) -> StepMeasurement:
    """Run ``warmup + steps`` real training steps and measure the last ones.

    The first warm-up step creates the optimizer state, so the measured steps start
    from the state a training loop is in at every later step. ``inputs`` is a tensor, a
    tuple (positional) or a dict (keyword inputs). A module with a ``train_step`` (a
    ``PlannedModule``) runs its own step; with ``options`` the step is
    ``runtime.step.train_step`` with those step-level decisions.
    """
    if steps < 1:
        raise ValueError(f"expected steps >= 1; found {steps}")
    call = ModelCall.of(inputs)
    device = call.tensors()[0].device

    train_step = getattr(module, "train_step", None)  # a PlannedModule runs its own step
    if call.args and call.kwargs:
        train_step = None  # (mixed calls run the plain three lines)
    step_inputs = dict(call.kwargs) if call.kwargs else tuple(call.args)

    def step() -> float:
        if options is not None:
            return float(run_train_step(module, step_inputs, targets, loss_fn, optimizer,
                                        options=options))
        if train_step is not None:
            return float(train_step(step_inputs, targets, optimizer, loss_fn))
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(module(*call.args, **call.kwargs), targets)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

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
    batch = call.tensors() + tensors_in(targets)
    start_bytes = held_bytes(module, optimizer, batch)
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
