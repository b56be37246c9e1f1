"""Whole-step planning: the step-level decisions chosen together with the activation plan.

For every step configuration the allowed decisions permit (``planner.step.step_choices``:
micro-batch counts, the optimizer step inside backward, 8-bit optimizer state), the cost
model is lowered to the step as it will run (``planner.step.step_costs``; micro-batches
are analysed at the chunk size), the activation plan is solved under the budget, and the
configuration of least total added time wins: the activation plan's added seconds plus
the step's own (micro-batches: the measured forward time of k chunks against one batch,
three times for forward and backward; 8-bit state: the measured step against the 32-bit
one; the step inside backward: none). Configurations whose own added time already
exceeds the best total are not solved. ``budget="min"`` plans for the smallest peak any
configuration reaches.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from fedplan.planner.budget import Budget
from fedplan.planner.capture import ModelCall, capture, input_signature
from fedplan.planner.cost import measure_optimizer_step_temp
from fedplan.planner.errors import BudgetInfeasibleError
from fedplan.planner.optimizers import make_optimizer
from fedplan.planner.plan import Plan
from fedplan.planner.simulate import simulate
from fedplan.planner.solvers import SolverOptions, minimum_peak, solve
from fedplan.planner.step import (
    COMPRESS,
    MICROBATCH,
    RECOMPUTE,
    STATE,
    StepChoice,
    parse_decisions,
    step_choices,
    step_costs,
)
from fedplan.runtime.measure import measure_step
from fedplan.runtime.optim_state import (
    compressed_state_bytes,
    make_quantized_optimizer,
    step_scratch_bytes,
)
from fedplan.runtime.rewrite import PlannedModule
from fedplan.runtime.step import split_batch

from .analysis import Analysis, analyze, default_targets

BATCH_COUPLED = ("aten.batch_norm.default", "aten._native_batch_norm_legit.default",
                 "aten.native_batch_norm.default", "aten.instance_norm.default")


@dataclass(frozen=True)
class _Candidate:
    choice: StepChoice
    analysis: Analysis
    costs: Any
    call: ModelCall
    step_seconds: float   # the step's own added seconds (not the activation plan's)


def batch_coupled(analysis: Analysis) -> bool:
    """Does the model have layers whose output depends on the whole batch (BatchNorm)?"""
    return any(node.target in BATCH_COUPLED for node in analysis.graph.nodes)


def _forward_seconds(analysis: Analysis) -> float:
    return sum(cost.forward_seconds for cost in analysis.costs.nodes)


def _state_step_seconds(model: nn.Module, optimizer: str, repeats: int = 3) -> float:
    """Measured: the 8-bit-state optimizer step less the 32-bit one, on copies."""
    params = [p for p in model.parameters() if p.requires_grad]
    seconds = []
    for quantized in (False, True):
        copies = [nn.Parameter(p.detach().clone()) for p in params]
        for p in copies:
            p.grad = torch.randn_like(p) * 1e-3
        opt = (make_quantized_optimizer(optimizer, copies) if quantized
               else make_optimizer(optimizer, copies))
        opt.step()  # creates the state
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
        seconds.append(statistics.median(times))
    return max(0.0, seconds[1] - seconds[0])


def plan_step(model: nn.Module, example_inputs: Any, targets: Any, *, budget: Budget,
              loss_fn: Callable | None, optimizer: str, solver: str,
              options: SolverOptions, decisions: str | Sequence[str] | None,
              analysis: Analysis | None, repeats: int, verify: bool,
              progress: Callable[[str], None]) -> tuple[Plan, Analysis]:
    """The whole-step plan (see the module docstring); ``analysis`` is of the full batch."""
    say = progress
    allowed = parse_decisions(decisions)
    explicit_microbatch = decisions is not None and MICROBATCH in allowed and (
        not isinstance(decisions, str) or decisions.strip() != "all")
    options = replace(options, compress=COMPRESS in allowed)
    activation_solver = solver if (RECOMPUTE in allowed or COMPRESS in allowed) else "none"
    call = ModelCall.of(example_inputs)
    if analysis is None:
        analysis = analyze(model, call, targets, loss_fn=loss_fn, optimizer=optimizer,
                           repeats=repeats, compress=options.compress, progress=say)
    if targets is None:
        targets = default_targets(call)
    batch = analysis.costs.batch_size
    coupled = batch_coupled(analysis) and not explicit_microbatch
    choices = step_choices(allowed, batch, batch_coupled=coupled)
    keep_all = simulate(analysis.graph, analysis.costs).peak_bytes
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = None
    if STATE in allowed:
        state = (compressed_state_bytes(optimizer, [p.numel() for p in trainable]),
                 step_scratch_bytes(optimizer), _state_step_seconds(model, optimizer))
    full_forward = _forward_seconds(analysis)
    per_byte = None
    if any(choice.optimizer_in_backward for choice in choices) and trainable:
        # one parameter's own step, measured on the largest (the step inside backward
        # runs one parameter at a time)
        largest = max(trainable, key=lambda p: p.numel())
        per_byte = measure_optimizer_step_temp(optimizer, [largest]) / max(
            largest.numel() * largest.element_size(), 1)
    chunks: dict[int, tuple[Analysis, ModelCall]] = {1: (analysis, call)}

    def candidates_for(k: int) -> list[_Candidate]:
        if k not in chunks:
            say(f"analysing one micro-batch of {batch // k}")
            chunk_inputs, chunk_targets, _ = split_batch(_user_inputs(call), targets, k)[0]
            chunk_call = ModelCall.of(chunk_inputs)
            chunks[k] = (analyze(model, chunk_call, chunk_targets, loss_fn=loss_fn,
                                 optimizer=optimizer, repeats=repeats,
                                 compress=options.compress, progress=say), chunk_call)
        chunk_analysis, chunk_call = chunks[k]
        found = []
        for choice in choices:
            if choice.microbatches != k:
                continue
            state_bytes = state_temp = None
            seconds = 0.0
            if choice.state_bits == 8 and state is not None:
                state_bytes, state_temp, state_seconds = state
                seconds += state_seconds
            if k > 1:
                seconds += 3 * max(0.0, k * _forward_seconds(chunk_analysis) - full_forward)
            costs = step_costs(chunk_analysis.costs, choice,
                               full_batch_input_bytes=analysis.costs.input_bytes,
                               state_bytes=state_bytes, state_step_temp_bytes=state_temp,
                               step_temp_per_byte=per_byte)
            found.append(_Candidate(choice, chunk_analysis, costs, chunk_call, seconds))
        return sorted(found, key=lambda c: (c.step_seconds, not c.choice.is_ordinary))

    counts = sorted({choice.microbatches for choice in choices})
    if budget.minimum:
        # every configuration's smallest peak; more micro-batches only shrink the step
        # (at more added time), so the search runs to the largest count allowed
        say("searching the smallest peak of every step configuration")
        lowest = None
        for k in counts:
            for candidate in candidates_for(k):
                if activation_solver == "none":  # no activation decisions: keep-all
                    peak = simulate(candidate.analysis.graph, candidate.costs).peak_bytes
                else:
                    peak, _ = minimum_peak(candidate.analysis.graph, candidate.costs,
                                           options)
                if lowest is None or (peak, candidate.step_seconds) < (
                        lowest[0], lowest[1].step_seconds):
                    lowest = (peak, candidate)
        peak, best = lowest
        floor = best.costs.fixed_bytes + best.costs.grad_bytes
        budget_bytes = peak if activation_solver == "none" else math.ceil(
            (peak + options.safety_bytes - options.safety_fraction * floor)
            / (1 - options.safety_fraction))
        counts = [best.choice.microbatches]
        only = best.choice
    else:
        budget_bytes = budget.resolve(analysis.costs, keep_all)
        only = None

    best_plan, best_total, smallest = None, math.inf, None
    for k in counts:
        for candidate in candidates_for(k):
            if only is not None and candidate.choice != only:
                continue
            if candidate.step_seconds >= best_total:
                continue  # its own added time already loses
            say(f"solving for {candidate.choice.describe()} at {budget_bytes} B")
            try:
                result = solve(candidate.analysis.graph, candidate.costs, budget_bytes,
                               solver=activation_solver, options=options,
                               model_name=type(model).__name__)
            except BudgetInfeasibleError as exc:
                if exc.smallest_bytes is not None and (smallest is None
                                                       or exc.smallest_bytes < smallest[0]):
                    smallest = (exc.smallest_bytes, exc)
                continue
            total = result.predicted_overhead_seconds + candidate.step_seconds
            if total < best_total:
                best_total = total
                best_plan = replace(
                    result, batch_size=batch, keep_all_peak_bytes=keep_all,
                    predicted_overhead_seconds=total,
                    step={} if candidate.choice.is_ordinary else candidate.choice.to_json(),
                    inputs=input_signature(candidate.call),
                    notes=result.notes + (f"step: {candidate.choice.describe()}",))
                best_candidate = candidate
        if best_plan is not None and best_plan.predicted_overhead_seconds <= \
                best_candidate.step_seconds:
            # a plan with nothing recomputed or compressed at this count: more
            # micro-batches would only add time
            break
    if best_plan is None:
        if smallest is None:
            floor = min(c.costs.fixed_bytes + c.costs.grad_bytes
                        for k in counts for c in candidates_for(k))
            raise BudgetInfeasibleError(
                f"budget {budget_bytes} B is below the fixed costs of every step "
                f"configuration the decisions allow (the smallest: {floor} B of parameters, "
                f"buffers, gradients, optimizer state and batch); raise the budget, shrink "
                f"the batch or allow more decisions (--decisions all)")
        raise smallest[1]
    if verify and not (best_plan.step_choice.is_ordinary and not best_plan.recomputed
                       and not best_plan.compressed):
        measured = measure_plan(model, best_plan, best_candidate.call, _user_inputs(call),
                                targets, loss_fn, optimizer)
        note = (f"verified: one planned step measured {measured} B against the budget "
                f"{budget_bytes} B")
        if measured > budget_bytes:
            raise BudgetInfeasibleError(
                f"the plan ({best_plan.step_choice.describe()}) measured {measured} B in a "
                f"real step, above the budget {budget_bytes} B (predicted "
                f"{best_plan.predicted_peak_bytes} B); raise the budget",
                smallest_bytes=measured)
        best_plan = replace(best_plan, notes=best_plan.notes + (note,))
    return best_plan, best_candidate.analysis


def _user_inputs(call: ModelCall) -> Any:
    """The inputs as a model file gives them (a tuple, or a dict of keyword inputs)."""
    if call.kwargs and not call.args:
        return dict(call.kwargs)
    return tuple(call.args)


def planned_optimizer(plan: Plan, optimizer: str, params) -> torch.optim.Optimizer:
    """The optimizer a plan's step runs with: 8-bit state when the plan says so."""
    if plan.step_choice.state_bits == 8:
        return make_quantized_optimizer(optimizer, params)
    return make_optimizer(optimizer, params)


def measure_plan(model: nn.Module, plan: Plan, captured_call: ModelCall, inputs: Any,
                 targets: Any, loss_fn: Callable | None, optimizer: str) -> int:
    """The measured peak of one planned step (on a copy of ``model``)."""
    from .modelfile import default_loss
    shadow = copy.deepcopy(model)
    planned = PlannedModule(shadow, capture(shadow, captured_call), plan)
    step = measure_step(planned, inputs, targets, loss_fn or default_loss,
                        planned_optimizer(plan, optimizer, shadow.parameters()), steps=1)
    return step.peak_bytes
