"""An exact reference for fedplan's plan space: the cheapest plan the simulator accepts.

The ILP's memory model is an upper bound on what the simulator replays, so its proven
optimum is optimal *for its model*; this reference answers the question the user asks:
over every keep/recompute assignment of the decision units (``planner.candidates``),
which one has the least recompute time and a simulated peak within the budget?

Two methods, both exact; ``max_evaluations`` caps the simulator runs and the result then
says "unknown":

* ``enumerate``: subsets of decision units in non-decreasing total recompute cost (units
  sorted by cost; from a subset whose largest unit is ``i``, the successors are "add
  ``i + 1``" and "swap ``i`` for ``i + 1``", which reaches every subset exactly once, each
  after its cheaper predecessor), each replayed by the simulator; the first that fits is
  optimal. No pruning at all: its cost is the number of subsets cheaper than the
  optimum (2^units to prove a budget infeasible), so it settles about 20 units.
* ``branch`` (default): depth-first over the units in topological order, keep before
  recompute, every complete plan replayed by the simulator. A branch is cut when a
  *lower bound* of the simulated peak of every completion exceeds the budget, or when a
  lower bound of its recompute cost reaches the best plan found. The peak never being
  monotone in the recomputed set (a region retains its inputs), the bound only counts
  bytes the simulator must hold whatever the undecided units do (``_PeakBound``). Both
  methods agree on every graph the enumeration settles (tests/test_bench_graphs.py).
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, replace

from fedplan.planner.candidates import plan_space
from fedplan.planner.cost import CostModel
from fedplan.planner.errors import BadInputError
from fedplan.planner.ir import PlanGraph
from fedplan.planner.program import program_of
from fedplan.planner.simulate import simulate

TINY = 1e-12  # seconds: a plan must be cheaper than the best by more than float rounding


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
                        max_evaluations: int = 200_000, method: str = "branch") -> ExactResult:
    """The least recompute time of any plan whose simulated peak is <= ``budget_bytes``."""
    if method == "branch":
        return _branch_and_bound(graph, costs, budget_bytes, max_evaluations)
    if method != "enumerate":
        raise BadInputError(f"unknown exact method {method!r}; valid: branch, enumerate")
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


class _PeakBound:
    """Lower bounds of the simulated peak of every plan that completes a partial one.

    The simulator's level at the backward step of position ``j`` is at least

    * what every plan has there: the replay of the keep-all plan with nothing saved for
      backward (gradients, parameter gradients, the step's temporaries), plus
    * the activation storages the simulator must hold there: those saved by ``j`` itself
      (kept: held since forward; recomputed: re-made by its region's recomputation);
      those saved by a kept node at a position ``q <= j`` (held until ``q``'s backward);
      those saved by a recomputed ``q <= j`` whose region ends at or after ``j`` (re-made
      when backward enters the region); the inputs of a region that starts at ``s <= j``
      (held until the region's backward is done).

    Only decided positions contribute the last three, so the bound holds for every way
    of deciding the rest; extending an open region only adds to it.
    """

    def __init__(self, graph: PlanGraph, costs: CostModel, space) -> None:
        program = program_of(graph, costs)  # the step's facts, as every solver reads them
        self.order = list(program.order)
        position = program.position
        self.size = dict(program.size)
        self.saved = [tuple(k for k in costs.node[name].saved if k in self.size)
                      for name in self.order]
        # (provider position, storage) of each position's inputs
        inputs: list[list[tuple[int, str]]] = [[] for _ in self.order]
        for key, pairs in program.readers.items():
            for provider, reader in pairs:
                inputs[reader].append((provider, key))
        self.inputs = [tuple(pairs) for pairs in inputs]
        bare = replace(costs, nodes=tuple(replace(cost, saved=()) for cost in costs.nodes))
        self.base: list[int | None] = [None] * len(self.order)
        self.base_forward = 0
        for event in simulate(graph, bare, dict.fromkeys(space.candidates, "keep")).events:
            if event.phase == "backward":
                self.base[position[event.node]] = event.peak_inside
            else:
                self.base_forward = max(self.base_forward, event.peak_inside)
        self.slots = [j for j, level in enumerate(self.base) if level is not None]

    def profile(self, state: list[str | None], frontier: int) -> list[int]:
        """Lower bounds at each backward slot; ``state[i]`` is K, R or None (undecided),
        every position before ``frontier`` decided."""
        top = len(self.order) - 1
        cover: dict[str, list[tuple[int, int]]] = {}

        def hold(key: str, low: int, high: int) -> None:
            cover.setdefault(key, []).append((low, high))

        for q, saved in enumerate(self.saved):
            for key in saved:
                hold(key, q, top if state[q] == "K" else q)
        q = 0
        while q < frontier:
            if state[q] != "R":
                q += 1
                continue
            start = q
            while q + 1 < frontier and state[q + 1] == "R":
                q += 1
            for member in range(start, q + 1):
                for key in self.saved[member]:
                    hold(key, member, q)
                for provider, key in self.inputs[member]:
                    if provider < start:
                        hold(key, start, top)
            q += 1
        change = [0] * (top + 2)
        for key, spans in cover.items():
            spans.sort()
            low, high = spans[0]
            for a, b in spans[1:]:
                if a > high + 1:
                    change[low] += self.size[key]
                    change[high + 1] -= self.size[key]
                    low, high = a, b
                else:
                    high = max(high, b)
            change[low] += self.size[key]
            change[high + 1] -= self.size[key]
        levels, running = [], 0
        for j in range(top + 1):
            running += change[j]
            levels.append(running)
        return [self.base[j] + levels[j] if self.base[j] is not None else 0
                for j in range(top + 1)]


def _branch_and_bound(graph: PlanGraph, costs: CostModel, budget_bytes: int,
                      max_evaluations: int) -> ExactResult:
    start = time.perf_counter()
    space = plan_space(graph, costs)
    bound = _PeakBound(graph, costs, space)
    position = {name: i for i, name in enumerate(bound.order)}
    units = sorted(space.groups, key=lambda group: position[group[0]])
    unit_seconds = [sum(costs.node[name].forward_seconds for name in group)
                    for group in units]
    unit_positions = [sorted(position[name] for name in group) for group in units]
    state: list[str | None] = ["K"] * len(bound.order)
    for positions in unit_positions:
        for i in positions:
            state[i] = None
    evaluations = 0
    best: list = [float("inf"), None]
    capped = False

    def done(status, objective=None, decisions=None) -> ExactResult:
        return ExactResult(status=status, objective=objective, decisions=decisions,
                           evaluations=evaluations, seconds=time.perf_counter() - start,
                           units=len(units))

    def evaluate(chosen: list[int]) -> int:
        nonlocal evaluations
        evaluations += 1
        decisions = {name: "keep" for name in space.candidates}
        for index in chosen:
            for name in units[index]:
                decisions[name] = "recompute"
        return simulate(graph, costs, decisions).peak_bytes

    def extra_cost(frontier: int, remaining: range) -> float | None:
        """A lower bound of the recompute seconds the undecided units must add (None: no
        completion fits). Keeping every undecided unit gives the most held bytes; making
        unit ``u`` recompute instead removes at most what it saves before each slot."""
        trial = list(state)
        for index in remaining:
            for i in unit_positions[index]:
                trial[i] = "K"
        levels = bound.profile(trial, len(trial))
        worst = sorted(bound.slots, key=lambda j: levels[j], reverse=True)[:3]
        need = 0.0
        for j in worst:
            excess = levels[j] - budget_bytes
            if excess <= 0:
                break
            options = []
            for index in remaining:
                freed = sum(bound.size[key] for i in unit_positions[index] if i < j
                            for key in bound.saved[i])
                if freed:
                    options.append((unit_seconds[index] / freed, freed, unit_seconds[index]))
            options.sort()
            seconds = 0.0
            for ratio, freed, _ in options:
                take = min(freed, excess)
                seconds += ratio * take
                excess -= take
                if excess <= 0:
                    break
            if excess > 0:
                return None
            need = max(need, seconds)
        return need

    def search(index: int, chosen: list[int], spent: float) -> None:
        nonlocal capped
        if capped:
            return
        frontier = unit_positions[index][0] if index < len(units) else len(state)
        levels = bound.profile(state, frontier)
        if max(levels[j] for j in bound.slots) > budget_bytes:
            return
        if index == len(units):
            if evaluations >= max_evaluations:
                capped = True
                return
            if evaluate(chosen) <= budget_bytes:
                best[0], best[1] = spent, list(chosen)
            return
        extra = extra_cost(frontier, range(index, len(units)))
        if extra is None or spent + extra >= best[0] - TINY:
            return
        for choice in ("K", "R"):
            cost = spent + (unit_seconds[index] if choice == "R" else 0.0)
            if cost >= best[0] - TINY:
                continue
            for i in unit_positions[index]:
                state[i] = choice
            search(index + 1, chosen + [index] if choice == "R" else chosen, cost)
            for i in unit_positions[index]:
                state[i] = None

    if bound.base_forward > budget_bytes:
        return done("infeasible")
    search(0, [], 0.0)
    if capped:
        return done("unknown")
    if best[1] is None:
        return done("infeasible")
    decisions = {name: "keep" for name in space.candidates}
    for index in best[1]:
        for name in units[index]:
            decisions[name] = "recompute"
    return done("optimal", sum(unit_seconds[i] for i in best[1]), decisions)
