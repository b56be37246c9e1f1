"""One client's local training under its plan: :func:`train_client`.

The client builds the model, loads the weights it was sent, rewrites the model with its
plan (:func:`fedplan.apply`), and trains ``epochs`` passes over its partition in
full batches of the plan's batch size (a partial last batch is dropped: the plan was
made, and measured, for that batch size; a client with fewer samples than a batch trains
one batch per epoch with its samples repeated). SGD is rebuilt every round (FedAvg's local
optimizer), with the learning rate the server sends.

**What is measured.** The first two local steps run under the profiler (one before the
optimizer has state, one with it: the steady state the planner predicts); the client
reports the larger of the two peaks (README's definition: bytes held at the start of the
step plus the peak allocated during it). The other steps run unprofiled, because the
profiler slows a step several times over and a step's memory does not depend on the
values in the batch. :func:`measure_plan_peak` runs exactly the same two profiled steps
on an example batch, which is how the plan cache knows a plan's peak before any client
uses it.

Per-sample training losses (cross-entropy of the detached logits) are summed for Oort's
statistical utility; computing them holds the logits and a batch-sized vector through
the step, and that is part of the measured peak.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fedplan
from fedplan.planner.optimizers import make_optimizer
from fedplan.runtime.measure import held_bytes, profiled_peak

from .messages import ClientReply, TrainInstruction, state_from_arrays, state_to_arrays

__all__ = ["PROFILED_STEPS", "local_steps", "measure_plan_peak", "no_collection",
           "train_client"]

PROFILED_STEPS = 2
"""Local steps measured under the profiler at the start of every client's training."""


