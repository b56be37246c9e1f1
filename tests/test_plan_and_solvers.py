"""Plans as data, the solver registry, and every solver held against the simulator."""

from __future__ import annotations

import itertools
import json
import re

import pytest

import fedplan
from fedplan.planner.candidates import plan_space
from fedplan.planner.plan import SCHEMA_VERSION, Plan
from fedplan.planner.simulate import simulate
from fedplan.planner.solvers import SolverOptions, get_solver, solve, solver_names

from .test_simulator import MiB, chain


def test_registry_lists_valid_names_on_unknown():
    assert {"ilp", "greedy", "none", "all", "sqrt"} <= set(solver_names())
    with pytest.raises(fedplan.BadInputError, match="valid solvers: all, greedy, ilp"):
        get_solver("magic")


def brute_force(graph, costs, target):
    """The cheapest keep/recompute assignment whose simulated peak fits: the exact answer."""
    space = plan_space(graph, costs)
    best = None
    for bits in itertools.product((0, 1), repeat=len(space.groups)):
        chosen = [i for i, bit in enumerate(bits) if bit]
        decisions = space.decisions_from_groups(chosen)
        if simulate(graph, costs, decisions).peak_bytes <= target:
            seconds = sum(costs.node[n].forward_seconds for n in decisions
                          if decisions[n] == "recompute")
            best = seconds if best is None else min(best, seconds)
    return best


@pytest.mark.parametrize("budget_mib", [8, 7, 6])
def test_every_solver_fits_or_raises_on_a_chain(budget_mib):
    graph, costs = chain(8)
    budget = budget_mib * MiB
    for name in ("ilp", "greedy", "all", "sqrt", "none"):
        try:
            plan = solve(graph, costs, budget, solver=name)
        except fedplan.BudgetInfeasibleError:
            continue
        # the independent check: the plan's simulated peak is within the budget
        assert simulate(graph, costs, plan.decision_map).peak_bytes <= budget
        assert plan.predicted_peak_bytes <= budget


def test_ilp_matches_the_exhaustive_optimum_on_a_chain():
    graph, costs = chain(8)
    keep_all = simulate(graph, costs).peak_bytes
    assert keep_all == 10 * MiB
    options = SolverOptions(safety_fraction=0.0, safety_bytes=0)
    for budget in (9 * MiB, 8 * MiB, 7 * MiB):
        plan = solve(graph, costs, budget, solver="ilp", options=options)
        exact = brute_force(graph, costs, budget)
        assert exact is not None
        assert plan.predicted_overhead_seconds == pytest.approx(exact)
        if plan.status == "optimal":
            assert plan.gap == 0.0


def test_infeasible_budget_states_the_smallest_reachable():
    graph, costs = chain(8)
    with pytest.raises(fedplan.BudgetInfeasibleError) as info:
        solve(graph, costs, 3 * MiB, solver="ilp")
    smallest = info.value.smallest_bytes
    assert smallest is not None and smallest > 3 * MiB
    assert str(smallest) in str(info.value)
    assert "budget 3145728 B is below" in str(info.value)  # the user's budget, not the
    # solver's target below it
    # the advised budget (the smallest peak plus the safety margin) is enough, exactly
    advised = int(re.search(r"raise the budget to at least (\d+) B", str(info.value))[1])
    assert advised > smallest
    plan = solve(graph, costs, advised, solver="ilp")
    assert plan.predicted_peak_bytes <= advised
    with pytest.raises(fedplan.BudgetInfeasibleError):
        solve(graph, costs, advised - 2, solver="ilp")


def test_budget_below_fixed_costs_is_rejected():
    graph, costs = chain(4)
    with pytest.raises(fedplan.BudgetInfeasibleError, match="fixed costs"):
        solve(graph, costs, MiB // 2, solver="ilp")


def make_plan(**changes) -> Plan:
    fields = dict(fingerprint="abc", model_name="m", batch_size=4, budget_bytes=10,
                  optimizer="sgd", decisions=(("a", "keep"), ("b", "recompute")),
                  predicted_peak_bytes=9, predicted_overhead_seconds=0.5,
                  keep_all_peak_bytes=12, solver="ilp", status="optimal", objective=0.5,
                  bound=0.5, solve_seconds=0.1, breakdown={"parameters": 3})
    fields.update(changes)
    return Plan(**fields)


def test_plan_round_trips_through_json(tmp_path):
    plan = make_plan()
    path = plan.save(tmp_path / "p.json")
    assert Plan.load(path) == plan
    data = json.loads(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["decisions"] == {"a": "keep", "b": "recompute"}
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # no temporary left behind


@pytest.mark.parametrize("content,needle", [
    ("{not json", "not valid JSON"),
    ('{"schema_version": 1, "fingerprint": "a"', "not valid JSON"),  # truncated
    ('{"schema_version": 99}', "schema version 99"),
    ('{"schema_version": 2, "fingerprint": "a"}', "missing field"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_plan_files_are_clear_errors(tmp_path, content, needle):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(fedplan.FedplanError, match=needle):
        Plan.load(path)


def test_plan_for_another_model_or_batch_is_rejected():
    plan = make_plan()
    with pytest.raises(fedplan.PlanMismatchError, match="fingerprint"):
        plan.check_matches(fingerprint="zzz")
    with pytest.raises(fedplan.PlanMismatchError, match="batch size 4"):
        plan.check_matches(fingerprint="abc", batch_size=8)
    with pytest.raises(fedplan.PlanMismatchError, match="optimizer"):
        plan.check_matches(fingerprint="abc", optimizer="adam")
