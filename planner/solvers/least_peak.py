"""The plan of least peak, and the infeasible-budget error that states it.

A search, not a proof: the ILP in min-peak mode (CP-SAT, started from the greedy's least
peak, one worker stopped by deterministic work so the answer repeats on any load), the
greedy's lowest segment plan, then a descent judged by the simulator.
"""

from __future__ import annotations

from dataclasses import replace

from ..costmodel import CostModel
from ..errors import BudgetInfeasibleError
from ..ir import PlanGraph
from ..simulate import simulate
from .base import SolverOptions
from .greedy import greedy_min_peak
from .ilp import solve_min_peak
from .refine import descend_peak


def least_peak_decisions(graph: PlanGraph, costs: CostModel,
                         options: SolverOptions | None = None) -> dict[str, str]:
    """The plan of the smallest simulated peak fedplan finds in its plan space.

    The lower of the ILP in min-peak mode (CP-SAT, started from the greedy's plan) and the
    greedy's lowest segment plan, both measured by the simulator, then lowered by a
    descent over one- and two-unit toggles judged by the simulator (``descend_peak``).
    With ``options.compress`` the plan space includes compression down to
    ``options.min_bits``. A search, not a proof: the true least peak can be lower.
    """
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


#: the least-peak search's deterministic CP-SAT work (``SolverOptions.work_limit``): half
#: the caller's time limit, at least 1 and at most 5 units. A wall-clock limit made the
#: least peak (and the plans and budgets built on it) depend on the machine's load.
MIN_PEAK_WORK = (1.0, 5.0)


def _min_peak_options(options: SolverOptions | None) -> SolverOptions:
    # CP-SAT, whatever the budgeted solve uses: CBC ignored its time limit when minimising
    # the peak (66 s at a 10 s limit on U-Net), and CP-SAT starts from the greedy's least
    # peak (a completed hint), so its answer is never worse than the greedy's
    limit = 20.0 if options is None else options.time_limit_seconds
    low, high = MIN_PEAK_WORK
    work = min(high, max(low, 0.5 * limit))
    base = SolverOptions(time_limit_seconds=60 * work, backend="CP_SAT", work_limit=work)
    if options is None:
        return base
    return replace(base, compress=options.compress, min_bits=options.min_bits,
                   seed=options.seed)


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
        f"as far as fedplan's search finds "
        f"({smallest} B: {parts}); solver {solver!r} found no plan: raise the budget to at "
        f"least {needed} B" + (" (with the safety margin plans keep)" if needed != smallest
                               else "")
        + ", shrink the batch" + (f", or {hint}" if hint else ""),
        smallest_bytes=smallest, breakdown=breakdown)
