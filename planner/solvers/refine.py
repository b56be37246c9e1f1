"""A local search that makes a fitting plan cheaper, judged by the exact simulator.

The ILP's memory model is an upper bound of the simulator's, so its optimum can miss
cheaper plans the simulator accepts: on ``layered-12x3-s1`` at budget 0.8 it recomputes
``f9`` and ``f10`` (11 ms) where recomputing ``f0`` and ``f17`` (8 ms) also fits, because
recomputing ``f0`` merges two checkpoint regions and drops a region input the model
counts. Only giving decisions back (the polish step it replaces) cannot find that: it
needs a swap.

``refine`` runs rounds of two steps over the decision units (``planner.candidates``; a
unit changes as a whole):

1. **probe**: toggle single units (recomputed ones back to keep, kept ones to recompute)
   and record how each changes the memory profile (the simulator's level at every
   forward, backward and optimizer step). A recomputed unit that can be given back is
   given back at once (what the old polish did). Small plans probe every unit; large ones
   the recomputed units that cost the most per byte they free and the kept units that
   free the most bytes per second;
2. **moves**: give back one or two recomputed units and recompute up to two cheaper
   kept ones (drop, swap, pair moves). The profile of a move is estimated as the base
   profile plus the probed changes of its units; moves estimated to fit are simulated
   largest saving first, then a few estimated just over the budget. The first that fits
   for the simulator and costs less is taken, and the next round starts from it.

Every plan kept was replayed by the simulator within the budget, and each step lowers
the cost (``overhead_seconds``), so the result never exceeds the budget nor costs more
than the input. Compression decisions (``compress:<option>``) are only ever given back
to ``keep``; a unit holding one takes part in no other move.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np

from ..candidates import plan_space
from ..costmodel import LOSS, CostModel
from ..errors import BadInputError
from ..ir import PlanGraph
from ..simulate import COMPUTE_OPS, simulate
from .base import overhead_seconds

# At most this many simulator runs per call. A simulation of a 1,000-node layered graph
# took 28 ms (1,120 nodes, 2 loaded cores): 120 runs bound refine to about 3.5 s there.
SIMULATIONS = 120
# Units probed per round: every unit when there are at most this many, else this many
# split between recomputed and kept units (at least a third of the simulations are left
# for the moves).
PROBES = 60
# Moves estimated over the budget that are still simulated per round (the estimate is
# linear in the probed changes; the peak is not).
LONG_SHOTS = 40
TINY = 1e-12  # seconds: a cheaper plan must save more than float rounding
# Simulator runs of one peak descent (``descend_peak``), the first on the input plan.
DESCENT_SIMULATIONS = 200


def refine(graph: PlanGraph, costs: CostModel, decisions: Mapping[str, str],
           budget_bytes: int, *, max_simulations: int = SIMULATIONS) -> dict[str, str]:
    """A plan no costlier than ``decisions`` whose simulated peak is within the budget.

    ``decisions`` must fit (``simulate(...).peak_bytes <= budget_bytes``); at most
    ``max_simulations`` simulator runs are made, the first of them on the input.
    """
    if max_simulations < 1:
        raise BadInputError(f"expected max_simulations >= 1; found {max_simulations}")
    search = _Search(graph, costs, decisions, budget_bytes, max_simulations)
    if search.base_peak > budget_bytes:
        raise BadInputError(
            f"refine needs a plan within the budget: the simulated peak of the given plan is "
            f"{search.base_peak} B, above the budget of {budget_bytes} B; solve first and "
            f"refine the solver's plan")
    search.give_back_compression()
    while search.round():
        pass
    refined = search.decisions()
    if overhead_seconds(costs, refined) > overhead_seconds(costs, search.start_plan) + TINY:
        # cannot happen (every step saves time); kept so a bug costs a missed saving only
        return search.start_plan
    return refined


class _Units:
    """A plan as decision units: the ``free`` ones (all members keep, or all recompute)
    change as a whole; every other decision stays as in ``start``."""

    def __init__(self, graph, costs, decisions):
        self.space = plan_space(graph, costs)
        self.start = {name: decisions.get(name, "keep") for name in self.space.candidates}
        self.start.update((name, value) for name, value in decisions.items()
                          if name not in self.start)
        groups = self.space.groups
        self.free = [i for i, g in enumerate(groups)
                     if len({self.start[n] for n in g}) == 1
                     and self.start[g[0]] in ("keep", "recompute")]

    def recomputed_at_start(self) -> set[int]:
        return {i for i in self.free if self.start[self.space.groups[i][0]] == "recompute"}

    def plan(self, recomputed) -> dict[str, str]:
        plan = dict(self.start)
        for index in self.free:
            value = "recompute" if index in recomputed else "keep"
            for name in self.space.groups[index]:
                plan[name] = value
        return plan


class _Search(_Units):
    """The current plan as a set of recomputed units, its profile and the probe results."""

    def __init__(self, graph, costs, decisions, budget_bytes, max_simulations):
        super().__init__(graph, costs, decisions)
        self.graph, self.costs, self.budget = graph, costs, budget_bytes
        self.left = max_simulations
        self.start_plan = dict(self.start)
        groups = self.space.groups
        self.unit_seconds = [sum(costs.node[n].forward_seconds for n in g) for g in groups]
        self.unit_bytes = [sum(costs.saved_bytes(n) for n in g) for g in groups]
        self.recomputed = self.recomputed_at_start()
        self.slot = self._slots()
        self.width = max(self.slot.values()) + 1
        self.seen: set[frozenset[int]] = set()  # plans simulated once already
        self.base_profile = self._profile(self.plan(self.recomputed))
        self.base_peak = int(self.base_profile.max())
        self.seen.add(frozenset(self.recomputed))
        self.delta: dict[int, np.ndarray] = {}  # unit -> profile change when toggled
        self.moves_taken = 0

    # ---- plans and profiles ----------------------------------------------------------
    def decisions(self) -> dict[str, str]:
        return self.plan(self.recomputed)

    def _slots(self) -> dict[tuple[str, str], int]:
        # forward step i, backward step i (a region's recomputation shares the slot of
        # the backward step that triggers it), then the optimizer step
        order = [n.name for n in self.graph.nodes if n.op in COMPUTE_OPS] + [LOSS]
        slot = {("forward", name): i for i, name in enumerate(order)}
        slot.update((("backward", name), len(order) + i) for i, name in enumerate(order))
        slot.update((("recompute", name), len(order) + i) for i, name in enumerate(order))
        slot[("optimizer", "step")] = 2 * len(order)
        return slot

    def _profile(self, plan) -> np.ndarray:
        self.left -= 1
        profile = np.zeros(self.width)
        for event in simulate(self.graph, self.costs, plan).events:
            index = self.slot[(event.phase, event.node)]
            profile[index] = max(profile[index], event.peak_inside)
        return profile

    def _accept(self, recomputed: set[int], profile: np.ndarray) -> None:
        for index in self.recomputed.symmetric_difference(recomputed):
            if index in self.delta:  # toggling it back undoes the move
                self.delta[index] = -self.delta[index]
        self.recomputed = recomputed
        self.base_profile = profile
        self.base_peak = int(profile.max())
        self.moves_taken += 1

    def _try(self, recomputed: set[int]) -> np.ndarray | None:
        """Simulate a plan (once per plan); its profile if it fits, else None."""
        key = frozenset(recomputed)
        if key in self.seen or self.left <= 0:
            return None
        profile = self._profile(self.plan(recomputed))
        self.seen.add(key)
        return profile if profile.max() <= self.budget else None

    # ---- steps -----------------------------------------------------------------------
    def give_back_compression(self) -> None:
        """Set compressed nodes back to keep, most expensive first, while the plan fits."""
        by_node = {item.node: item for item in self.costs.compress}
        compressed = [name for name, value in self.start.items()
                      if value.startswith("compress:") and name in by_node]
        compressed.sort(key=lambda n: -by_node[n].seconds(self.start[n].split(":", 1)[1]))
        for name in compressed:
            if self.left <= 0:
                return
            trial = dict(self.start)
            trial[name] = "keep"
            before = self.start
            self.start = trial
            profile = self._profile(self.plan(self.recomputed))
            if profile.max() <= self.budget:
                self.base_profile, self.base_peak = profile, int(profile.max())
                self.seen = {frozenset(self.recomputed)}
            else:
                self.start = before

    def round(self) -> bool:
        """Probe, then take the first move that fits and saves; False when nothing did."""
        if self.left <= 0:
            return False
        taken = self.moves_taken
        self.probe()
        for removed, added in self.ranked_moves():
            if self.left <= 0:
                break
            trial = (self.recomputed - set(removed)) | set(added)
            profile = self._try(trial)
            if profile is not None:
                self._accept(trial, profile)
                break
        return self.moves_taken > taken

    def probe(self) -> None:
        kept = [i for i in self.free if i not in self.recomputed]
        recomputed = sorted(self.recomputed, key=lambda i: -self.unit_seconds[i])
        share = min(PROBES, max(1, self.left * 2 // 3))
        if len(self.free) > share:
            # expensive per byte freed first among the recomputed, the most bytes freed
            # per second first among the kept (cheap units that relieve memory)
            recomputed.sort(key=lambda i: -self.unit_seconds[i] / (self.unit_bytes[i] + 1))
            kept.sort(key=lambda i: -self.unit_bytes[i] / max(self.unit_seconds[i], TINY))
            half = share // 2
            take_recomputed = min(len(recomputed), max(half, share - len(kept)))
            recomputed = recomputed[:take_recomputed]
            kept = kept[:share - take_recomputed]
            recomputed.sort(key=lambda i: -self.unit_seconds[i])
        self.delta = {}
        for index in recomputed:  # give back: the probe is itself a move
            if self.left <= 0:
                return
            if index not in self.recomputed:
                continue
            trial = self.recomputed - {index}
            profile = self._profile(self.plan(trial))
            self.seen.add(frozenset(trial))
            if profile.max() <= self.budget:
                self._accept(trial, profile)
                self.delta.pop(index, None)
                continue
            self.delta[index] = profile - self.base_profile
        for index in kept:
            if self.left <= 0:
                return
            trial = self.recomputed | {index}
            profile = self._profile(self.plan(trial))
            self.seen.add(frozenset(trial))
            self.delta[index] = profile - self.base_profile

    def ranked_moves(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Moves among the probed units that save time, the likeliest to fit first."""
        removable = [i for i in self.delta if i in self.recomputed]
        addable = [i for i in self.delta if i not in self.recomputed]
        if not removable:
            return []
        seconds = self.unit_seconds
        outs = [(a,) for a in removable] + list(itertools.combinations(removable, 2))
        ins = [()] + [(b,) for b in addable] + list(itertools.combinations(addable, 2))
        out_change = np.array([sum(self.delta[i] for i in o) for o in outs])
        in_change = np.array([sum((self.delta[i] for i in b),
                                  np.zeros_like(self.base_profile)) for b in ins])
        out_saving = np.array([sum(seconds[i] for i in o) for o in outs])
        in_cost = np.array([sum(seconds[i] for i in b) for b in ins])
        fitting, over = [], []
        for row, removed in enumerate(outs):
            gain = out_saving[row] - in_cost
            useful = np.nonzero(gain > TINY)[0]
            if len(removed) == 1:
                useful = useful[useful > 0]  # a lone give-back was probed already
            if not len(useful):
                continue
            peaks = (self.base_profile + out_change[row] + in_change[useful]).max(axis=1)
            for column, peak in zip(useful, peaks):
                entry = (gain[column], peak, removed, ins[column])
                (fitting if peak <= self.budget else over).append(entry)
        fitting.sort(key=lambda e: (-e[0], e[1]))
        over.sort(key=lambda e: (e[1], -e[0]))
        return [(e[2], e[3]) for e in fitting] + [(e[2], e[3]) for e in over[:LONG_SHOTS]]


