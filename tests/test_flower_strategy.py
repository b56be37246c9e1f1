"""A new strategy on a real Flower federation: ProFL through the same round policy as the
embedded run, on one ``flower-superlink`` and three ``flower-supernode`` processes on
127.0.0.1 (tests/test_flower.py's deployment helper; nothing of Flower is mocked).

Three nodes (scikit-learn digits, the packaged block CNN for 8x8 digits, IID partitions,
budgets 0.7, 0.7 and 1.2 of the full model's keep-all peak), two rounds: ProFL paces one
round per block here, so round 1 trains block 0 and round 2 trains block 1 with block 0
frozen on the nodes. The embedded simulation of the same federation must aggregate the
same weights after each round.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from fedplan.fl import data

pytestmark = pytest.mark.flower
flwr = pytest.importorskip("flwr", reason="Flower is not installed: pip install -e '.[flower]'")

from fedplan.fl.flower import APP_DIR  # noqa: E402

from .test_flower import Deployment, _read_summary, _run_status  # noqa: E402

ROUNDS = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if "digits" not in data.available_datasets():
        pytest.skip("scikit-learn (digits) is not installed: pip install scikit-learn")
    from fedplan.fl.server import Server, SimConfig, build_federation, torch_threads

    root = tmp_path_factory.mktemp("flwr-profl")
    sim = SimConfig(dataset="digits", num_clients=3, rounds=ROUNDS, clients_per_round=3,
                    strategy="profl", partition="iid", tiers="0.7,1.2", epochs=1, lr=0.05,
                    seed=0)
    fed = build_federation(sim)
    budgets = {cid: d.budget_bytes for cid, d in enumerate(fed.devices)}
    keep_all = fed.cache.keep_all_bytes
    fractions = {cid: float(d.tier.removeprefix("f")) for cid, d in enumerate(fed.devices)}
    out_dir = root / "out"
    dep = Deployment(root)
    try:
        dep.start_superlink()
        for cid, fraction in fractions.items():
            dep.start_supernode(f"node{cid}", f'partition-id={cid} num-partitions=3 '
                                              f'budget-fraction={fraction} '
                                              f'client-key="device-{cid}"')
        run_config = (f'dataset="digits" partition="iid" strategy="profl" '
                      f'num-server-rounds={ROUNDS} clients-per-round=3 epochs=1 lr=0.05 '
                      f'seed=0 min-nodes=3 round-timeout=120.0 node-wait-seconds=90.0 '
                      f'out-dir="{out_dir}"')
        submitted = dep.flwr("run", str(APP_DIR), "fedplan-test", "--run-config", run_config,
                             "--format", "json", timeout=120)
        assert submitted.returncode == 0, f"{submitted.stdout}\n{submitted.stderr}"
        run_id = str(json.loads(submitted.stdout)["run-id"])
        deadline, status = time.monotonic() + 400, "unknown"
        while time.monotonic() < deadline:
            status = _run_status(dep, run_id)
            if status.startswith("finished"):
                break
            time.sleep(2)
        summary = _read_summary(out_dir / "summary.json")
        assert status == "finished:completed", f"{status}: {summary.get('error')}\n" \
                                               f"{dep.logs()}"
    finally:
        dep.stop()
    embedded = Server(fed)
    with torch_threads(1):
        for _ in range(ROUNDS):
            embedded.run_round()
            embedded.__dict__.setdefault("snapshots", []).append(dict(embedded.weights))
    return {"summary": summary, "out_dir": out_dir, "embedded": embedded,
            "budgets": budgets, "keep_all": keep_all}


def test_profl_rounds_on_flower_train_blocks_within_budgets(runs):
    summary = runs["summary"]
    assert summary["phase"] == "finished" and len(summary["rounds"]) == ROUNDS
    assert [r["stage"] for r in summary["rounds"]] == [0, 1]
    for rnd in summary["rounds"]:
        assert len(rnd["replies"]) == 3 and not rnd["rejected"], rnd
        for reply in rnd["replies"]:
            assert reply["measured_peak_bytes"] <= reply["budget_bytes"]
            assert reply["block"] == rnd["stage"]
    low = [x for r in summary["rounds"] for x in r["replies"]
           if x["budget_bytes"] < runs["keep_all"]]
    assert low  # nodes below the whole model's keep-all peak trained their block


def test_profl_flower_matches_the_embedded_run(runs):
    """The same round policy drives both: equal aggregated weights after every round."""
    for r, embedded in enumerate(runs["embedded"].snapshots, start=1):
        flower = np.load(runs["out_dir"] / f"weights-round-{r}.npz")
        assert sorted(flower.files) == sorted(embedded)
        for name, value in embedded.items():
            np.testing.assert_allclose(flower[name], value, rtol=0, atol=1e-6,
                                       err_msg=f"round {r}, {name}")
    initial = np.load(runs["out_dir"] / "weights-round-0.npz")
    moved = max(float(np.abs(initial[k] - runs["embedded"].weights[k]).max())
                for k in initial.files)
    assert moved > 1e-3