@contextlib.contextmanager
def no_collection() -> Iterator[None]:
    """Python's cyclic garbage collector kept off for the block (restored after): for
    every profiled measurement of the FL layer.

    Why: the CPU allocator remembers the size of every block allocated while the profiler
    records memory, across profiling sessions, and reports its free in whichever session
    it happens. A collection that runs inside a profiled step frees garbage (modules,
    planned modules and autograd graphs in reference cycles) whose tensors an earlier
    profiled step allocated, and the step's measured peak drops by what it happened to
    free. When the collector runs depends on every Python object allocated before in the
    process, so the same plan measured 434,592, 434,624 or 435,648 B depending on which
    tests ran before (tests/test_fl_sim.py's resume test, after
    tests/test_fl_partition.py): measured peaks decide budgets (fractions of the
    keep-all peak), plan-cache buckets and re-solves, so two processes could plan
    differently for the same client. With the collector paused, what a step frees is
    what the step itself releases, so the measurement is a function of the step alone.
    (Collecting first is not needed for that and cost 0.2 s a step in a test process.)"""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _per_sample_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy; outputs of shape (B, T, C) (a prediction per position)
    give each sample its mean over positions. Floating targets (a split device part's
    loss is its output times the edge's gradient) have no per-sample loss: zeros."""
    if targets.is_floating_point():
        return torch.zeros(outputs.shape[0], dtype=outputs.dtype)
    if outputs.dim() == 3:
        return F.cross_entropy(outputs.transpose(1, 2), targets, reduction="none").mean(1)
    return F.cross_entropy(outputs, targets, reduction="none")


class _Stepper:
    """One training step of a planned module, optionally under the profiler.

    ``prefix`` (block-wise strategies) is a frozen front part of the model: it runs first,
    under ``no_grad`` and in eval mode, and its parameters count in the measured peak (they
    are held on the device) while nothing of it is saved for backward."""

    def __init__(self, planned: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[Any, Any], torch.Tensor], prefix: nn.Module | None = None):
        self.planned, self.optimizer, self.loss_fn = planned, optimizer, loss_fn
        self.prefix = prefix
        if prefix is not None:
            prefix.eval()
            prefix.requires_grad_(False)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        if self.prefix is not None:
            with torch.no_grad():
                inputs = self.prefix(inputs)
        outputs = self.planned(inputs)
        # a part that returns (prediction, extras...) for its loss (NeuLite's mentor term)
        prediction = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        per_sample = _per_sample_loss(prediction.detach(), targets)
        self.loss_fn(outputs, targets).backward()
        self.optimizer.step()
        return per_sample

    def profiled_step(self, inputs: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[int, torch.Tensor]:
        """(measured peak bytes, per-sample losses) of one step."""
        self.optimizer.zero_grad(set_to_none=True)
        start = held_bytes(self.planned, self.optimizer, [inputs, targets])
        if self.prefix is not None:
            start += held_bytes(self.prefix, None, [])
        with no_collection():
            peak, per_sample = profiled_peak(lambda: self.step(inputs, targets))
        return start + peak, per_sample


def _planned(model_factory: Callable[[], nn.Module], weights, plan: fedplan.Plan
             ) -> tuple[nn.Module, nn.Module]:
    model = model_factory()
    if weights is not None:
        model.load_state_dict(state_from_arrays(weights))
    model.train()
    return model, fedplan.apply(model, plan)


def measure_plan_peak(model_factory: Callable[[], nn.Module], plan: fedplan.Plan,
                      inputs: torch.Tensor, targets: torch.Tensor, *,
                      loss_fn: Callable | None = None, lr: float = 0.01,
                      seed: int = 0, prefix: nn.Module | None = None) -> int:
    """The peak a client reports for ``plan``: the same profiled steps on one batch
    (``inputs`` go through ``prefix`` first when there is one)."""
    model, planned = _planned(model_factory, None, plan)
    optimizer = make_optimizer(plan.optimizer, model.parameters(), lr=lr)
    stepper = _Stepper(planned, optimizer, loss_fn or F.cross_entropy, prefix)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return max(stepper.profiled_step(inputs, targets)[0] for _ in range(PROFILED_STEPS))


def local_steps(num_samples: int, batch_size: int, epochs: int) -> int:
    """Steps of local training: full batches per epoch, at least one (a client with fewer
    samples than a batch trains one batch of its samples repeated)."""
    return epochs * max(1, num_samples // batch_size)


def train_client(instruction: TrainInstruction, train_x: torch.Tensor, train_y: torch.Tensor,
                 *, model_factory: Callable[[], nn.Module],
                 loss_fn: Callable | None = None, prefix: nn.Module | None = None,
                 names: Callable[[dict[str, Any]], dict[str, Any]] | None = None
                 ) -> ClientReply:
    """Train one client and return its reply (weights, sample count, losses, peak).

    ``train_x``/``train_y`` are the client's partition. Deterministic given
    ``instruction.seed``: the batch order comes from a generator seeded with it, and
    dropout draws from the global RNG reseeded with it inside ``fork_rng`` (the caller's
    RNG state is restored afterwards).
    """
    plan = fedplan.Plan.from_json(instruction.plan, source=f"plan for client "
                                                          f"{instruction.client_id}")
    batch_size = instruction.batch_size
    plan.check_matches(batch_size=batch_size, source="the client's plan")
    n = int(train_y.shape[0])
    if n < 1:
        raise ValueError(f"client {instruction.client_id} holds no samples")
    steps_per_epoch = local_steps(n, batch_size, 1)
    started = time.perf_counter()
    model, planned = _planned(model_factory, instruction.weights if names is None else None,
                              plan)
    optimizer = make_optimizer(plan.optimizer, model.parameters(), lr=instruction.lr)
    stepper = _Stepper(planned, optimizer, loss_fn or F.cross_entropy, prefix)
    order = torch.Generator().manual_seed(instruction.seed)
    peak, steps = 0, 0
    loss_sum = loss_sq_sum = 0.0
    with torch.random.fork_rng():
        torch.manual_seed(instruction.seed)
        for _ in range(instruction.epochs):
            perm = torch.randperm(n, generator=order)
            if n < batch_size:  # one batch, the samples cycled to fill it
                perm = perm.repeat(math.ceil(batch_size / n))[:batch_size]
            for b in range(steps_per_epoch):
                idx = perm[b * batch_size:(b + 1) * batch_size]
                inputs, targets = train_x[idx], train_y[idx]
                if steps < PROFILED_STEPS:
                    measured, per_sample = stepper.profiled_step(inputs, targets)
                    peak = max(peak, measured)
                else:
                    per_sample = stepper.step(inputs, targets)
                per_sample = per_sample.double()
                loss_sum += float(per_sample.sum())
                loss_sq_sum += float((per_sample * per_sample).sum())
                steps += 1
    count = steps * batch_size
    state = state_to_arrays(model.state_dict())
    return ClientReply(
        round=instruction.round, client_id=instruction.client_id,
        weights=names(state) if names is not None else state, num_samples=n, steps=steps,
        loss_sum=loss_sum if math.isfinite(loss_sum) else math.inf,
        loss_sq_sum=loss_sq_sum, loss_count=count, measured_peak_bytes=int(peak),
        budget_bytes=instruction.budget_bytes,
        train_seconds=time.perf_counter() - started)
