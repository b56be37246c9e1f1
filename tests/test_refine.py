"""refine: the simulator-driven local search that makes a fitting plan cheaper."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fedplan.bench.exact import exact_min_recompute
from fedplan.bench.solver_bench import layered_problem
from fedplan.planner import simulate as simulate_module
from fedplan.planner.candidates import plan_space
from fedplan.planner.compression import CompressCost
from fedplan.planner.errors import BadInputError
from fedplan.planner.graphs import RAM_SCALE, SECONDS_PER_CPU, no_recompute_peak
from fedplan.planner.simulate import simulate
from fedplan.planner.solvers import overhead_seconds
from fedplan.planner.solvers.greedy import greedy_decisions
from fedplan.planner.solvers.refine import descend_peak, refine


def budget_of(problem, fraction: float) -> int:
    """The suite's budget: a fraction of the no-recompute peak, in whole cost_ram units."""
    return int(fraction * no_recompute_peak(problem.external)) * RAM_SCALE


def units(costs, decisions) -> float:
    """Added compute in the graph's cost_cpu units (1 unit = 1 ms), rounded like the suite."""
    return round(overhead_seconds(costs, decisions) / SECONDS_PER_CPU, 9)


def recomputing(problem, names) -> dict[str, str]:
    space = plan_space(problem.graph, problem.costs)
    return {name: "recompute" if name in names else "keep" for name in space.candidates}

def count_simulations(monkeypatch) -> list[int]:
    """A list that grows by one per simulator run refine's module makes."""
    calls: list[int] = []
    real = simulate_module.simulate

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr("fedplan.planner.solvers.refine.simulate", counting)
    return calls



# The ILP's plan on layered-12x3-s1 at budget 0.8 (BENCHMARKS.md, exact-reference gap):
# f1-f6, f9 and f10 recomputed, 35 units. Its memory model is an upper bound, so it
# proves 35 optimal although the simulator accepts a 32-unit plan.
ILP_PLAN_12X3_S1 = ("f1", "f2", "f3", "f4", "f5", "f6", "f9", "f10")


def polish(graph, costs, decisions, budget):
    """Give recomputed units back to keep, one at a time, while the simulator accepts it
    (what solve_ilp did before refine): the baseline refine must beat."""
    current = dict(decisions)
    for group in plan_space(graph, costs).groups:
        if all(current.get(name) == "recompute" for name in group):
            trial = {**current, **{name: "keep" for name in group}}
            if simulate(graph, costs, trial).peak_bytes <= budget:
                current = trial
    return current


def test_refine_closes_the_ilp_gap_that_polish_leaves():
    problem = layered_problem(12, 3, 1)
    budget = budget_of(problem, 0.8)
    start = recomputing(problem, ILP_PLAN_12X3_S1)
    assert simulate(problem.graph, problem.costs, start).peak_bytes <= budget
    assert units(problem.costs, start) == 35
    polished = polish(problem.graph, problem.costs, start, budget)
    assert units(problem.costs, polished) == 35  # nothing can be given back alone
    refined = refine(problem.graph, problem.costs, start, budget)
    assert simulate(problem.graph, problem.costs, refined).peak_bytes <= budget
    assert units(problem.costs, refined) == 32
    exact = exact_min_recompute(problem.graph, problem.costs, budget)
    assert exact.status == "optimal"
    assert round(exact.objective / SECONDS_PER_CPU, 9) == 32


# (graph, budget fraction, greedy's cost, exact optimum): polish leaves the greedy's plan
# where it is on every one of these (it only gives back), refine reaches the optimum.
FROM_GREEDY = [((8, 2, 2), 1.0, 18, 11), ((9, 3, 0), 0.9, 53, 32), ((12, 3, 1), 1.0, 12, 7),
               ((12, 3, 2), 0.9, 16, 13)]


@pytest.mark.parametrize("shape,fraction,greedy_cost,optimum", FROM_GREEDY)
def test_refine_from_the_greedy_reaches_the_exact_optimum(shape, fraction, greedy_cost,
                                                          optimum):
    problem = layered_problem(*shape)
    budget = budget_of(problem, fraction)
    start = greedy_decisions(problem.graph, problem.costs, budget)
    assert units(problem.costs, start) == greedy_cost
    polished = polish(problem.graph, problem.costs, start, budget)
    assert units(problem.costs, polished) == greedy_cost
    refined = refine(problem.graph, problem.costs, start, budget)
    assert simulate(problem.graph, problem.costs, refined).peak_bytes <= budget
    assert units(problem.costs, refined) == optimum
    exact = exact_min_recompute(problem.graph, problem.costs, budget)
    assert exact.status == "optimal"
    assert round(exact.objective / SECONDS_PER_CPU, 9) == optimum


@pytest.mark.parametrize("seed", range(6))
def test_refine_never_exceeds_the_budget_nor_costs_more(seed):
    """From the greedy's plan at several budgets: never over budget, never costlier, and
    a plan already at the exact optimum stays at it."""
    problem = layered_problem(9, 3, seed)
    for fraction in (1.0, 0.9, 0.8):
        budget = budget_of(problem, fraction)
        start = greedy_decisions(problem.graph, problem.costs, budget)
        if start is None:
            continue
        refined = refine(problem.graph, problem.costs, start, budget)
        assert simulate(problem.graph, problem.costs, refined).peak_bytes <= budget
        assert units(problem.costs, refined) <= units(problem.costs, start)
        assert set(refined.values()) <= {"keep", "recompute"}


