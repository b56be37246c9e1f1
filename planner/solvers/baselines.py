"""Baselines users know, each expressed as a plan so the same runtime and simulator apply.

* ``none``: keep everything (PyTorch's default).
* ``all``: checkpoint every stage: the model is cut at its articulation points (after
  which a single activation is live, e.g. between ResNet blocks or between the layers of
  a chain); every node is recomputed except the stage outputs.
* ``sqrt``: Chen et al.'s sqrt(n) segments: the stages are grouped into about sqrt(n)
  consecutive segments; every node is recomputed except the segment outputs.

A baseline ignores the budget when choosing; ``solve`` then checks the budget, and a
baseline that does not fit raises the infeasible error like any solver.
"""

from __future__ import annotations

import math

from ..candidates import plan_space
from ..costmodel import CostModel
from ..errors import BudgetInfeasibleError
from ..ir import PlanGraph
from ..program import program_of
from ..simulate import simulate
from .base import SolveResult, SolverOptions, overhead_seconds, register


def _segment_plan(graph: PlanGraph, costs: CostModel, boundaries: set[str]) -> dict[str, str]:
    space = plan_space(graph, costs)
    recompute = [index for index, group in enumerate(space.groups)
                 if not boundaries.intersection(group)]
    return space.decisions_from_groups(recompute)


def _check(graph, costs, decisions, budget_bytes, name) -> SolveResult:
    peak = simulate(graph, costs, decisions).peak_bytes
    if peak > budget_bytes:
        raise BudgetInfeasibleError(
            f"the {name!r} baseline peaks at {peak} B, above the budget {budget_bytes} B; "
            f"a baseline does not adapt to the budget: raise it or use --solver ilp",
            smallest_bytes=peak, breakdown={})
    return SolveResult(decisions=decisions, status="baseline",
                       objective=overhead_seconds(costs, decisions))


@register("none")
def solve_none(graph: PlanGraph, costs: CostModel, budget_bytes: int,
               options: SolverOptions) -> SolveResult:
    decisions = plan_space(graph, costs).decisions_from_groups([])
    return _check(graph, costs, decisions, budget_bytes, "none")


@register("all")
def solve_all(graph: PlanGraph, costs: CostModel, budget_bytes: int,
              options: SolverOptions) -> SolveResult:
    cuts = set(program_of(graph, costs).articulation_points)
    return _check(graph, costs, _segment_plan(graph, costs, cuts), budget_bytes, "all")


@register("sqrt")
def solve_sqrt(graph: PlanGraph, costs: CostModel, budget_bytes: int,
               options: SolverOptions) -> SolveResult:
    cuts = program_of(graph, costs).articulation_points
    segments = max(1, round(math.sqrt(len(cuts) + 1)))
    step = (len(cuts) + 1) / segments
    chosen = {cuts[min(len(cuts) - 1, int(round(step * k)) - 1)]
              for k in range(1, segments) if cuts}
    return _check(graph, costs, _segment_plan(graph, costs, chosen), budget_bytes, "sqrt")
