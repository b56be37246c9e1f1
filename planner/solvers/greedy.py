"""``greedy``: a fast heuristic, also the ILP's warm start.

Two families of plans are tried and the cheapest that fits (by the simulator) wins:

1. **segments**: for every segment count ``k`` the model's stages (cut at articulation
   points) are grouped into ``k`` consecutive segments, every node recomputed except the
   segment outputs; this is Chen et al.'s scheme with ``k`` chosen for the budget rather
   than fixed at sqrt(n);
2. **ranking**: decision units ranked by the bytes they stop saving per second of
   recompute; the shortest fitting prefix is found by doubling and bisection.

Then units the budget does not need are given back, most expensive first, while the
plan still fits. The simulator judges every step, so a plan the greedy returns fits.
"""

from __future__ import annotations

from ..candidates import PlanSpace, articulation_points, plan_space
from ..cost import CostModel
from ..ir import PlanGraph
from ..simulate import simulate
from . import SolveResult, SolverOptions, infeasible, overhead_seconds, register

PRUNE_LIMIT = 200  # simulations spent giving back units; enough for the zoo's graphs


def _segments(space: PlanSpace, cuts: list[str], count: int) -> list[int]:
    """Units to recompute when ``count`` segments end at evenly spaced cuts."""
    if count <= 1 or not cuts:
        boundaries: set[str] = set()
    else:
        step = len(cuts) / count
        boundaries = {cuts[min(len(cuts) - 1, int(round(step * k)) - 1)]
                      for k in range(1, count)}
    return [index for index, group in enumerate(space.groups)
            if not boundaries.intersection(group)]


def greedy_decisions(graph: PlanGraph, costs: CostModel, budget_bytes: int
                     ) -> dict[str, str] | None:
    space = plan_space(graph, costs)
    unit_seconds = [sum(costs.node[name].forward_seconds for name in group)
                    for group in space.groups]

    def peak(units) -> int:
        return simulate(graph, costs, space.decisions_from_groups(units)).peak_bytes

    def seconds(units) -> float:
        return sum(unit_seconds[i] for i in units)

    if peak([]) <= budget_bytes:
        return space.decisions_from_groups([])
    fitting: list[list[int]] = []
    # 1. segment plans, one per segment count
    cuts = articulation_points(graph, costs)
    for count in range(1, len(cuts) + 2):
        units = _segments(space, cuts, count)
        if peak(units) <= budget_bytes:
            fitting.append(units)
    # 2. ranking by bytes freed per second, shortest fitting prefix
    def score(index: int) -> float:
        saved = sum(costs.saved_bytes(name) for name in space.groups[index])
        return saved / max(unit_seconds[index], 1e-9)

    ranking = sorted(range(len(space.groups)), key=score, reverse=True)
    high = 1
    while high < len(ranking) and peak(ranking[:high]) > budget_bytes:
        high *= 2
    high = min(high, len(ranking))
    if ranking and peak(ranking[:high]) <= budget_bytes:
        low = high // 2
        while high - low > 1:
            middle = (low + high) // 2
            if peak(ranking[:middle]) <= budget_bytes:
                high = middle
            else:
                low = middle
        fitting.append(list(ranking[:high]))
    if not fitting:
        return None
    chosen = min(fitting, key=seconds)
    # give back units the budget does not need, most expensive first
    for index in sorted(chosen, key=lambda i: -unit_seconds[i])[:PRUNE_LIMIT]:
        trial = [i for i in chosen if i != index]
        if peak(trial) <= budget_bytes:
            chosen = trial
    return space.decisions_from_groups(chosen)


@register("greedy")
def solve_greedy(graph: PlanGraph, costs: CostModel, budget_bytes: int,
                 options: SolverOptions) -> SolveResult:
    decisions = greedy_decisions(graph, costs, budget_bytes)
    if decisions is None:
        raise infeasible(graph, costs, budget_bytes, "greedy")
    return SolveResult(decisions=decisions, status="heuristic",
                       objective=overhead_seconds(costs, decisions))
