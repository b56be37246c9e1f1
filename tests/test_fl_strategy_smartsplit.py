"""The smartsplit round policy (fedplan/fl/strategies/smartsplit.py) on the real workloads."""

from __future__ import annotations

import pytest

from .test_fl_common import check_deadline, check_faults, check_learns, check_resume

STRATEGY = "smartsplit"


@pytest.mark.parametrize("dataset", ["fashion-mnist", "shakespeare"])
def test_learns_within_every_budget(dataset):
    check_learns(dataset, STRATEGY)


def test_faults_are_rejected():
    check_faults("shakespeare", STRATEGY)
    check_deadline("shakespeare", STRATEGY)


def test_resume_gives_the_same_result(tmp_path):
    check_resume("shakespeare", STRATEGY, tmp_path)


def test_split_clients_cross_the_cut_and_an_edge_failure_ends_their_round():
    """0.4-budget clients cannot hold a plan for the whole decoder: they train the part
    before a cut, the edge the rest; the cut's bytes are on the clock and in bytes_sent.
    With the edge failing in round 2, that round's split clients are rejected with the
    reason, the run goes on, and round 3 trains again."""
    from .test_fl_common import finished, server

    run = finished("shakespeare", STRATEGY)
    policy = run.policy
    low = [c for c in run.clients if c.budget_bytes < run.fed.cache.keep_all_bytes]
    cut, entry = policy.best_cut(low[0].budget_bytes, low[0].speed)
    assert cut < policy.num_blocks and entry.measured_peak_bytes <= low[0].budget_bytes
    assert sum(m["edge_clients"] for m in run.history) > 0
    cut_bytes = policy.cut_facts[cut]["cut_bytes"]
    assert run.result()["bytes_sent"] > 2 * cut_bytes  # weights plus the cut's traffic

    failing = server("shakespeare", STRATEGY, strategy_options={"edge_fail_round": 2})
    failing.run()
    second = failing.history[1]
    edge_failed = [e for e in failing.events if "edge server failed" in e["reason"]]
    assert second["edge_clients"] > 0 and len(edge_failed) == second["edge_clients"]
    assert all(e["round"] == 1 and e["kind"] == "rejected" for e in edge_failed)
    assert failing.history[2]["participants"] > 0
    assert failing.result()["budget_violations"] == 0


def test_cli_edge_options_need_smartsplit(capsys):
    from fedplan.cli import main

    assert main(["fl", "simulate", "--strategy", "profl", "--edge-speed", "4"]) == 2
    assert "applies to --strategy smartsplit" in capsys.readouterr().err