def descend_peak(graph: PlanGraph, costs: CostModel, decisions: Mapping[str, str], *,
                 max_simulations: int = DESCENT_SIMULATIONS) -> dict[str, str]:
    """A plan whose simulated peak is at most that of ``decisions``, found by descent.

    First improvement over toggles (keep to recompute or back) of one decision unit, then
    of two: the units in order, then pairs of the units whose own toggle left the lowest
    peak first; a toggle is taken when the simulator says the peak falls, and the search
    starts again from the new plan. Units holding a compression decision are left as
    they are. At most ``max_simulations`` simulator runs. The least-peak search (ILP in
    min-peak mode, greedy) ends with it: on ``layered-9x3-s7`` it lowers their 33,792 B
    to 32,768 B, the exact reference's least peak, in 262 runs.
    """
    if max_simulations < 1:
        raise BadInputError(f"expected max_simulations >= 1; found {max_simulations}")
    units = _Units(graph, costs, decisions)
    free, plan = units.free, units.plan
    peaks: dict[frozenset[int], int] = {}

    def peak(recomputed: frozenset[int]) -> int | None:
        if recomputed not in peaks:
            if len(peaks) >= max_simulations:
                return None
            peaks[recomputed] = simulate(graph, costs, plan(recomputed)).peak_bytes
        return peaks[recomputed]

    current = frozenset(units.recomputed_at_start())
    best = peak(current)
    while True:
        single: dict[int, int] = {}
        better = None
        for index in free:
            trial = current ^ {index}
            value = peak(trial)
            if value is None:
                return plan(current)
            single[index] = value
            if value < best:
                better = trial, value
                break
        if better is None:
            ranked = sorted(free, key=lambda i: (single[i], i))
            pairs = sorted(itertools.combinations(range(len(ranked)), 2),
                           key=lambda ab: (ab[0] + ab[1], ab))
            for a, b in pairs:
                trial = current ^ {ranked[a], ranked[b]}
                value = peak(trial)
                if value is None:
                    return plan(current)
                if value < best:
                    better = trial, value
                    break
        if better is None:
            return plan(current)
        current, best = better