def test_refine_stays_within_its_simulation_cap(monkeypatch):
    problem = layered_problem(12, 3, 1)
    calls = count_simulations(monkeypatch)
    start = recomputing(problem, ILP_PLAN_12X3_S1)
    refined = refine(problem.graph, problem.costs, start, budget_of(problem, 0.8),
                     max_simulations=7)
    assert len(calls) == 7
    assert units(problem.costs, refined) <= 35


def test_refine_rejects_a_plan_over_the_budget():
    problem = layered_problem(12, 3, 1)
    keep_all = recomputing(problem, ())
    with pytest.raises(BadInputError, match="above the budget"):
        refine(problem.graph, problem.costs, keep_all, budget_of(problem, 0.8))
    with pytest.raises(BadInputError, match="max_simulations"):
        refine(problem.graph, problem.costs, keep_all, budget_of(problem, 2.0),
               max_simulations=0)


def test_compression_is_only_given_back_to_keep():
    """A compressed node is set back to keep where the budget allows, else left alone;
    its unit takes part in no other move."""
    problem = layered_problem(12, 3, 1)
    # compressing f10 (14 units saved by its partner) to 8 bits: 2 ms, packed to 1 KiB
    item = CompressCost(node="f10", storage="f10", shape=(14 * 256,),
                        packed_bytes={"8": RAM_SCALE}, pack_seconds={"8": 1e-3},
                        unpack_seconds={"8": 1e-3}, rel_error={"8": 0.0})
    costs = replace(problem.costs, compress=(item,))
    start = recomputing(problem, ILP_PLAN_12X3_S1)
    start["f10"] = "compress:8"
    loose = budget_of(problem, 2.0)  # keep-all fits: everything goes back to keep
    assert refine(problem.graph, costs, start, loose) == recomputing(problem, ())
    budget = simulate(problem.graph, costs, start).peak_bytes
    refined = refine(problem.graph, costs, start, budget)
    assert simulate(problem.graph, costs, refined).peak_bytes <= budget
    assert refined["f10"] in ("compress:8", "keep")
    assert units(costs, refined) <= units(costs, start)


# --------------------------------------------------------------------------- descend_peak

def test_least_peak_on_layered_9x3_s7_against_the_exact_minimum():
    """The exact reference's least peak on this graph is 32,768 B (a plan fits there and
    none one byte lower). The least-peak search on deterministic work (one CP-SAT worker,
    repeatable on any load) stops at 33,792 B, 3.1 % above it, and says so every time; the
    eight-worker wall-clock search it replaced reached 32,768 B here (see the xfail)."""
    from fedplan.planner.solvers import least_peak_decisions, minimum_peak
    problem = layered_problem(9, 3, 7)
    graph, costs = problem.graph, problem.costs
    assert minimum_peak(graph, costs)[0] == 33792
    assert simulate(graph, costs, least_peak_decisions(graph, costs)).peak_bytes == 33792
    assert exact_min_recompute(graph, costs, 32768).status == "optimal"
    assert exact_min_recompute(graph, costs, 32767).status == "infeasible"


@pytest.mark.xfail(strict=True, reason="known miss: the deterministic least-peak search (one "
                   "CP-SAT worker, work limit) stops at 33,792 B here; the exact least peak "
                   "is 32,768 B")
def test_least_peak_reaches_the_exact_minimum_on_layered_9x3_s7():
    from fedplan.planner.solvers import minimum_peak
    problem = layered_problem(9, 3, 7)
    assert minimum_peak(problem.graph, problem.costs)[0] == 32768


@pytest.mark.parametrize("seed", [1, 3, 7])
def test_descend_peak_never_raises_the_peak_and_keeps_compression(seed):
    problem = layered_problem(9, 3, seed)
    item = CompressCost(node="f10", storage="f10", shape=(256,),
                        packed_bytes={"8": RAM_SCALE // 4}, pack_seconds={"8": 1e-3},
                        unpack_seconds={"8": 1e-3}, rel_error={"8": 0.0})
    costs = replace(problem.costs, compress=(item,))
    for start in (recomputing(problem, ()), recomputing(problem, ILP_PLAN_12X3_S1[:4])):
        start["f10"] = "compress:8"
        lowered = descend_peak(problem.graph, costs, start)
        assert lowered["f10"] == "compress:8"
        assert set(lowered) == set(start)
        assert (simulate(problem.graph, costs, lowered).peak_bytes
                <= simulate(problem.graph, costs, start).peak_bytes)


def test_descend_peak_stays_within_its_simulation_cap(monkeypatch):
    problem = layered_problem(9, 3, 7)
    calls = count_simulations(monkeypatch)
    start = recomputing(problem, ())
    descend_peak(problem.graph, problem.costs, start, max_simulations=9)
    assert len(calls) == 9
    with pytest.raises(BadInputError, match="max_simulations"):
        descend_peak(problem.graph, problem.costs, start, max_simulations=0)
