"""Solvers behind one interface, registered by name.

A solver is a function ``(graph, costs, budget_bytes, options) -> SolveResult``: the same
inputs and the same result type for every one. ``solve`` runs one, then holds its answer
against the independent simulator and builds the Plan; a result the simulator says
breaks the budget is a bug and raises ``SolverError``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..candidates import plan_space
from ..compression import compress_seconds, option_of
from ..cost import CostModel
from ..errors import BadInputError, BudgetInfeasibleError, SolverError
from ..ir import PlanGraph
from ..plan import Plan
from ..simulate import simulate


@dataclass(frozen=True, kw_only=True)
class SolverOptions:
    """Knobs shared by the solvers; each ignores what it does not use."""

    time_limit_seconds: float = 30.0
    """Wall-clock limit for an exact solver; the best plan found by then is returned."""
    workers: int = 8
    """Threads for CP-SAT (it needs about 8 on 2 cores to prove optimality) and the
    multi-threaded MIP backends; CBC here is single-threaded."""
    seed: int = 0
    """Random seed passed to the backend, so runs repeat."""
    backend: str = "CBC"
    """OR-Tools backend for ``ilp``: CBC (default), CP_SAT, HIGHS or SCIP. Measured in
    BENCHMARKS.md ("ILP solve time"): CBC's cuts and feasibility pump reach plans within
    0.1-2% of optimal on 1,000-node graphs in a few seconds, where CP-SAT's search was
    still 80% above; on the example models CBC proved optimality as fast or faster. Its
    time limit counts CPU seconds (one thread)."""
    warm_start: bool = True
    """Hint the ILP with the greedy plan."""
    safety_fraction: float = 0.01
    """Plans aim below the budget by this share of (budget - fixed costs), plus
    ``safety_bytes``: room for what checkpointing itself allocates (saved RNG states,
    BatchNorm statistics kept across a replay) that the simulator does not model. A plan
    that recomputes nothing needs no margin."""
    safety_bytes: int = 64 * 1024
    compress: bool = False
    """Let ``ilp`` compress activations (``planner.compression``) as well as recompute
    them. The cost model must carry compression costs (``analyze(compress=True)``)."""
    min_bits: int = 4
    """The lowest (mean) code width ``ilp`` may choose: 8, 4, 3 (channel-wise mixed) or 2."""
    error_weight: float = 1.0
    """Weight of the compression error in the ILP's objective: a compressed tensor adds
    ``error_weight * forward seconds of the model * its relative error`` to the added
    seconds (see ``planner.compression``)."""

    def __post_init__(self):
        if self.min_bits not in (2, 3, 4, 8):
            raise BadInputError(f"expected min_bits of 2, 3, 4 or 8; found {self.min_bits}")
        if self.error_weight < 0:
            raise BadInputError(f"expected error_weight >= 0; found {self.error_weight}")
        if self.time_limit_seconds <= 0:
            raise BadInputError(f"expected a positive time limit; found "
                                f"{self.time_limit_seconds}")
        if self.workers < 1:
            raise BadInputError(f"expected workers >= 1; found {self.workers}")


@dataclass(frozen=True)
class SolveResult:
    decisions: dict[str, str]
    status: str                # optimal | feasible | heuristic | baseline
    objective: float           # added seconds of recomputation (the solver's objective)
    bound: float | None = None
    notes: tuple[str, ...] = field(default=())


Solver = Callable[[PlanGraph, CostModel, int, SolverOptions], SolveResult]
_REGISTRY: dict[str, Solver] = {}
BASELINES = ("none", "all", "sqrt")  # fixed schemes: no safety margin, no adaptation


def register(name: str) -> Callable[[Solver], Solver]:
    def decorate(function: Solver) -> Solver:
        _REGISTRY[name] = function
        return function
    return decorate


def solver_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_solver(name: str) -> Solver:
    _load_builtin()
    if name not in _REGISTRY:
        raise BadInputError(f"unknown solver {name!r}; valid solvers: "
                            f"{', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def _load_builtin() -> None:
    from . import baselines, greedy, ilp  # noqa: F401  (registration on import)


def overhead_seconds(costs: CostModel, decisions: dict[str, str]) -> float:
    """Added seconds: forward work recomputed plus packing and unpacking compressed ones."""
    return sum(costs.node[name].forward_seconds
               for name, decision in decisions.items()
               if decision == "recompute") + compress_seconds(costs, decisions)


def least_peak_decisions(graph: PlanGraph, costs: CostModel,
                         options: SolverOptions | None = None) -> dict[str, str]:
    """The plan of the smallest simulated peak fedplan finds in its plan space.

    The lower of the ILP in min-peak mode (CP-SAT, started from the greedy's plan) and the
    greedy's lowest segment plan, both measured by the simulator, then lowered by a
    descent over one- and two-unit toggles judged by the simulator (``descend_peak``).
    With ``options.compress`` the plan space includes compression down to
    ``options.min_bits``. A search, not a proof: the true least peak can be lower.
    """
    from dataclasses import replace

    from .greedy import greedy_min_peak
    from .ilp import solve_min_peak
    from .refine import descend_peak
    candidates = [greedy_min_peak(graph, costs)]
    searches = [_min_peak_options(options)]
    if searches[0].compress and costs.compress:
        # the space with compression contains the recompute-only one, but its larger ILP
        # may stop at the time limit with a worse plan: search the smaller space too
        searches.append(replace(searches[0], compress=False))
    for search in searches:
        decisions = solve_min_peak(graph, costs, search, hint=candidates[0])
        if decisions:
            candidates.append(decisions)
    lowest = min(candidates, key=lambda d: simulate(graph, costs, d).peak_bytes)
    # the ILP's memory model is an upper bound of the simulator's: a descent judged by
    # the simulator can go lower still
    return descend_peak(graph, costs, lowest)


def minimum_peak(graph: PlanGraph, costs: CostModel, options: SolverOptions | None = None
                 ) -> tuple[int, dict[str, int]]:
    """The smallest peak the plan space reaches (as far as fedplan's search finds), and its
    breakdown."""
    best = simulate(graph, costs, least_peak_decisions(graph, costs, options))
    return best.peak_bytes, best.breakdown


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
            result = function(graph, costs, max(target, floor), options)
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
    last_of_unit = {name: group[-1] for group in space.groups for name in group}
    pack_after = tuple((name, last_of_unit[name]) for name, decision in decisions.items()
                       if option_of(decision) is not None
                       and last_of_unit.get(name, name) != name)
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
        breakdown=timeline.breakdown, notes=result.notes, pack_after=pack_after,
        unpin_after=last_readers(graph, costs, decisions))


def _min_peak_options(options: SolverOptions | None) -> SolverOptions:
    # CP-SAT, whatever the budgeted solve uses: CBC ignored its time limit when minimising
    # the peak (66 s at a 10 s limit on U-Net), and CP-SAT starts from the greedy's least
    # peak (a completed hint), so its answer is never worse than the greedy's
    base = SolverOptions(time_limit_seconds=20, backend="CP_SAT")
    if options is None:
        return base
    from dataclasses import replace
    return replace(base, compress=options.compress, min_bits=options.min_bits,
                   workers=options.workers, seed=options.seed)


def last_readers(graph: PlanGraph, costs: CostModel, decisions: dict[str, str]
                 ) -> tuple[tuple[str, str], ...]:
    """For each compressed node, the last compute node that reads its storage in forward."""
    storage_of = {item.node: item.storage for item in costs.compress}
    wanted = {storage_of[name]: name for name, decision in decisions.items()
              if option_of(decision) is not None and name in storage_of}
    last: dict[str, str] = {}
    for node in graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        for inp in node.inputs:
            for key in costs.node[inp].outputs if inp in costs.node else ():
                if key in wanted:
                    last[wanted[key]] = node.name
    return tuple(sorted(last.items()))


def infeasible(graph: PlanGraph, costs: CostModel, budget_bytes: int, solver: str,
               options: SolverOptions | None = None, *,
               smallest: tuple[int, dict[str, int]] | None = None,
               needed: int | None = None) -> BudgetInfeasibleError:
    """The error for a budget below what the plan space reaches, with the smallest peak.

    ``smallest``: (peak, breakdown) when already known; ``needed``: the budget to advise
    (default: the smallest peak itself).
    """
    smallest, breakdown = smallest or minimum_peak(graph, costs, options)
    needed = smallest if needed is None else needed
    parts = ", ".join(f"{key.replace('_', ' ')} {value} B" for key, value in breakdown.items())
    compressing = options is not None and options.compress and costs.compress
    hint = (f"lower --min-bits (now {options.min_bits})" if compressing and
            options.min_bits > 2 else "allow compression" if not compressing else "")
    return BudgetInfeasibleError(
        f"budget {budget_bytes} B is below the smallest peak this plan space reaches "
        f"({smallest} B: {parts}); solver {solver!r} found no plan: raise the budget to at "
        f"least {needed} B" + (" (with the safety margin plans keep)" if needed != smallest
                               else "")
        + ", shrink the batch" + (f", or {hint}" if hint else ""),
        smallest_bytes=smallest, breakdown=breakdown)


__all__ = ["SolveResult", "SolverOptions", "get_solver", "infeasible", "least_peak_decisions",
           "minimum_peak",
           "overhead_seconds", "register", "solve", "solver_names"]
