"""The profl round policy (fedplan/fl/strategies/profl.py) on the real workloads."""

from __future__ import annotations

import dataclasses

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


def test_shrinking_stage_trains_blocks_back_to_front(tmp_path):
    """shrink_rounds=1 on the 3-block digits CNN, 4 rounds: the shrinking stage trains
    block 2 (with the model's head), then block 1 (with its output module), each with the
    blocks before it frozen at their initial parameters; the growing stage then starts at
    block 0 and paces the 2 rounds left (one per block). Only the trained part moves in a
    shrinking round; every measured peak is within its budget; a resume from the middle
    of the shrinking stage ends with the same weights."""
    import numpy as np

    from fedplan.fl.server import Server, SimConfig, build_federation, torch_threads

    config = SimConfig(dataset="digits", num_clients=4, rounds=4, clients_per_round=2,
                       strategy="profl", strategy_options={"shrink_rounds": 1},
                       partition="iid", tiers="0.7,1.2", epochs=1, lr=0.05, seed=0)
    fed = build_federation(config)
    run = Server(fed)
    initial = dict(run.weights)
    snapshots = []
    with torch_threads(config.threads):  # as Server.run
        for _ in range(4):
            run.run_round()
            snapshots.append(dict(run.weights))
    assert [m["stage"] for m in run.history] == [2, 1, 0, 1]
    assert [m["phase"] for m in run.history] == ["shrinking"] * 2 + ["growing"] * 2
    assert [e["reason"] for e in run.events if e["kind"] == "stage"] == [
        "shrinking: block 2 done after 1 rounds", "shrinking: block 1 done after 1 rounds",
        "block 0 done after 1 rounds", "block 1 done after 1 rounds"]

    def moved(before, after):
        return sorted({n.split(".")[1] if n.startswith("model.") else "heads." + n.split(".")[1]
                       for n in before if not np.array_equal(before[n], after[n])})

    assert moved(initial, snapshots[0]) == ["2"]                 # block 2 and the head
    assert moved(snapshots[0], snapshots[1]) == ["1", "heads.1"]  # block 1, its output
    assert moved(snapshots[1], snapshots[2]) == ["0", "heads.0"]  # growing: block 0
    result = run.result()
    assert result["budget_violations"] == 0
    assert all(0 < peak <= budget for m in run.history for _, peak, budget in m["peaks"])

    first = Server(dataclasses.replace(fed, config=dataclasses.replace(config, rounds=1)),
                   out_dir=tmp_path)
    first.run()
    resumed = Server(fed, out_dir=tmp_path)
    resumed.load_state(*Server.read_state(tmp_path))
    resumed.run()
    for name, value in run.weights.items():
        np.testing.assert_array_equal(resumed.weights[name], value, err_msg=name)


def test_shrink_rounds_option_on_the_command_line(capsys):
    from fedplan.cli import main

    assert main(["fl", "simulate", "--strategy", "fedhybrid", "--shrink-rounds", "1"]) == 2
    assert "applies to --strategy profl" in capsys.readouterr().err
    assert main(["fl", "simulate", "--strategy", "profl", "--shrink-rounds", "-1"]) == 2
    assert "--shrink-rounds >= 0" in capsys.readouterr().err
