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

from ..candidates import PlanSpace, plan_space
from ..costmodel import CostModel
from ..ir import PlanGraph
from ..program import program_of
from ..simulate import simulate
from .base import NoPlanFound, SolveResult, SolverOptions, overhead_seconds, register

SIMULATIONS = 160  # at most this many simulator runs per call (about 5 s at 1,000 nodes)


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


def greedy_decisions(graph: PlanGraph, costs: CostModel, budget_bytes: int, *,
                     max_simulations: int = SIMULATIONS) -> dict[str, str] | None:
    space = plan_space(graph, costs)
    unit_seconds = [sum(costs.node[name].forward_seconds for name in group)
                    for group in space.groups]

    calls = [0]

    def peak(units) -> int:
        calls[0] += 1
        return simulate(graph, costs, space.decisions_from_groups(units)).peak_bytes

    def seconds(units) -> float:
        return sum(unit_seconds[i] for i in units)

    if peak([]) <= budget_bytes:
        return space.decisions_from_groups([])
    fitting: list[list[int]] = []
    # 1. segment plans, for up to 40 segment counts spread over 1 .. cuts + 1
    cuts = program_of(graph, costs).articulation_points
    for count in _counts(len(cuts) + 1):
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
    spare = max(0, max_simulations - calls[0])
    for index in sorted(chosen, key=lambda i: -unit_seconds[i])[:spare]:
        trial = [i for i in chosen if i != index]
        if peak(trial) <= budget_bytes:
            chosen = trial
    return space.decisions_from_groups(chosen)


def _counts(largest: int, samples: int = 40) -> list[int]:
    if largest <= samples:
        return list(range(1, largest + 1))
    return sorted({max(1, round(1 + (largest - 1) * k / (samples - 1))) for k in range(samples)})


def greedy_min_peak(graph: PlanGraph, costs: CostModel) -> dict[str, str]:
    """The segment plan (over the sampled segment counts) with the lowest simulated peak."""
    space = plan_space(graph, costs)
    cuts = program_of(graph, costs).articulation_points
    plans = [space.decisions_from_groups([])] + [
        space.decisions_from_groups(_segments(space, cuts, count))
        for count in _counts(len(cuts) + 1)]
    return min(plans, key=lambda d: simulate(graph, costs, d).peak_bytes)


@register("greedy")
def solve_greedy(graph: PlanGraph, costs: CostModel, budget_bytes: int,
                 options: SolverOptions) -> SolveResult:
    decisions = greedy_decisions(graph, costs, budget_bytes)
    if decisions is None:
        raise NoPlanFound("the greedy's segment plans do not fit")
    return SolveResult(decisions=decisions, status="heuristic",
                       objective=overhead_seconds(costs, decisions))
