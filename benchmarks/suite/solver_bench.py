"""Framework-free solver runs: one graph file (``fedplan bench-solver``) and size sweeps.

Every figure reported here is in the graph's own units (``cost_cpu``, ``cost_ram``), so
it compares with what Moccasin reports on the same file and budget fraction:
``objective`` is the total compute cost of the schedule (every node once plus what is
recomputed), ``bound`` the solver's lower bound on it, ``budget`` the fraction times the
no-recompute peak over node outputs in topological order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fedplan.planner import solvers
from fedplan.planner.errors import BadInputError, BudgetInfeasibleError
from fedplan.planner.graphs import (
    RAM_SCALE,
    SECONDS_PER_CPU,
    GraphProblem,
    no_recompute_peak,
    parse_node_link,
    random_layered_graph,
    to_problem,
)
from fedplan.planner.simulate import simulate

from .exact import exact_min_recompute

# Framework-free graphs run no real step: no checkpointing allocations to leave room for.
NO_MARGIN = {"safety_fraction": 0.0, "safety_bytes": 0}


@dataclass(frozen=True)
class SolverRun:
    graph: str
    nodes: int
    forward_nodes: int
    solver: str
    budget_fraction: float
    budget: int                  # cost_ram units
    no_recompute_peak: int       # cost_ram units
    keep_all_peak: float         # fedplan's simulated keep-all peak, cost_ram units
    status: str
    objective: float | None      # total compute cost, cost_cpu units
    recompute_cost: float | None
    bound: float | None
    peak: float | None           # simulated peak of the plan, cost_ram units
    solve_seconds: float
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        data = dict(self.__dict__)
        data["notes"] = list(self.notes)
        return data


def check_fraction(fraction: float) -> float:
    if not (0 < fraction <= 1.5):
        raise BadInputError(f"expected --budget-fraction in (0, 1.5]; found {fraction}; "
                            f"use e.g. 0.8 for 80% of the no-recompute peak")
    return fraction


def run_solver(problem: GraphProblem, fraction: float, *, solver: str = "ilp",
               time_limit: float = 30.0, workers: int = 8, backend: str = "CBC") -> SolverRun:
    """Solve ``problem`` at ``fraction`` of its no-recompute peak with a registered solver.

    The solver function is called directly at the budget (no safety margin: nothing runs
    for real), and its plan is replayed by the simulator, which must accept it.
    """
    check_fraction(fraction)
    external = problem.external
    peak_units = no_recompute_peak(external)
    budget_units = int(fraction * peak_units)
    options = solvers.SolverOptions(time_limit_seconds=time_limit, workers=workers,
                                    backend=backend, **NO_MARGIN)
    keep_all = simulate(problem.graph, problem.costs).peak_bytes / RAM_SCALE
    base = problem.base_cost
    common = dict(graph=external.name, nodes=len(external),
                  forward_nodes=len(external.forward_names), solver=solver,
                  budget_fraction=fraction, budget=budget_units,
                  no_recompute_peak=peak_units, keep_all_peak=keep_all)
    start = time.perf_counter()
    try:
        result = solvers.run_solver(problem.graph, problem.costs, budget_units * RAM_SCALE, solver,
                            options)
    except BudgetInfeasibleError as exc:
        smallest = (f"; the smallest peak fedplan's plan space reaches is "
                    f"{exc.smallest_bytes / RAM_SCALE:g}" if exc.smallest_bytes else "")
        return SolverRun(**common, status="infeasible", objective=None, recompute_cost=None,
                         bound=None, peak=None, solve_seconds=time.perf_counter() - start,
                         notes=(f"no plan within budget {budget_units}{smallest}",))
    seconds = time.perf_counter() - start
    peak = simulate(problem.graph, problem.costs, result.decisions).peak_bytes / RAM_SCALE
    # sums of float seconds: round back to the graph's units (9 decimals) before comparing
    recompute = round(result.objective / SECONDS_PER_CPU, 9)
    bound = None if result.bound is None else round(base + result.bound / SECONDS_PER_CPU, 9)
    return SolverRun(**common, status=result.status, objective=base + recompute,
                     recompute_cost=recompute, bound=bound, peak=peak,
                     solve_seconds=seconds, notes=tuple(result.notes))


@dataclass(frozen=True)
class GapRun:
    graph: str
    nodes: int
    budget_fraction: float
    ilp_status: str
    ilp_recompute: float | None    # cost_cpu units
    exact_status: str
    exact_recompute: float | None
    gap: float | None              # (ilp - exact) / ilp_total_cost, None when unknown
    exact_evaluations: int
    exact_seconds: float

    def to_json(self) -> dict:
        return dict(self.__dict__)


def gap_to_exact(problem: GraphProblem, fraction: float, *, max_evaluations: int = 20_000,
                 time_limit: float = 30.0) -> GapRun:
    """The ILP against the exhaustive reference at one budget (both without margin).

    The gap is relative to the ILP's *total* compute cost (every node once plus the
    recomputation), the objective Moccasin and Checkmate report.
    """
    run = run_solver(problem, fraction, solver="ilp", time_limit=time_limit)
    budget_bytes = run.budget * RAM_SCALE
    exact = exact_min_recompute(problem.graph, problem.costs, budget_bytes,
                                max_evaluations=max_evaluations)
    exact_recompute = (None if exact.objective is None
                       else round(exact.objective / SECONDS_PER_CPU, 9))
    gap = None
    if exact.status == "optimal" and run.recompute_cost is not None:
        gap = (run.recompute_cost - exact_recompute) / (problem.base_cost + run.recompute_cost)
    elif exact.status == "infeasible" and run.status == "infeasible":
        gap = 0.0
    return GapRun(graph=problem.external.name, nodes=len(problem.external),
                  budget_fraction=fraction, ilp_status=run.status,
                  ilp_recompute=run.recompute_cost, exact_status=exact.status,
                  exact_recompute=exact_recompute, gap=gap,
                  exact_evaluations=exact.evaluations, exact_seconds=exact.seconds)


def layered_problem(layers: int, width: int, seed: int) -> GraphProblem:
    return to_problem(parse_node_link(random_layered_graph(layers, width, seed=seed)))
