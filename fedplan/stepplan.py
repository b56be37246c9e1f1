"""Whole-step planning: the step-level decisions chosen together with the activation plan.

For every step configuration the allowed decisions permit (``planner.step.step_choices``:
micro-batch counts, the optimizer step inside backward, 8-bit optimizer state), the cost
model is lowered to the step as it will run (``planner.step.step_costs``; micro-batches
are analysed at the chunk size), the activation plan is solved under the budget, and the
configuration of least total added time wins: the activation plan's added seconds plus
the step's own (micro-batches: the measured forward and backward of k chunks against
one batch; 8-bit state: the measured step against the 32-bit one; the step inside
backward: none). Configurations whose own added time already
exceeds the best total, or whose fixed costs alone break the budget, are not solved.

``budget="min"`` (``_plan_minimum``) plans for the smallest peak any configuration
reaches: a repeatable least-peak search per configuration (the largest micro-batch count
first, the rest pruned by a lower bound), and the plan is that least-peak plan itself, so
it always fits the budget it reports. Micro-batches are left out for models with
batch-coupled layers (BatchNorm) under the default decisions only: naming ``microbatch``,
or ``"all"``, which names every decision, numerics-changing ones included, allows them.
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
from fedplan.planner.candidates import plan_space
from fedplan.planner.capture import ModelCall, capture, input_signature
from fedplan.planner.cost import measure_optimizer_step_temp
from fedplan.planner.costmodel import CostModel
from fedplan.planner.errors import BudgetInfeasibleError, SolverError
from fedplan.planner.optimizers import make_optimizer
from fedplan.planner.plan import Plan
from fedplan.planner.simulate import simulate
from fedplan.planner.solvers import SolverOptions, solve
from fedplan.planner.solvers.base import overhead_seconds
from fedplan.planner.solvers.greedy import greedy_min_peak
from fedplan.planner.solvers.ilp import solve_min_peak
from fedplan.planner.solvers.refine import descend_peak, refine
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
from fedplan.runtime.step import call_module, split_batch

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


def _step_seconds(model: nn.Module, inputs: Any, targets: Any, loss_fn: Callable | None,
                  repeats: int = 3) -> float:
    """Measured: forward and backward of ``inputs`` on a copy of ``model`` (median of
    ``repeats`` after one warm-up; the copy keeps BatchNorm's statistics of the user's
    model as they are)."""
    from .modelfile import default_loss
    shadow = copy.deepcopy(model)
    loss_fn = loss_fn or default_loss
    times = []
    for index in range(repeats + 1):
        start = time.perf_counter()
        loss_fn(call_module(shadow, inputs), targets).backward()
        if index:
            times.append(time.perf_counter() - start)
        for parameter in shadow.parameters():
            parameter.grad = None
    return statistics.median(times)


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
    # micro-batches change what BatchNorm computes: the default set leaves them out for
    # such models; naming them (or "all", which names every decision, compression
    # included) allows them
    explicit_microbatch = decisions is not None and MICROBATCH in allowed
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
    step_seconds: dict[int, float] = {}

    def microbatch_seconds(k: int) -> float:
        """The added seconds of k micro-batches: k chunks' forward and backward, measured,
        less the whole batch's. (Summing the cost model's per-node forward times of one
        chunk, timed once each, put 64 one-sample chunks of two_input at 38 s where they
        take 0.23 s.)"""
        for count in (1, k):
            if count not in step_seconds:
                chunk_inputs, chunk_targets, _ = split_batch(_user_inputs(call), targets,
                                                             count)[0]
                step_seconds[count] = _step_seconds(model, chunk_inputs, chunk_targets,
                                                    loss_fn)
        return max(0.0, k * step_seconds[k] - step_seconds[1])
    per_byte = None
    if any(choice.optimizer_in_backward for choice in choices) and trainable:
        # one parameter's own step, measured on the largest (the step inside backward
        # runs one parameter at a time)
        largest = max(trainable, key=lambda p: p.numel())
        per_byte = measure_optimizer_step_temp(optimizer, [largest]) / max(
            largest.numel() * largest.element_size(), 1)
    chunks: dict[int, tuple[Analysis, ModelCall] | None] = {1: (analysis, call)}

    def lowered(chunk_costs, choice: StepChoice):
        state_bytes = state_temp = None
        if choice.state_bits == 8 and state is not None:
            state_bytes, state_temp, _ = state
        return step_costs(chunk_costs, choice,
                          full_batch_input_bytes=analysis.costs.input_bytes,
                          state_bytes=state_bytes, state_step_temp_bytes=state_temp,
                          step_temp_per_byte=per_byte)

    def candidates_for(k: int) -> list[_Candidate]:
        if k not in chunks:
            say(f"analysing one micro-batch of {batch // k}")
            chunk_inputs, chunk_targets, _ = split_batch(_user_inputs(call), targets, k)[0]
            chunk_call = ModelCall.of(chunk_inputs)
            try:
                chunks[k] = (analyze(model, chunk_call, chunk_targets, loss_fn=loss_fn,
                                     optimizer=optimizer, repeats=repeats,
                                     compress=options.compress, progress=say), chunk_call)
            except Exception as exc:  # noqa: BLE001  (a layer refusing the chunk's shape)
                # e.g. BatchNorm1d in training mode refuses one sample per channel: this
                # count cannot run, the others still can
                say(f"a micro-batch of {batch // k} cannot run: {type(exc).__name__}: {exc}")
                chunks[k] = None
        if chunks[k] is None:
            return []
        chunk_analysis, chunk_call = chunks[k]
        found = []
        for choice in choices:
            if choice.microbatches != k:
                continue
            seconds = 0.0
            if choice.state_bits == 8 and state is not None:
                seconds += state[2]
            if k > 1:
                seconds += microbatch_seconds(k)
            found.append(_Candidate(choice, chunk_analysis, lowered(chunk_analysis.costs,
                                                                    choice),
                                    chunk_call, seconds))
        return sorted(found, key=lambda c: (c.step_seconds, not c.choice.is_ordinary))

    if budget.minimum:
        best_plan, best_candidate, budget_bytes = _plan_minimum(
            model, analysis, choices, candidates_for, lowered, keep_all=keep_all,
            activation_decisions=activation_solver != "none", options=options, say=say)
    else:
        budget_bytes = budget.resolve(analysis.costs, keep_all)
        best_plan, best_candidate = _plan_budget(
            model, choices, candidates_for, budget_bytes, keep_all=keep_all,
            activation_solver=activation_solver, options=options, say=say)
    best_plan = replace(best_plan, batch_size=batch,
                        inputs=input_signature(best_candidate.call))
    checks = 0
    while verify and (budget.minimum or not (best_plan.step_choice.is_ordinary
                                             and not best_plan.recomputed
                                             and not best_plan.compressed)):
        say("measuring one planned step")
        measured = measure_plan(model, best_plan, best_candidate.call, _user_inputs(call),
                                targets, loss_fn, optimizer)
        checks += 1
        note = (f"verified: one planned step measured {measured} B against the budget "
                f"{budget_bytes} B")
        if measured > budget_bytes and not budget.minimum:
            if checks < 3:
                # the simulator under-counts some plans (a region of one BatchNorm or
                # ReLU on a full-resolution activation: BENCHMARKS, whole-step plans):
                # solve again with the measured excess as extra margin, as plan() does
                excess = measured - best_plan.predicted_peak_bytes
                say(f"the planned step measured {measured} B, over the budget: solving "
                    f"again with {excess} B more margin")
                options = replace(options, safety_bytes=options.safety_bytes + excess)
                try:
                    best_plan, best_candidate = _plan_budget(
                        model, choices, candidates_for, budget_bytes, keep_all=keep_all,
                        activation_solver=activation_solver, options=options, say=say)
                except BudgetInfeasibleError:
                    pass
                else:
                    best_plan = replace(best_plan, batch_size=batch,
                                        inputs=input_signature(best_candidate.call))
                    continue
            raise BudgetInfeasibleError(
                f"the plan ({best_plan.step_choice.describe()}) measured {measured} B "
                f"in a real step, above the budget {budget_bytes} B (predicted "
                f"{best_plan.predicted_peak_bytes} B); raise the budget",
                smallest_bytes=measured)
        if measured > budget_bytes:
            # budget="min" chooses its own budget: the least peak is what a real step of
            # the least-peak plan measures, so the budget becomes that measurement
            note = (f"verified: one planned step measured {measured} B, above the "
                    f"predicted {best_plan.predicted_peak_bytes} B; the minimum budget is "
                    f"the measured peak")
            best_plan = replace(best_plan, budget_bytes=measured)
        best_plan = replace(best_plan, notes=best_plan.notes + (note,))
        break
    return best_plan, best_candidate.analysis


def _plan_budget(model: nn.Module, choices: list[StepChoice],
                 candidates_for: Callable[[int], list[_Candidate]], budget_bytes: int, *,
                 keep_all: int, activation_solver: str, options: SolverOptions,
                 say: Callable[[str], None]) -> tuple[Plan, _Candidate]:
    """The configuration of least total added time whose activation plan fits."""
    counts = sorted({choice.microbatches for choice in choices})
    best_plan, best_candidate, best_total, smallest = None, None, math.inf, None
    for k in counts:
        if best_plan is not None and best_plan.predicted_overhead_seconds <= \
                best_candidate.step_seconds:
            # a plan with nothing recomputed or compressed at a smaller count: more
            # micro-batches would only add time
            break
        for candidate in candidates_for(k):
            if candidate.step_seconds >= best_total:
                continue  # its own added time already loses
            if candidate.costs.fixed_bytes + candidate.costs.grad_bytes > budget_bytes:
                continue  # its fixed costs alone break the budget
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
                best_plan = _with_step(result, candidate, keep_all, total)
                best_candidate = candidate
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
    return best_plan, best_candidate


def _with_step(result: Plan, candidate: _Candidate, keep_all: int, total: float) -> Plan:
    return replace(
        result, keep_all_peak_bytes=keep_all, predicted_overhead_seconds=total,
        step={} if candidate.choice.is_ordinary else candidate.choice.to_json(),
        notes=result.notes + (f"step: {candidate.choice.describe()}",))


def lower_bound(costs: CostModel) -> int:
    """No plan of ``costs`` (any keep/recompute/compress decisions) peaks below this.

    What every plan holds throughout (parameters, buffers, optimizer state, the batch,
    and the gradients a later micro-batch accumulates into, which ``step_costs`` moves
    into the buffers) plus the larger of: the biggest single node's working set (forward:
    what it allocates and its temporaries; backward: its temporaries), and, for a step
    run at the end, every parameter's gradient and the step's temporaries.
    """
    storage = costs.storage
    forward = max((sum(storage[key].nbytes for key in cost.allocates
                       if key in storage and storage[key].kind != "input") + cost.temp_bytes
                   for cost in costs.nodes), default=0)
    backward = max((cost.backward_temp_bytes for cost in costs.nodes if cost.requires_grad),
                   default=0)
    step = costs.grad_bytes + costs.optimizer_step_temp_bytes
    return costs.fixed_bytes + max(forward, backward, step)


def _plan_minimum(model: nn.Module, analysis: Analysis, choices: list[StepChoice],
                  candidates_for: Callable[[int], list[_Candidate]],
                  lowered: Callable[[CostModel, StepChoice], CostModel], *, keep_all: int,
                  activation_decisions: bool, options: SolverOptions,
                  say: Callable[[str], None]) -> tuple[Plan, _Candidate, int]:
    """The plan of the smallest peak over every step configuration; its budget.

    Micro-batch counts: only the largest that runs (1 and the largest divisor of the
    batch allowed): gradients are held alike for every count above 1, and a smaller
    chunk never holds more activation bytes or temporaries, so the largest count's least
    peak is the least over the counts above 1. Configurations are searched in order of
    promise (the largest count, then the rest by their lower bound) and one whose lower
    bound (``lower_bound``: fixed costs plus the largest working set of one node) is not
    below the best peak found is skipped. Each search is repeatable
    (``least_peak_plan``: deterministic CP-SAT limits and a simulator-judged descent);
    configurations that differ only in the optimizer state's precision share one graph,
    so the second starts from the first's plan and descends.

    The plan is the least-peak plan itself, with what its budget does not need given
    back (the simulator-driven refine); the budget is its simulated peak plus the safety
    margin every plan keeps. ``plan_step`` then measures it (``verify``): a step measured
    above that budget raises the budget to the measurement.
    """
    counts = sorted({choice.microbatches for choice in choices}, reverse=True)
    pending: list[tuple[int, StepChoice]] = []
    for k in counts[:-1]:  # the largest count that runs, then 1
        if candidates_for(k):
            pending += [(k, c) for c in choices if c.microbatches == k]
            break
    pending += [(1, c) for c in choices if c.microbatches == 1]
    full_bound = {c: lower_bound(lowered(analysis.costs, c)) for _, c in pending}
    # the largest count first (smallest activations), then by the full-batch lower bound
    pending.sort(key=lambda item: (item[0] == 1, full_bound[item[1]]))
    best = None  # (peak, step seconds, candidate, decisions)
    searched: dict[tuple[int, bool], dict[str, str]] = {}
    for k, choice in pending:
        candidate = next(c for c in candidates_for(k) if c.choice == choice)
        bound = lower_bound(candidate.costs)
        if best is not None and bound >= best[0]:
            say(f"skipping {choice.describe()}: no plan of it goes below {bound} B")
            continue
        graph, costs = candidate.analysis.graph, candidate.costs
        sibling = searched.get((k, choice.optimizer_in_backward))
        if not activation_decisions:
            decisions = {}
        elif sibling is not None:
            # the same graph, with other optimizer-state bytes only: start from the
            # sibling's least-peak plan and let the simulator-judged descent adjust it
            say(f"adjusting the least-peak plan for {choice.describe()}")
            decisions = descend_peak(graph, costs, sibling)
        else:
            say(f"searching the smallest peak for {choice.describe()}")
            decisions = least_peak_plan(graph, costs, options)
            searched[(k, choice.optimizer_in_backward)] = decisions
        peak = simulate(graph, costs, decisions).peak_bytes
        if best is None or (peak, candidate.step_seconds) < (best[0], best[1]):
            best = (peak, candidate.step_seconds, candidate, decisions)
    peak, _, candidate, decisions = best
    graph, costs = candidate.analysis.graph, candidate.costs
    space = plan_space(graph, costs)
    decisions = {name: decisions.get(name, "keep") for name in space.candidates}
    planned = any(decision != "keep" for decision in decisions.values())
    floor = costs.fixed_bytes + costs.grad_bytes
    # the margin every plan keeps, even one that only keeps: the keep-all prediction can
    # be a few bytes low (8 B on a plain MLP), and the minimum budget must hold
    budget_bytes = math.ceil((peak + options.safety_bytes - options.safety_fraction * floor)
                             / (1 - options.safety_fraction))
    target = budget_bytes - options.safety_bytes - int(
        options.safety_fraction * max(0, budget_bytes - floor))
    if planned:
        # give back recomputation and compression the budget does not need
        decisions = refine(graph, costs, decisions, max(target, peak), max_simulations=200)
    plan = plan_from_decisions(graph, costs, decisions, budget_bytes,
                               model_name=type(model).__name__,
                               notes=(f"budget min: the least peak found over "
                                      f"{len(pending)} step configurations",))
    return (_with_step(plan, candidate, keep_all,
                       plan.predicted_overhead_seconds + candidate.step_seconds),
            candidate, budget_bytes)


#: deterministic work limit (CP-SAT's own units, about a second each of one core) of each
#: least-peak search: a wall-clock limit made the least peak, and so the minimum budget,
#: depend on the machine's load (the same model gave 44.2 and 46.4 MB within minutes)
MIN_PEAK_WORK = 5.0


def least_peak_plan(graph, costs: CostModel, options: SolverOptions) -> dict[str, str]:
    """The plan of least simulated peak the search finds, the same on every run.

    The greedy's lowest segment plan, then CP-SAT in min-peak mode started from it, one
    worker and a deterministic work limit (``MIN_PEAK_WORK``), over the recompute-only
    space and, with compression allowed, over the space with compression (larger: the
    search may stop above the smaller space's answer), then a descent judged by the
    simulator (``descend_peak``).
    """
    start = greedy_min_peak(graph, costs)
    found = [start]
    spaces = [False] + ([True] if options.compress and costs.compress else [])
    for compress in spaces:
        search = replace(options, compress=compress, backend="CP_SAT", workers=1,
                         time_limit_seconds=60 * MIN_PEAK_WORK)
        decisions = _deterministic_min_peak(graph, costs, search, start)
        if decisions:
            found.append(decisions)
    lowest = min(found, key=lambda d: simulate(graph, costs, d).peak_bytes)
    return descend_peak(graph, costs, lowest)


def _deterministic_min_peak(graph, costs: CostModel, options: SolverOptions,
                            hint: dict[str, str]) -> dict[str, str] | None:
    """``solve_min_peak`` on CP-SAT's deterministic work (``SolverOptions.work_limit``: one
    worker, stopped by work units, not the clock), so its answer repeats on any load."""
    return solve_min_peak(graph, costs, replace(options, work_limit=MIN_PEAK_WORK),
                          hint=hint)


def plan_from_decisions(graph, costs: CostModel, decisions: dict[str, str],
                        budget_bytes: int, *, model_name: str,
                        notes: tuple[str, ...] = ()) -> Plan:
    """A Plan of given decisions (as ``solve`` builds one), checked by the simulator."""
    space = plan_space(graph, costs)
    decisions = {name: decisions.get(name, "keep") for name in space.candidates}
    timeline = simulate(graph, costs, decisions)
    if timeline.peak_bytes > budget_bytes:
        raise SolverError(
            f"the least-peak plan's simulated peak {timeline.peak_bytes} B exceeds its own "
            f"budget {budget_bytes} B; this is a bug in fedplan, please report it")
    return Plan(
        fingerprint=graph.fingerprint, model_name=model_name, batch_size=costs.batch_size,
        budget_bytes=int(budget_bytes), optimizer=costs.optimizer,
        decisions=tuple(decisions.items()), predicted_peak_bytes=timeline.peak_bytes,
        predicted_overhead_seconds=overhead_seconds(costs, decisions),
        keep_all_peak_bytes=simulate(graph, costs).peak_bytes, solver="least-peak",
        status="heuristic", objective=overhead_seconds(costs, decisions), bound=None,
        solve_seconds=0.0, breakdown=timeline.breakdown, notes=notes)


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
