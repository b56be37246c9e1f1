"""An exact reference for fedplan's plan space: the cheapest plan the simulator accepts.

The ILP's memory model is an upper bound on what the simulator replays, so its proven
optimum is optimal *for its model*; this reference answers the question the user asks:
over every keep/recompute assignment of the decision units (``planner.candidates``),
which one has the least recompute time and a simulated peak within the budget?

Method: subsets of decision units are enumerated in non-decreasing total recompute cost
(units sorted by cost; from a subset whose largest unit is ``i``, the successors are
"add ``i + 1``" and "swap ``i`` for ``i + 1``", which reaches every subset exactly once,
each after its cheaper predecessor), and each is replayed by the independent simulator;
the first that fits is optimal. No pruning assumes the peak is monotone in the subset
(it is not: a region's inputs are retained). The cost is the number of subsets cheaper
than the optimum, so ``max_evaluations`` caps it and the result then says "unknown".
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass

from fedplan.planner.candidates import plan_space
from fedplan.planner.cost import CostModel
from fedplan.planner.ir import PlanGraph
from fedplan.planner.simulate import simulate


@dataclass(frozen=True)
class ExactResult:
    status: str                     # optimal | infeasible | unknown (evaluation cap hit)
    objective: float | None         # recompute seconds of the optimum
    decisions: dict[str, str] | None
    evaluations: int
    seconds: float
    units: int

    def to_json(self) -> dict:
        return {"status": self.status, "objective": self.objective,
                "evaluations": self.evaluations, "seconds": self.seconds, "units": self.units}


def exact_min_recompute(graph: PlanGraph, costs: CostModel, budget_bytes: int, *,
                        max_evaluations: int = 200_000) -> ExactResult:
    """The least recompute time of any plan whose simulated peak is <= ``budget_bytes``."""
    start = time.perf_counter()
    space = plan_space(graph, costs)
    unit_cost = [sum(costs.node[name].forward_seconds for name in group)
                 for group in space.groups]
    order = sorted(range(len(unit_cost)), key=lambda g: unit_cost[g])
    cost = [unit_cost[g] for g in order]
    evaluations = 0

    def fits(chosen: tuple[int, ...]) -> dict[str, str] | None:
        decisions = space.decisions_from_groups([order[i] for i in chosen])
        return decisions if simulate(graph, costs, decisions).peak_bytes <= budget_bytes else None

    def done(status, objective=None, decisions=None) -> ExactResult:
        return ExactResult(status=status, objective=objective, decisions=decisions,
                           evaluations=evaluations, seconds=time.perf_counter() - start,
                           units=len(cost))

    evaluations += 1
    found = fits(())
    if found is not None:
        return done("optimal", 0.0, found)
    if not cost:
        return done("infeasible")
    heap: list[tuple[float, tuple[int, ...]]] = [(cost[0], (0,))]
    while heap:
        if evaluations >= max_evaluations:
            return done("unknown")
        total, chosen = heapq.heappop(heap)
        evaluations += 1
        found = fits(chosen)
        if found is not None:
            return done("optimal", total, found)
        last = chosen[-1]
        if last + 1 < len(cost):
            heapq.heappush(heap, (total + cost[last + 1], chosen + (last + 1,)))
            heapq.heappush(heap, (total - cost[last] + cost[last + 1],
                                  chosen[:-1] + (last + 1,)))
    return done("infeasible")
