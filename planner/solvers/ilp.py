"""``ilp``: the integer program over keep/recompute/compress decisions (OR-Tools).

This module gathers the ILP's constants from the step program (``_facts``: positions,
sizes in KiB, retention reasons, gradient spans, compression items), coarsens the decision
units of very large graphs, and runs the one model (``ilp_model``, its variables and
constraints documented there) on the backend the options name, through a thin adapter
(``ilp_backends``): CBC (default), HiGHS, SCIP or CP-SAT. A warm start from the greedy,
then a local search judged by the simulator, frame the solve.

The result is then checked by the simulator like every solver's; because the model is an
upper bound, the check passes unless the model has a bug.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..candidates import plan_space
from ..costmodel import LOSS, CostModel
from ..errors import SolverError
from ..ir import PlanGraph
from ..packing import allowed_options
from ..program import program_of
from ..simulate import simulate
from .base import NoPlanFound, SolveResult, SolverOptions, overhead_seconds, register
from .greedy import greedy_decisions
from .ilp_model import IlpModel
from .refine import refine

KIB = 1024.0
# Producer-consumer spans longer than this are modelled as crossing a region boundary (the
# consumer's region then saves the value): conservative, and it keeps the model linear in
# size on long skip connections. Such regions would recompute half a network anyway.
REGION_SPAN = 32
# Above this many decision units the ILP ties adjacent units (see coarse_units): tied
# coarse spaces were harder for CP-SAT (no plan in 3 s for 211 tied units of a ViT), and
# CBC reaches plans within 0.5% of its 60 s plan in 5 s on 1,012 units (BENCHMARKS.md),
# so coarsening starts late.
MAX_UNITS = 2000


@dataclass(frozen=True)
class Retention:
    """Why storage ``k`` may be held for backward, in decision units (backend-free).

    ``always``: a saver that is never recomputed holds it; otherwise ``savers`` are the
    units whose keeping holds it, and ``region_inputs`` the (reader unit, span units)
    pairs where a recomputed reader's region must save it unless every unit in ``span``
    is recomputed too (``span`` None: the reader's region always starts after it).
    """

    always: bool = False
    savers: tuple[int, ...] = ()
    region_inputs: tuple[tuple[int, tuple[int, ...] | None], ...] = ()

    @property
    def never(self) -> bool:
        return not self.always and not self.savers and not self.region_inputs


def _retention(facts_order: list[str], unit_of: dict[str, int], savers: list[int],
               readers: list[tuple[int, int]]) -> Retention:
    def unit(i: int) -> int | None:
        return unit_of.get(facts_order[i])

    saver_units = []
    for saver in savers:
        if unit(saver) is None:
            return Retention(always=True)
        saver_units.append(unit(saver))
    region_inputs = []
    for provider, reader in readers:
        if unit(reader) is None:
            continue
        span = [unit(i) for i in range(provider, reader + 1)]
        if len(span) > REGION_SPAN or any(u is None for u in span):
            region_inputs.append((unit(reader), None))
        else:
            region_inputs.append((unit(reader), tuple(span)))
    return Retention(savers=tuple(saver_units), region_inputs=tuple(region_inputs))


@dataclass
class _Facts:
    """Constants read off the graph and cost model, in positions of the compute order."""

    order: list[str]
    position: dict[str, int]
    unit_of: dict[str, int]                  # candidate node -> decision unit
    storages: list[str]                      # activation and internal storages
    size: dict[str, float]                   # KiB
    producer: dict[str, int]
    end_read: dict[str, int]                 # last forward reader (or producer)
    savers: dict[str, list[int]]
    readers: dict[str, list[tuple[int, int]]]  # storage -> (provider position, reader pos)
    free_from: dict[str, int]                # backward: freed no earlier than this position
    forward_extra: list[float]               # new bytes + temporaries at each position
    backward_base: list[float]               # grads live at each backward position
    backward_extra: list[float]              # backward temporaries + accumulation
    produced: list[list[str]]                # storages re-made for backward, by first saver
    retention: dict[str, Retention]          # why each storage may be held for backward
    fixed: float
    region_kib: float                        # held per checkpoint region (its RNG state)
    optimizer_peak: float
    max_forward_temp: float
    compress: list[CompressItem] = field(default_factory=list)


@dataclass(frozen=True)
class CompressItem:
    """A node whose output storage the ILP may compress, with one entry per option."""

    node: str
    key: str
    unit: int | None                  # its decision unit (None: always kept)
    producer: int                     # positions: made at, last read in forward ...
    end_read: int
    last_use: int                     # ... and last saved or read by anyone
    options: tuple[tuple[str, float, float, float], ...]  # (name, packed KiB, us, error)
    readers: tuple[int, ...] = ()     # positions of the nodes that read it in forward


def coarse_units(graph: PlanGraph, costs: CostModel, max_units: int) -> dict[str, int]:
    """Decision units for the ILP: the plan space's, merged when there are too many.

    Above ``max_units`` units, units that save nothing are tied to the unit before them
    (adjacent in topological order), then runs of adjacent units are tied until at most
    ``max_units`` remain. Tying decisions only shrinks the plan space, so the ILP stays
    exact for the space it solves; the result is reported as feasible, not optimal.
    """
    space = plan_space(graph, costs)
    position = {name: i for i, name in enumerate(space.order)}
    units = [list(group) for group in space.groups]
    if len(units) > max_units:
        merged: list[list[str]] = []
        for group in units:
            saves = sum(costs.saved_bytes(name) for name in group)
            if (merged and saves == 0
                    and position[group[0]] == position[merged[-1][-1]] + 1):
                merged[-1].extend(group)
            else:
                merged.append(list(group))
        units = merged
    if len(units) > max_units:
        factor = -(-len(units) // max_units)
        merged = []
        run = 0
        for group in units:
            adjacent = merged and position[group[0]] == position[merged[-1][-1]] + 1
            if adjacent and run < factor:
                merged[-1].extend(group)
                run += 1
            else:
                merged.append(list(group))
                run = 1
        units = merged
    return {name: index for index, group in enumerate(units) for name in group}


def _facts(graph: PlanGraph, costs: CostModel, unit_of: dict[str, int] | None = None,
           options: SolverOptions | None = None) -> _Facts:
    program = program_of(graph, costs)
    space = program.space
    order = list(program.order)
    position = dict(program.position)
    node_cost = costs.node
    inputs_of = program.inputs_of
    sizes = {key: nbytes / KIB for key, nbytes in program.size.items()}
    producer = dict(program.producer)
    end_read = dict(program.end_read)
    readers = {key: list(found) for key, found in program.readers.items()}
    savers = {key: list(found) for key, found in program.savers.items()}
    free_from = dict(program.free_from)

    n = len(order)
    forward_extra = []
    produced = []
    for name in order:
        cost = node_cost[name]
        new = sum(sizes.get(k, 0.0) for k in cost.allocates)
        forward_extra.append(new + cost.temp_bytes / KIB)
        produced.append([])
    # a recomputed storage lives from its region's recomputation until backward passes
    # its first saver: it is counted in the region's running sum from that saver on
    for key in sizes:
        if savers[key]:
            produced[min(savers[key])].append(key)

    # gradients: the grad of u lives from its last consumer's backward to u's own
    requires = {name: node_cost[name].requires_grad for name in order}
    grad_span = program.grad_span
    output_bytes = {name: nbytes / KIB for name, nbytes in program.output_bytes.items()}
    param_size = {key: nbytes / KIB for key, nbytes in costs.params}
    param_last = program.param_last
    backward_base = [0.0] * n
    backward_extra = [0.0] * n
    # Gradient buffers: the grad of u is made by its last consumer c = grad_span[u]; if
    # c's backward returns views of c's own grad (cat, views), u's grad lives in c's
    # buffer, which then stays until u's backward as well. Spans in positions: a buffer
    # is live from the lowest position that still refers to it up to where it was made.
    buffer_of: dict[str, str] = {}
    span: dict[str, list[float]] = {}   # buffer -> [low, high, KiB]
    loss_position = len(order) - 1
    consumers: dict[str, list[int]] = {}
    for name in order:
        if requires[name]:
            for inp in set(inputs_of[name]):
                if inp in grad_span:
                    consumers.setdefault(inp, []).append(position[name])
    for u in sorted(grad_span, key=lambda name: -grad_span[name]):
        maker = grad_span[u]
        maker_name = order[maker]
        if (maker_name != LOSS and node_cost[maker_name].grad_aliases
                and maker_name in buffer_of):
            buffer = buffer_of[maker_name]
            later = sorted((c for c in consumers.get(u, []) if c < maker), reverse=True)
            if node_cost[maker_name].grad_shares and later:
                # the shared grad tensor is replaced by a new one at the next
                # accumulation (out of place), which then lives down to u
                span[buffer][0] = min(span[buffer][0], later[0])
                span[f"{u}:own"] = [position[u], later[0], output_bytes[u]]
                buffer_of[u] = f"{u}:own"
                continue
            span[buffer][0] = min(span[buffer][0], position[u])
        else:
            buffer = u
            span[buffer] = [position[u], maker if maker != loss_position else maker,
                            output_bytes[u]]
        buffer_of[u] = buffer
    for low, high, kib in span.values():
        for i in range(int(low), int(high) + 1):
            backward_base[i] += kib
    for param, last in param_last.items():
        for i in range(0, last + 1):
            backward_base[i] += param_size.get(param, 0.0)
    for i, name in enumerate(order):
        cost = node_cost[name]
        accumulate = 0.0
        for inp in inputs_of[name]:
            if inp in grad_span and grad_span[inp] > i:
                accumulate = max(accumulate, output_bytes[inp])
        for param in cost.params:
            if param_last.get(param, -1) > i:
                accumulate = max(accumulate, param_size.get(param, 0.0))
        backward_extra[i] = accumulate + cost.backward_temp_bytes / KIB
    fixed = costs.fixed_bytes / KIB
    optimizer_peak = fixed + costs.grad_bytes / KIB + costs.optimizer_step_temp_bytes / KIB
    if unit_of is None:
        unit_of = {name: index for index, group in enumerate(space.groups) for name in group}
    max_temp = max((node_cost[name].temp_bytes / KIB for name in unit_of), default=0.0)
    retention = {key: _retention(order, unit_of, savers[key], readers[key]) for key in sizes}
    return _Facts(order, position, unit_of, list(sizes), sizes, producer, end_read, savers,
                  readers, free_from, forward_extra, backward_base, backward_extra,
                  produced, retention, fixed, costs.region_bytes / KIB, optimizer_peak,
                  max_temp, _compress_items(costs, options, unit_of, position, sizes,
                                            producer, end_read, savers, readers, retention))


def _compress_items(costs, options, unit_of, position, sizes, producer, end_read, savers,
                    readers, retention) -> list[CompressItem]:
    if options is None or not options.compress or not costs.compress:
        return []
    allowed = allowed_options(options.min_bits)
    forward_us = sum(node.forward_seconds for node in costs.nodes) * 1e6
    weight = options.error_weight * forward_us
    items = []
    for cost in costs.compress:
        key = cost.storage
        if key not in sizes or cost.node not in position or retention[key].never:
            continue
        uses = savers[key] + [reader for _, reader in readers[key]] + [end_read[key]]
        choices = tuple((name, cost.packed_bytes[name] / KIB,
                         cost.seconds(name) * 1e6 + weight * cost.rel_error[name],
                         cost.rel_error[name])
                        for name in allowed if name in cost.packed_bytes
                        and cost.packed_bytes[name] < costs.storage[key].nbytes)
        if choices:
            items.append(CompressItem(cost.node, key, unit_of.get(cost.node),
                                      producer[key], end_read[key], max(uses), choices,
                                      tuple(sorted({r for _, r in readers[key]}))))
    return items


def _build(facts: _Facts, costs: CostModel, budget_bytes: int | None,
           options: SolverOptions) -> IlpModel:
    return IlpModel(facts, costs, budget_bytes, options)


def solve_min_peak(graph: PlanGraph, costs: CostModel,
                   options: SolverOptions | None = None,
                   hint: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """Decisions that minimise the modelled peak, or None if none was found in time.

    ``hint``: a plan to start from (completed, so the search begins at its peak).
    """
    options = options or SolverOptions(time_limit_seconds=20)
    unit_of = coarse_units(graph, costs, MAX_UNITS)
    model = _build(_facts(graph, costs, unit_of, options), costs, None, options)
    if hint:
        model.hint(hint, complete_seconds=0.1 * (options.work_limit
                                                 or options.time_limit_seconds))
    _, decisions, _, _ = model.solve()
    return decisions or None


@register("ilp")
def solve_ilp(graph: PlanGraph, costs: CostModel, budget_bytes: int,
              options: SolverOptions) -> SolveResult:
    start = time.perf_counter()
    space_units = len(plan_space(graph, costs).groups)
    unit_of = coarse_units(graph, costs, MAX_UNITS)
    units = max(unit_of.values(), default=-1) + 1
    facts = _facts(graph, costs, unit_of, options)
    notes = []
    if facts.optimizer_peak * KIB > budget_bytes:
        raise NoPlanFound("the optimizer step alone exceeds the budget")
    # The time limit holds for the whole call: warm start, build, search and refine. The
    # warm start and the refine run the simulator; each gets a tenth of the limit.
    deadline = start + options.time_limit_seconds
    probe = time.perf_counter()
    simulate(graph, costs)
    simulation = max(time.perf_counter() - probe, 1e-4)
    simulations = min(60, max(int(0.1 * options.time_limit_seconds / simulation), 5))
    warm = (greedy_decisions(graph, costs, budget_bytes, max_simulations=simulations)
            if options.warm_start else None)
    model = _build(facts, costs, budget_bytes, options)
    if warm:
        left = deadline - time.perf_counter()
        completed = model.hint(warm, complete_seconds=max(0.05, 0.1 * left))
        if completed is False:
            notes.append("the greedy warm start does not fit the ILP's conservative memory "
                         "model; CP-SAT searched from a partial hint")
    # leave room for the refine and the caller's check of the plan by the simulator
    reserve = 0.02 * options.time_limit_seconds + (simulations + 3) * simulation
    # CBC's limit counts CPU seconds: on a loaded machine the wall time runs over it, but
    # a plan does not depend on the load (a wall-clock limit would make plans, and the
    # federations that use them, differ from run to run)
    model.set_time_limit(max(0.05, deadline - time.perf_counter() - reserve))
    state, decisions, objective, bound = model.solve()
    coarsened = units < space_units
    if coarsened:
        notes.append(f"plan space coarsened from {space_units} to {units} decision units "
                     f"(above {MAX_UNITS}); optimal within the coarse space only")
    built = time.perf_counter() - start
    if state in ("optimal", "feasible"):
        timed_out = state == "feasible"
        refined = refine(graph, costs, decisions, budget_bytes, max_simulations=simulations)
        if refined != decisions:
            notes.append(f"the simulator showed the ILP's upper-bound memory model too "
                         f"cautious: {sum(refined[n] != decisions[n] for n in refined)} "
                         f"decisions changed by the local search, "
                         f"{overhead_seconds(costs, decisions) * 1e3:.3f} -> "
                         f"{overhead_seconds(costs, refined) * 1e3:.3f} ms")
            decisions = refined
            objective = overhead_seconds(costs, decisions)
            # the refined plan lies outside the conservative model's plan space, so the
            # model's bound (and its proof of optimality) no longer speaks for it
            state, bound = "feasible", None
            notes.append("the plan left the ILP model's plan space: no proven bound")
        if warm and overhead_seconds(costs, warm) < overhead_seconds(costs, decisions):
            # the ILP's memory model is an upper bound; the greedy, judged by the exact
            # simulator, can fit a cheaper plan than the ILP proves optimal for its model
            notes.append(f"the greedy warm start ({overhead_seconds(costs, warm) * 1e3:.3f} "
                         f"ms) beat the ILP's plan "
                         f"({overhead_seconds(costs, decisions) * 1e3:.3f} ms) under the "
                         f"exact simulator; returned the greedy plan")
            # (below the model's optimum, so the model's bound does not speak for it)
            return SolveResult(decisions=warm, status="feasible",
                               objective=overhead_seconds(costs, warm), bound=None,
                               notes=tuple(notes))
        if timed_out:
            notes.append(f"time limit {options.time_limit_seconds:g} s reached")
        if state == "optimal" and coarsened:
            state = "feasible"
        notes.append(f"{options.backend}: {units} units, {built:.2f} s")
        return SolveResult(decisions=decisions, status=state, objective=objective,
                           bound=None if coarsened else bound, notes=tuple(notes))
    if state == "model_invalid":
        raise SolverError("the ILP model is invalid (OR-Tools MODEL_INVALID); this is a bug "
                          "in fedplan, please report it with the model file")
    reason = ("the ILP's conservative memory model has no plan" if state == "infeasible"
              else f"{options.backend} found no plan in {options.time_limit_seconds:g} s")
    if warm:  # infeasible for the conservative model, or no solution in time
        # the warm start was a quick greedy; the full one is better and still fast
        warm = greedy_decisions(graph, costs, budget_bytes) or warm
        warm = refine(graph, costs, warm, budget_bytes, max_simulations=60)
        notes.append(f"{reason}; returned the greedy plan, refined by the simulator")
        return SolveResult(decisions=warm, status="heuristic",
                           objective=overhead_seconds(costs, warm), bound=None,
                           notes=tuple(notes))
    # the greedy found nothing (it also never compresses): solve() starts from the plan of
    # least peak
    raise NoPlanFound(reason)
