"""Solvers behind one interface, registered by name.

A solver is a function ``(graph, costs, budget_bytes, options) -> SolveResult``: the same
inputs and the same result type for every one (``base``). ``solve`` runs one, then holds
its answer against the independent simulator and builds the Plan; a result the simulator
says breaks the budget is a bug and raises ``SolverError``. A solver that finds no plan
raises ``NoPlanFound``; ``solve`` then starts from the plan of least peak
(``least_peak``) or reports the budget infeasible with that peak.
"""

from __future__ import annotations

import math
import time

from ..candidates import plan_space
from ..costmodel import CostModel
from ..errors import BudgetInfeasibleError, SolverError
from ..ir import PlanGraph
from ..packing import option_of
from ..plan import Plan
from ..simulate import simulate
from . import baselines, greedy, ilp  # noqa: F401  (each registers its solvers on import)
from .base import (
    BASELINES,
    NoPlanFound,
    SolveResult,
    SolverOptions,
    get_solver,
    overhead_seconds,
    register,
    solver_names,
)
from .least_peak import infeasible, least_peak_decisions, minimum_peak
from .refine import refine as refine_plan  # (the name `refine` stays the submodule)


def solve(graph: PlanGraph, costs: CostModel, budget_bytes: int, *, solver: str = "ilp",
          options: SolverOptions | None = None, model_name: str | None = None) -> Plan:
    """Run ``solver`` and return a Plan whose simulated peak is within ``budget_bytes``."""
    function = get_solver(solver)
    options = options or SolverOptions()
    keep_all = simulate(graph, costs)
    floor = costs.fixed_bytes + costs.grad_bytes
    if budget_bytes < floor:
        raise BudgetInfeasibleError(
            f"budget {budget_bytes} B is below the fixed costs of a step, {floor} B "
            f"(parameters and buffers {costs.param_bytes + costs.buffer_bytes} B, gradients "
            f"{costs.grad_bytes} B, optimizer state {costs.optimizer_state_bytes} B, batch "
            f"{costs.input_bytes} B); no plan can fit: raise the budget or shrink the batch",
            smallest_bytes=None, breakdown={})
    start = time.perf_counter()
    space = plan_space(graph, costs)
    target = budget_bytes
    if solver in BASELINES:  # a fixed scheme: run as users know it, judged as it is
        result = function(graph, costs, budget_bytes, options)
    elif keep_all.peak_bytes <= budget_bytes:  # nothing to plan: keep-all fits exactly
        result = SolveResult(decisions=space.decisions_from_groups([]), status="optimal",
                             objective=0.0, bound=0.0,
                             notes=("the keep-all peak fits the budget",))
    else:
        target = budget_bytes - options.safety_bytes - int(
            options.safety_fraction * max(0, budget_bytes - floor))
        try:
            result = run_solver(graph, costs, max(target, floor), solver, options)
        except BudgetInfeasibleError as exc:
            if exc.smallest_bytes is None:
                raise
            # the budget whose target (less the safety margin) holds the smallest peak
            needed = math.ceil((exc.smallest_bytes + options.safety_bytes
                                - options.safety_fraction * floor)
                               / (1 - options.safety_fraction))
            if exc.smallest_bytes <= budget_bytes:
                raise BudgetInfeasibleError(
                    f"budget {budget_bytes} B leaves no room for the safety margin: the "
                    f"smallest peak this plan space reaches is {exc.smallest_bytes} B, and "
                    f"plans aim {budget_bytes - target} B below the budget for "
                    f"checkpointing's own allocations; raise the budget to at least "
                    f"{needed} B",
                    smallest_bytes=exc.smallest_bytes, breakdown=exc.breakdown) from None
            # the solver saw the target: restate the error for the user's budget
            raise infeasible(graph, costs, budget_bytes, solver, options,
                             smallest=(exc.smallest_bytes, exc.breakdown),
                             needed=needed) from None
    seconds = time.perf_counter() - start
    decisions = {name: result.decisions.get(name, "keep") for name in space.candidates}
    for name, decision in decisions.items():
        if option_of(decision) is not None and not options.compress:
            raise SolverError(f"solver {solver!r} compressed {name!r} although compression "
                              f"is off; this is a bug in fedplan, please report it")
    timeline = simulate(graph, costs, decisions)
    if timeline.peak_bytes > target:
        raise SolverError(
            f"solver {solver!r} returned a plan whose simulated peak {timeline.peak_bytes} B "
            f"exceeds its target {target} B (budget {budget_bytes} B less the safety "
            f"margin); this is a bug in fedplan, please report it")
    return Plan(
        fingerprint=graph.fingerprint, model_name=model_name or graph.name,
        batch_size=costs.batch_size, budget_bytes=int(budget_bytes),
        optimizer=costs.optimizer, decisions=tuple(decisions.items()),
        predicted_peak_bytes=timeline.peak_bytes,
        predicted_overhead_seconds=overhead_seconds(costs, decisions),
        keep_all_peak_bytes=keep_all.peak_bytes, solver=solver, status=result.status,
        objective=result.objective, bound=result.bound, solve_seconds=seconds,
        breakdown=timeline.breakdown, notes=result.notes)


def run_solver(graph: PlanGraph, costs: CostModel, budget_bytes: int, solver: str,
               options: SolverOptions) -> SolveResult:
    """Run a registered solver at exactly ``budget_bytes`` (no safety margin, no check).

    A solver that finds nothing (``NoPlanFound``): the ILP falls back on the plan of least
    peak, refined to the budget; any other raises the infeasible error.
    """
    try:
        return get_solver(solver)(graph, costs, budget_bytes, options)
    except NoPlanFound as found_nothing:
        if solver != "ilp":  # the least-peak search is the ILP's own fallback
            raise infeasible(graph, costs, budget_bytes, solver, options) from None
        # the least-peak search runs on CP-SAT's deterministic work, half the time limit
        # (least_peak.MIN_PEAK_WORK): held to the wall time the solver left, its plans
        # changed with the machine's load, and a federation's plans (Flower against the
        # embedded run) stopped matching
        return _from_least_peak(graph, costs, budget_bytes, solver, options,
                                str(found_nothing))


def _from_least_peak(graph: PlanGraph, costs: CostModel, budget_bytes: int, solver: str,
                     options: SolverOptions, reason: str) -> SolveResult:
    """No plan from the solver: start from the plan of least peak and give back what the
    budget does not need, judged by the simulator. Near the smallest budget this is how
    a plan is found at all: the ILP's conservative model can be infeasible there, and
    CBC found no plan in 30 s on ViT-tiny at that budget."""
    lowest = least_peak_decisions(graph, costs, options)
    timeline = simulate(graph, costs, lowest)
    if timeline.peak_bytes <= budget_bytes:
        lowest = refine_plan(graph, costs, lowest, budget_bytes, max_simulations=200)
        return SolveResult(decisions=lowest, status="heuristic",
                           objective=overhead_seconds(costs, lowest), bound=None,
                           notes=(f"{reason}; returned the least-peak plan, refined by the "
                                  f"simulator",))
    # below the least peak fedplan's search finds: say so, with that peak
    raise infeasible(graph, costs, budget_bytes, solver, options,
                     smallest=(timeline.peak_bytes, timeline.breakdown))


__all__ = ["NoPlanFound", "run_solver", "SolveResult", "SolverOptions", "get_solver", "infeasible",
           "least_peak_decisions", "minimum_peak", "overhead_seconds", "register", "solve",
           "solver_names"]
