"""New strategies on a real Flower federation: ProFL and SmartSplit through the same round
policies as the embedded run, each on one ``flower-superlink`` and three
``flower-supernode`` processes on 127.0.0.1 (tests/test_flower.py's deployment helper;
nothing of Flower is mocked).

Three nodes (scikit-learn digits, the packaged block CNN for 8x8 digits, IID partitions,
budgets 0.7, 0.7 and 1.2 of the full model's keep-all peak), two rounds: ProFL paces one
round per block here, so round 1 trains block 0 and round 2 trains block 1 with block 0
frozen on the nodes. The embedded simulation of the same federation must aggregate the
same weights after each round.

SmartSplit (three nodes, the hand-written residual CNN of tests/conftest.py, which is not
an nn.Sequential, so its cuts come from its graph; budgets 0.5, 0.5 and 1.2, three rounds):
the 0.5 nodes train the part before a cut and the edge server the rest; the edge server
fails halfway through round 2 (``strategy-options="edge_fail_round=2"``), which ends that
round for both split nodes (rejected, with the reason logged) while the 1.2 node's local
update counts, and round 3 trains all three again. The embedded run of the same
federation must aggregate the same weights after each round.
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

from .conftest import TINY_MODEL  # noqa: E402
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


# --------------------------------------------------------------------------- SmartSplit

SPLIT_ROUNDS = 3
EDGE_FAILS = 2  # 1-based round in which the edge server fails


def _run_on_flower(root, fractions, run_config, timeout=400):
    out_dir = root / "out"
    dep = Deployment(root)
    try:
        dep.start_superlink()
        for cid, fraction in fractions.items():
            dep.start_supernode(f"node{cid}", f'partition-id={cid} '
                                              f'num-partitions={len(fractions)} '
                                              f'budget-fraction={fraction} '
                                              f'client-key="device-{cid}"')
        submitted = dep.flwr("run", str(APP_DIR), "fedplan-test", "--run-config",
                             f'{run_config} out-dir="{out_dir}"', "--format", "json",
                             timeout=120)
        assert submitted.returncode == 0, f"{submitted.stdout}\n{submitted.stderr}"
        run_id = str(json.loads(submitted.stdout)["run-id"])
        deadline, status = time.monotonic() + timeout, "unknown"
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
    return summary, out_dir


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory):
    if "digits" not in data.available_datasets():
        pytest.skip("scikit-learn (digits) is not installed: pip install scikit-learn")
    from fedplan.fl.server import Server, SimConfig, build_federation, torch_threads

    root = tmp_path_factory.mktemp("flwr-smartsplit")
    model = root / "tiny.py"
    model.write_text(TINY_MODEL)
    sim = SimConfig(model=str(model), dataset="digits", num_clients=3, rounds=SPLIT_ROUNDS,
                    clients_per_round=3, strategy="smartsplit",
                    strategy_options={"edge_fail_round": EDGE_FAILS}, partition="iid",
                    tiers="0.5,1.2", epochs=1, lr=0.05, seed=0)
    fed = build_federation(sim)
    fractions = {cid: float(d.tier.removeprefix("f")) for cid, d in enumerate(fed.devices)}
    summary, out_dir = _run_on_flower(
        root, fractions,
        f'model="{model}" dataset="digits" partition="iid" strategy="smartsplit" '
        f'strategy-options="edge_fail_round={EDGE_FAILS}" '
        f'num-server-rounds={SPLIT_ROUNDS} clients-per-round=3 epochs=1 lr=0.05 seed=0 '
        f'min-nodes=3 round-timeout=120.0 node-wait-seconds=90.0')
    embedded = Server(fed)
    snapshots = []
    with torch_threads(1):
        for _ in range(SPLIT_ROUNDS):
            embedded.run_round()
            snapshots.append(dict(embedded.weights))
    return {"summary": summary, "out_dir": out_dir, "embedded": embedded,
            "snapshots": snapshots, "fractions": fractions,
            "keep_all": fed.cache.keep_all_bytes}


def test_smartsplit_on_flower_splits_and_survives_an_edge_failure(split_runs):
    summary, fractions = split_runs["summary"], split_runs["fractions"]
    split = sorted(cid for cid, f in fractions.items() if f < 1)
    local = sorted(cid for cid, f in fractions.items() if f >= 1)
    assert summary["phase"] == "finished" and len(summary["rounds"]) == SPLIT_ROUNDS
    assert len(split) == 2 and len(local) == 1
    policy = split_runs["embedded"].policy
    for r, rnd in enumerate(summary["rounds"], start=1):
        assert rnd["edge_clients"] == 2, rnd
        for reply in rnd["replies"]:
            assert 0 < reply["measured_peak_bytes"] <= reply["budget_bytes"], reply
            # split nodes train the part before a cut, below the whole model's keep-all
            assert reply["split"] == (reply["client_id"] in split), reply
            if reply["split"]:
                assert reply["cut"] < policy.num_blocks
                assert reply["budget_bytes"] < split_runs["keep_all"]
        if r == EDGE_FAILS:
            assert rnd["participants"] == local
            rejected = {x["client_id"]: x["reason"] for x in rnd["rejected"]}
            assert sorted(rejected) == split
            assert all("edge server failed" in reason for reason in rejected.values())
        else:
            assert rnd["participants"] == split + local and not rnd["rejected"], rnd
    # the engine's log names each rejection too
    logged = [e for e in summary["events"] if e["kind"] == "rejected"]
    assert sorted(e["client_id"] for e in logged) == split
    assert all(e["round"] == EDGE_FAILS - 1 for e in logged)


def test_smartsplit_flower_matches_the_embedded_run(split_runs):
    embedded = split_runs["embedded"]
    assert [m["clients"] for m in embedded.history] == \
        [r["participants"] for r in split_runs["summary"]["rounds"]]
    for r, weights in enumerate(split_runs["snapshots"], start=1):
        flower = np.load(split_runs["out_dir"] / f"weights-round-{r}.npz")
        assert sorted(flower.files) == sorted(weights)
        for name, value in weights.items():
            np.testing.assert_allclose(flower[name], value, rtol=0, atol=1e-6,
                                       err_msg=f"round {r}, {name}")
