"""The profl round policy (fedplan/fl/strategies/profl.py) on the real workloads."""

from __future__ import annotations

import pytest

from .test_fl_common import check_deadline, check_faults, check_learns, check_resume

STRATEGY = "profl"


@pytest.mark.parametrize("dataset", ["fashion-mnist", "shakespeare"])
def test_learns_within_every_budget(dataset):
    check_learns(dataset, STRATEGY)


def test_faults_are_rejected():
    check_faults("shakespeare", STRATEGY)
    check_deadline("shakespeare", STRATEGY)


def test_resume_gives_the_same_result(tmp_path):
    check_resume("shakespeare", STRATEGY, tmp_path)


def test_effective_movement():
    import numpy as np

    from fedplan.fl.strategies.profl import effective_movement

    steady = [np.full(4, float(i)) for i in range(4)]           # one direction: 1
    assert effective_movement(steady) == 1.0
    back_and_forth = [np.zeros(4), np.ones(4), np.zeros(4)]     # returns: 0
    assert effective_movement(back_and_forth) == 0.0


def test_low_budget_clients_train_a_block_within_their_budget():
    """Clients at 0.4 of the full model's keep-all peak train the current block (peaks
    measured for the block, prefix included), below the whole model's keep-all peak."""
    from .test_fl_common import finished

    run = finished("fashion-mnist", STRATEGY)
    keep_all = run.fed.cache.keep_all_bytes
    low = [(cid, peak, budget) for m in run.history for cid, peak, budget in m["peaks"]
           if budget < keep_all]
    assert low and all(peak <= budget < keep_all for _, peak, budget in low)
    assert [m["stage"] for m in run.history] == [0, 1, 2]  # 3 rounds, 3 blocks
