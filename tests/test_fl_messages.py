"""FL pieces without a federation: wire format, reply validation, FedAvg, selectors, clock."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from fedplan.fl import clock, messages, selectors
from fedplan.fl.messages import ClientReply, MessageError, TrainInstruction
from fedplan.fl.server import fedavg

WEIGHTS = {"conv.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
           "bn.num_batches_tracked": np.array(3, dtype=np.int64)}


def reply(client_id=1, weights=None, num_samples=10, **kw) -> ClientReply:
    fields = dict(round=0, client_id=client_id, weights=weights or dict(WEIGHTS),
                  num_samples=num_samples, steps=2, loss_sum=4.0, loss_sq_sum=9.0,
                  loss_count=16, measured_peak_bytes=1000, budget_bytes=1200,
                  train_seconds=0.1)
    fields.update(kw)
    return ClientReply(**fields)


def test_wire_round_trip_is_exact_and_pickle_free():
    plan = {"schema_version": 1, "decisions": {"conv": "recompute"}}
    ins = TrainInstruction(round=3, client_id=7, plan=plan, weights=WEIGHTS, epochs=2,
                           batch_size=16, lr=0.05, seed=123, budget_bytes=999)
    wire = messages.to_bytes(*ins.to_message())
    assert wire[:4] == b"FPM1" and b"pickle" not in wire
    back = TrainInstruction.from_message(*messages.from_bytes(wire))
    assert back.plan == plan and back.seed == 123 and back.budget_bytes == 999
    for name, array in WEIGHTS.items():
        assert back.weights[name].dtype == array.dtype
        assert np.array_equal(back.weights[name], array)
    r = ClientReply.from_message(*messages.from_bytes(messages.to_bytes(*reply().to_message())))
    assert r.loss_sq_sum == 9.0 and r.mean_loss == 0.25
    with pytest.raises(MessageError, match="bad magic"):
        messages.from_bytes(b"XXXX" + wire[4:])
    with pytest.raises(MessageError, match="truncated"):
        messages.from_bytes(wire[:-4])
    with pytest.raises(MessageError, match="expected a 'reply' message"):
        ClientReply.from_message(*messages.from_bytes(wire))


def test_validate_reply_names_shapes_finiteness():
    messages.validate_reply(reply(), WEIGHTS, round_index=0, client_id=1)
    nan = dict(WEIGHTS, **{"conv.weight": np.full((2, 3), np.nan, dtype=np.float32)})
    with pytest.raises(MessageError, match=r"'conv.weight' has 6 NaN/Inf"):
        messages.validate_reply(reply(weights=nan), WEIGHTS)
    wrong = dict(WEIGHTS, **{"conv.weight": np.zeros((3, 2), dtype=np.float32)})
    with pytest.raises(MessageError, match=r"expected shape \(2, 3\) float32; found \(3, 2\)"):
        messages.validate_reply(reply(weights=wrong), WEIGHTS)
    missing = {"conv.weight": WEIGHTS["conv.weight"], "extra": np.zeros(1, np.float32)}
    with pytest.raises(MessageError, match="missing bn.num_batches_tracked; unexpected extra"):
        messages.validate_reply(reply(weights=missing), WEIGHTS)
    with pytest.raises(MessageError, match="expected client 2"):
        messages.validate_reply(reply(), WEIGHTS, client_id=2)
    with pytest.raises(MessageError, match="positive sample count"):
        messages.validate_reply(reply(num_samples=0), WEIGHTS)
    with pytest.raises(MessageError, match="loss_sum is inf"):
        messages.validate_reply(reply(loss_sum=math.inf), WEIGHTS)


def test_fedavg_weighted_by_samples():
    a = reply(1, {"conv.weight": np.full((2, 3), 1.0, np.float32),
                  "bn.num_batches_tracked": np.array(5)}, num_samples=30)
    b = reply(2, {"conv.weight": np.full((2, 3), 5.0, np.float32),
                  "bn.num_batches_tracked": np.array(9)}, num_samples=10)
    out = fedavg([a, b], WEIGHTS)
    assert out["conv.weight"].dtype == np.float32
    assert np.array_equal(out["conv.weight"], np.full((2, 3), 2.0, np.float32))  # .75*1+.25*5
    assert int(out["bn.num_batches_tracked"]) == 9
    assert fedavg([], WEIGHTS)["conv.weight"] is WEIGHTS["conv.weight"]


def test_clock():
    assert clock.client_seconds(10, 0.02, 0.25) == pytest.approx(0.8)
    assert clock.round_seconds([0.1, 0.8, 0.3]) == 0.8
    assert clock.round_seconds([0.1, 0.8], deadline=0.5) == 0.5
    assert clock.round_seconds([]) == 0.0
    with pytest.raises(ValueError, match="speed"):
        clock.client_seconds(1, 1.0, 0.0)


# --------------------------------------------------------------------------- selectors

KEEP_ALL = 1000


def candidates() -> list[selectors.Candidate]:
    out = []
    for i in range(10):
        budget = [400, 600, 900, 1000, 1500][i % 5]
        feasible = budget >= 600
        speed = [0.2, 0.3, 0.5, 1.0, 1.0][i % 5]
        # keep-all step 0.1 s at speed 1; a plan below keep-all costs 25 % more
        keep_step = 0.1 / speed
        step = (keep_step * (1.25 if budget < KEEP_ALL else 1.0)) if feasible else math.inf
        out.append(selectors.Candidate(client_id=i, budget_bytes=budget, speed=speed,
                                       num_samples=20 + i, feasible=feasible,
                                       fits_keep_all=budget >= KEEP_ALL, step_seconds=step,
                                       round_seconds=4 * step,
                                       keep_all_step_seconds=keep_step))
    return out


def test_random_and_exclude():
    cands = candidates()
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    r = selectors.make_selector("random", keep_all_bytes=KEEP_ALL)
    assert r.select(0, cands, 4, rng()) == r.select(0, cands, 4, rng())
    assert len(set(r.select(0, cands, 4, rng()))) == 4
    e = selectors.make_selector("exclude", keep_all_bytes=KEEP_ALL)
    picked = e.select(0, cands, 4, rng())
    assert picked == sorted(picked) and set(picked) == {3, 4, 8, 9}  # budget >= keep-all
    with pytest.raises(ValueError, match="exclude, fedhybrid, oort, random"):
        selectors.make_selector("best", keep_all_bytes=KEEP_ALL)


def test_fedhybrid_utilities_and_exploration():
    cands = candidates()
    f = selectors.FedHybridSelector(keep_all_bytes=KEEP_ALL)
    # memory: 0 without a plan, the plan's slowdown below keep-all, 1 at or above it
    assert [f.memory_utility(c) for c in cands[:5]] == pytest.approx([0.0, 0.8, 0.8, 1, 1])
    # compute: keep-all round times 4 * 0.1 / speed = 4/3, 0.8, 0.4, 0.4 s (feasible, twice
    # each); pacer = their median 0.6 s; above it (pacer / t) ** 2
    assert f._pacer(cands) == pytest.approx(0.6)
    assert f.compute_utility(cands[1], cands) == pytest.approx((0.6 / (4 / 3)) ** 2)
    assert f.compute_utility(cands[2], cands) == pytest.approx((0.6 / 0.8) ** 2)
    assert f.compute_utility(cands[3], cands) == 1.0
    assert f.compute_utility(cands[0], cands) == 0.0
    # an unknown keep-all step time charges no plan overhead (old callers)
    legacy = dataclasses.replace(cands[1], keep_all_step_seconds=math.nan)
    assert f.memory_utility(legacy) == 1.0
    # round 0 explores: every slot to unexplored clients, drawn with probability
    # proportional to Mem * C, never an infeasible one; seeded, so repeatable
    first = f.select(0, cands, 4, np.random.default_rng(0))
    assert len(first) == 4 and all(cands[c].feasible for c in first)
    assert first == f.select(0, cands, 4, np.random.default_rng(0))
    draws = [c for seed in range(200)
             for c in f.select(0, cands, 2, np.random.default_rng(seed))]
    # memory-poor, slower clients are explored too, only less often than the fast ones
    assert 0 < draws.count(1) < draws.count(2) < draws.count(3)
    for cid in first:  # the first explored client reports huge losses
        f.observe(0, cid, num_samples=20, loss_sq_sum=(100.0 if cid == first[0] else 1.0)
                  * 16, loss_count=16)
    assert f.stat[first[0]] == pytest.approx(20 * 10.0)
    assert f.stat[first[1]] == pytest.approx(20.0)
    for r in range(1, 40):  # exploration share decays to 0.2: one exploit slot of 2 early
        chosen = f.select(r, cands, 2, np.random.default_rng(r))
        assert all(cands[c].feasible for c in chosen)
    state = f.state_dict()
    g = selectors.FedHybridSelector(keep_all_bytes=KEEP_ALL)
    g.load_state_dict(state)
    assert g.select(40, cands, 3, np.random.default_rng(5)) == f.select(
        40, cands, 3, np.random.default_rng(5))


def test_fedhybrid_prefers_high_loss_memory_poor_client():
    """The data term can outweigh the memory and compute terms: a memory-poor client
    whose samples the model gets wrong is exploited over a rich one it already fits."""
    cands = candidates()
    f = selectors.FedHybridSelector(keep_all_bytes=KEEP_ALL, exploration=0.0,
                                    exploration_min=0.0, ucb_c=0.0)
    for cid in (2, 3):  # 2: budget 900 (plan, Mem 0.8, C 0.5625); 3: keep-all, fast
        f.observe(0, cid, num_samples=20, loss_sq_sum=(9.0 if cid == 2 else 1.0) * 20,
                  loss_count=20)
    assert f.select(1, cands, 1, np.random.default_rng(0)) == [2]  # 60*0.45 > 20*1


def test_oort_may_pick_infeasible_then_learns():
    cands = candidates()
    o = selectors.make_selector("oort", keep_all_bytes=KEEP_ALL)
    picked = o.select(0, cands, 10, np.random.default_rng(0))
    assert set(picked) == set(range(10))  # no memory term: everyone is a candidate
    o.observe_failure(0, 0, "no plan")
    assert o.stat[0] == 0.0 and o.count[0] == 1
    # system utility: pacer is the median round time; slower clients are penalised
    pacer = o._pacer(cands)
    slow = max(cands, key=lambda c: c.round_seconds if c.feasible else 0)
    assert o._system(slow, cands) == pytest.approx((pacer / slow.round_seconds) ** 2)
