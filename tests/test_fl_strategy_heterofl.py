"""The heterofl round policy (fedplan/fl/strategies/heterofl.py) on the real workloads."""

from __future__ import annotations

import pytest

from .test_fl_common import check_deadline, check_faults, check_learns, check_resume

STRATEGY = "heterofl"


@pytest.mark.parametrize("dataset", ["fashion-mnist", "shakespeare"])
def test_learns_within_every_budget(dataset):
    check_learns(dataset, STRATEGY)


def test_faults_are_rejected():
    check_faults("shakespeare", STRATEGY)
    check_deadline("shakespeare", STRATEGY)


def test_resume_gives_the_same_result(tmp_path):
    check_resume("shakespeare", STRATEGY, tmp_path)


def test_nested_slices_are_averaged_over_their_holders():
    import numpy as np

    from fedplan.fl.messages import ClientReply
    from fedplan.fl.policy import fedavg
    from fedplan.fl.strategies.heterofl import slice_to

    full = {"w": np.zeros((4, 2), dtype=np.float32)}
    half = slice_to({"w": np.arange(8, dtype=np.float32).reshape(4, 2)}, {"w": (2, 1)})
    assert half["w"].tolist() == [[0.0], [2.0]]

    def reply(value, shape, n):
        return ClientReply(round=0, client_id=0, weights={"w": np.full(shape, value,
                                                                      np.float32)},
                           num_samples=n, steps=1, loss_sum=0.0, loss_sq_sum=0.0,
                           loss_count=1, measured_peak_bytes=1, budget_bytes=1,
                           train_seconds=0.0)
    merged = fedavg([reply(1.0, (4, 2), 1), reply(4.0, (2, 1), 2)], full)["w"]
    assert merged[0, 0] == 3.0 and merged[1, 0] == 3.0   # (1*1 + 4*2) / 3
    assert merged[0, 1] == 1.0 and merged[3, 1] == 1.0   # only the full-width client


def test_widths_follow_budgets():
    from .test_fl_common import finished

    run = finished("fashion-mnist", STRATEGY)
    policy = run.policy
    budgets = sorted({c.budget_bytes for c in run.clients})
    rates = [policy.rate_for(b)[0] for b in budgets]
    assert rates == sorted(rates) and rates[-1] == 1.0


@pytest.mark.parametrize("masked", [True, False])
def test_masked_loss_leaves_absent_classes_alone(masked):
    """Two label-sorted shards per client (8x8 digits): with the masked loss a client's update
    leaves the output weights of the classes its data does not hold bit-identical to what
    it was sent, and moves those of its own classes; without it, both move (the plain
    cross-entropy pushes absent classes' logits down). Peaks stay within budgets with plans
    made for the masked loss."""
    import numpy as np

    from fedplan.fl import data
    from fedplan.fl.server import Server, SimConfig, build_federation

    if "digits" not in data.available_datasets():
        pytest.skip("scikit-learn (digits) is not installed: pip install scikit-learn")
    config = SimConfig(dataset="digits", num_clients=4, rounds=1, clients_per_round=2,
                       strategy="heterofl", strategy_options={"masked_loss": masked},
                       partition="shards", shards_per_client=2, tiers="0.6,1.2",
                       epochs=1, lr=0.05, seed=0)
    fed = build_federation(config)
    run = Server(fed)
    replies = {}

    def client_fn(instruction):
        reply = run.local_client(instruction)
        replies[instruction.client_id] = (instruction, reply)
        return reply

    run.client_fn = client_fn
    metrics = run.run_round()
    assert metrics["participants"] == 2 and metrics["violations"] == 0
    assert all(0 < peak <= budget for _, peak, budget in metrics["peaks"])
    for cid, (instruction, reply) in replies.items():
        held = set(np.unique(fed.client_data(cid)[1].numpy()).tolist())
        assert len(held) < 10  # some classes are absent
        sent, got = instruction.weights["2.2.weight"], reply.weights["2.2.weight"]
        for c in range(10):
            same = np.array_equal(sent[c], got[c])
            assert same == (masked and c not in held), (cid, c, held)


def test_cli_masked_loss_needs_heterofl(capsys):
    from fedplan.cli import main

    assert main(["fl", "simulate", "--strategy", "profl", "--masked-loss"]) == 2
    assert "applies to --strategy heterofl" in capsys.readouterr().err
