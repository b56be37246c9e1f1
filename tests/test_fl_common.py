"""Shared set-up of the strategy tests (tests/test_fl_strategy_*.py): one federation per
workload, built once per test process, and a helper that runs a strategy on it.

Federations: 20 clients, 5 per round, the packaged default models, budgets at 0.4 and
1.2 of the full model's keep-all peak (0.4 is below what most strategies' parts need
without a plan), few samples per client so a round takes seconds.
"""

from __future__ import annotations

import dataclasses
import functools

from fedplan.fl.server import Server, SimConfig, build_federation

SETTINGS = {
    "fashion-mnist": dict(epochs=2, max_client_samples=128, tiers="0.4,1.2", lr=0.1),
    "shakespeare": dict(epochs=1, max_client_samples=48, tiers="0.4,1.2", lr=0.1),
}
CHANCE = {"fashion-mnist": 0.1, "shakespeare": 1 / 96}


@functools.cache
def federation(dataset: str):
    config = SimConfig(dataset=dataset, num_clients=20, rounds=3, clients_per_round=5,
                       seed=0, plan_time_limit=3.0, **SETTINGS[dataset])
    return build_federation(config)


def server(dataset: str, strategy: str, *, out_dir=None, client_fn=None, **changes):
    fed = federation(dataset)
    fed = dataclasses.replace(fed, config=dataclasses.replace(fed.config, strategy=strategy,
                                                              **changes))
    return Server(fed, out_dir=out_dir, client_fn=client_fn)


def peaks_within_budgets(result) -> list[tuple[int, int, int]]:
    """Every (client, measured peak, budget) of the run, asserting each within budget."""
    out = [tuple(p) for m in result["history"] for p in m["peaks"]]
    assert out, "nobody trained"
    for cid, peak, budget in out:
        assert 0 < peak <= budget, (cid, peak, budget)
    return out


@functools.cache
def finished(dataset: str, strategy: str) -> Server:
    """The strategy run for 3 rounds on the workload (shared by a file's tests)."""
    run = server(dataset, strategy)
    run.run()
    return run


def check_learns(dataset: str, strategy: str) -> dict:
    """3 rounds, 20 clients: above chance, zero budget violations, every measured peak
    within its client's budget, the result's summary keys present."""
    result = finished(dataset, strategy).result()
    for key in ("final_accuracy", "budget_violations", "clients_trained", "bytes_sent"):
        assert key in result, key
    assert result["final_accuracy"] > 2 * CHANCE[dataset], result["final_accuracy"]
    assert result["budget_violations"] == 0 and result["clients_trained"] >= 5
    assert result["bytes_sent"] > 0 and result["strategy"] == strategy
    peaks_within_budgets(result)
    return result


def check_faults(dataset: str, strategy: str) -> None:
    """A client that raises, one that replies NaN and one with a wrongly shaped tensor are
    rejected with their reasons and logged; the round goes on with the rest."""
    import numpy as np


    run = server(dataset, strategy, rounds=1)
    chosen = run.policy.select(0, run.clients)
    bad = dict(zip(chosen[:3], ("raise", "nan", "shape")))

    def client_fn(instruction):
        reply = run.local_client(instruction)
        fault = bad.get(instruction.client_id)
        if fault == "raise":
            raise RuntimeError("device crashed")
        if fault == "nan":
            return dataclasses.replace(reply, weights={
                k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v
                for k, v in reply.weights.items()})
        if fault == "shape":
            name = next(iter(reply.weights))
            return dataclasses.replace(reply, weights={**reply.weights,
                                                       name: reply.weights[name][:1]})
        return reply

    run.client_fn = client_fn
    metrics = run.run_round()
    reasons = {e["client_id"]: e["reason"] for e in run.events if e["kind"] == "rejected"}
    assert set(bad) <= set(reasons), (bad, run.events)
    inv = {v: k for k, v in bad.items()}
    assert "device crashed" in reasons[inv["raise"]]
    assert "NaN/Inf" in reasons[inv["nan"]] and "shape" in reasons[inv["shape"]]
    assert metrics["rejected"] >= 3 and metrics["participants"] >= 1
    assert not set(bad) & set(metrics["clients"])
    assert all(np.isfinite(v).all() for v in run.weights.values())


def check_resume(dataset: str, strategy: str, tmp_path) -> None:
    """Killed after round 2 and resumed: the same weights and history as the run that was
    never interrupted."""
    import numpy as np

    first = server(dataset, strategy, rounds=2, out_dir=tmp_path)
    first.run()
    resumed = server(dataset, strategy, out_dir=tmp_path)
    resumed.load_state(*Server.read_state(tmp_path))
    resumed.run()
    whole = finished(dataset, strategy)
    assert [m["accuracy"] for m in resumed.history] == [m["accuracy"] for m in whole.history]
    for name, value in whole.weights.items():
        np.testing.assert_array_equal(resumed.weights[name], value, err_msg=name)


def check_deadline(dataset: str, strategy: str) -> None:
    """A client whose simulated round time exceeds the deadline is a logged straggler."""
    run = server(dataset, strategy, rounds=1, deadline_seconds=1e-6)
    metrics = run.run_round()
    assert metrics["participants"] == 0 and metrics["stragglers"] >= 1
    assert all("exceeds the deadline" in e["reason"] for e in run.events
               if e["kind"] == "straggler")
