"""fedplan on a real Flower federation: one SuperLink and four SuperNodes on 127.0.0.1.

The module starts ``flower-superlink`` and four ``flower-supernode`` processes (free
ports, a temporary ``FLWR_HOME``, telemetry and update checks off), submits the app in
``fl/flower/app`` with ``flwr run``, polls ``flwr list`` until the run is finished (the
exit code of ``flwr run`` only says the run was submitted), and reads the ``summary.json``
and per-round weights the server app writes. Nothing of Flower is mocked.

The four nodes (8x8 digits, an inverted-bottleneck CNN, IID partitions of 4, every node
selected every round, 2 rounds) are chosen so that one run shows everything:

* ``small``: budget 0.75 of the keep-all peak (a recompute plan), healthy;
* ``large``: budget 1.2 (the keep-all plan), healthy;
* ``nan``: budget 1.2, the test hook ``fault=nan``: it replies NaN weights every round;
* ``killed``: budget 0.9, the test hook ``fault=delay:600`` keeps it inside round 1's
  training until the test SIGKILLs its SuperNode's process group mid-round.

The same federation runs embedded (:mod:`fedplan.fl.server`, in this process) with the
same seed, partitions, budgets and faults, for the parity test.

Every test here carries the ``flower`` marker (``pytest -m flower`` runs exactly these).
The processes this module started, and only those, are killed at the end (each was
started in its own session; its process group is signalled).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from fedplan.errors import BadInputError
from fedplan.fl import data
from fedplan.fl.messages import ClientReply, MessageError, TrainInstruction

pytestmark = pytest.mark.flower
flwr = pytest.importorskip("flwr", reason="Flower is not installed: pip install -e '.[flower]'")

from fedplan.fl.flower import APP_DIR  # noqa: E402  (needs flwr)
from fedplan.fl.flower.config import FlowerRunConfig, NodeSpec  # noqa: E402
from fedplan.fl.flower.nodes import decisions_digest  # noqa: E402
from fedplan.fl.flower.records import (  # noqa: E402
    instruction_from_content,
    instruction_to_content,
    plan_digest,
    reply_from_content,
    reply_to_content,
)
from fedplan.fl.flower.strategy import derive_seed  # noqa: E402

from .conftest import TINY_MODEL  # noqa: E402

ROUNDS = 2
ROUND_TIMEOUT = 90.0   # round 1 waits for the killed node until this or its heartbeat expiry
RUN_TIMEOUT = 420.0    # the whole run; the test fails with the logs' tails past it
ROLES = {"small": 0.75, "large": 1.2, "nan": 1.2, "killed": 0.9}
FAULTS = {"nan": "nan", "killed": "delay:600"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Deployment:
    """A SuperLink and SuperNodes on 127.0.0.1; every process in its own session."""

    def __init__(self, root: Path):
        self.root = root
        self.home = root / "flwr-home"
        self.home.mkdir()
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = _free_port()

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 (closed in stop)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True)
        proc.log = log  # type: ignore[attr-defined]
        self.procs[name] = proc
        return proc

    def start_superlink(self) -> None:
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "fedplan-test"\n\n[superlink.fedplan-test]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        self._start("superlink", ["flower-superlink", "--insecure", "--database",
                                  ":flwr-in-memory:", "--host", "127.0.0.1", "--port",
                                  str(self.port), "--disable-runtime-dependency-installation"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            self.check_alive("superlink")
            time.sleep(0.5)
        raise AssertionError("flower-superlink did not listen within 60 s:\n"
                             + _tail(self.root / "superlink.log"))

    def start_supernode(self, name: str, node_config: str) -> None:
        self._start(name, ["flower-supernode", "--insecure", "--superlink",
                           f"127.0.0.1:{self.port}", "--port", str(_free_port()),
                           "--node-config", node_config])

    def check_alive(self, name: str) -> None:
        code = self.procs[name].poll()
        if code is not None:
            raise AssertionError(f"{name} exited with {code}:\n"
                                 + _tail(self.root / f"{name}.log"))

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=self.root)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)  # its own session: the node and its app processes
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            self.kill(name, signal.SIGTERM)
            self.procs[name].log.close()

    def logs(self) -> str:
        return "\n".join(f"--- {name}.log ---\n{_tail(self.root / f'{name}.log')}"
                         for name in self.procs)


def _read_summary(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _run_status(dep: Deployment, run_id: str) -> str:
    out = dep.flwr("list", "fedplan-test", "--run-id", run_id, "--format", "json")
    try:
        runs = json.loads(out.stdout)["runs"]
    except (ValueError, KeyError):
        return "unknown"
    return next((r["status"] for r in runs if str(r["run-id"]) == run_id), "unknown")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The embedded twin of the Flower federation (same model, data, seed, budgets): its
    shuffled fraction assignment decides which partition plays which role."""
    if "digits" not in data.available_datasets():
        pytest.skip("scikit-learn (digits) is not installed: pip install scikit-learn")
    from fedplan.fl.server import SimConfig, build_federation

    root = tmp_path_factory.mktemp("flwr")
    model = root / "tiny.py"
    model.write_text(TINY_MODEL)
    start = time.monotonic()
    fractions = sorted(set(ROLES.values()))
    sim = SimConfig(model=str(model), dataset="digits", num_clients=len(ROLES), rounds=2,
                    clients_per_round=len(ROLES), selector="fedhybrid", partition="iid",
                    tiers=",".join(f"{f:g}" for f in fractions + [1.2]), epochs=1, lr=0.05,
                    seed=0)
    fed = build_federation(sim)
    free = {f"f{f:g}": [] for f in fractions}
    for cid, device in enumerate(fed.devices):
        free[device.tier].append(cid)
    roles = {role: free[f"f{fraction:g}"].pop(0) for role, fraction in ROLES.items()}
    return {"root": root, "model": model, "fed": fed, "roles": roles,
            "setup_s": time.monotonic() - start}


@pytest.fixture(scope="module")
def federation_run(embedded):
    """Start the deployment, run the app once (killing one node mid-round 1), and return
    what the run left behind, with the embedded federation it mirrors."""
    root, model, fed, roles = (embedded[k] for k in ("root", "model", "fed", "roles"))
    out_dir = root / "out"
    timings: dict[str, float] = {"embedded_setup_s": embedded["setup_s"]}

    dep = Deployment(root)
    try:
        start = time.monotonic()
        dep.start_superlink()
        for role, cid in roles.items():
            fault = FAULTS.get(role, "none")
            dep.start_supernode(role, f'partition-id={cid} num-partitions={len(ROLES)} '
                                      f'budget-fraction={ROLES[role]} tier="{role}" '
                                      f'client-key="device-{role}" fault="{fault}"')
        run_config = (f'model="{model}" dataset="digits" partition="iid" '
                      f'num-server-rounds={ROUNDS} clients-per-round={len(ROLES)} '
                      f'selector="fedhybrid" epochs=1 lr=0.05 seed=0 min-nodes={len(ROLES)} '
                      f'round-timeout={ROUND_TIMEOUT} node-wait-seconds=90.0 '
                      f'out-dir="{out_dir}"')
        submitted = dep.flwr("run", str(APP_DIR), "fedplan-test", "--run-config", run_config,
                             "--format", "json", timeout=120)
        assert submitted.returncode == 0, f"flwr run failed:\n{submitted.stdout}\n" \
                                          f"{submitted.stderr}\n{dep.logs()}"
        run_id = str(json.loads(submitted.stdout)["run-id"])
        summary_path = out_dir / "summary.json"
        deadline = time.monotonic() + RUN_TIMEOUT
        killed_at = None
        round1_sent_at = None
        status = "unknown"
        while time.monotonic() < deadline:
            summary = _read_summary(summary_path)
            if round1_sent_at is None and any(
                    e["kind"] == "round_sent" and e["round"] == 1
                    for e in summary.get("events", [])):
                round1_sent_at = time.monotonic()
            # kill the delayed node once its app holds round 1's message (it sleeps there)
            if killed_at is None and round1_sent_at is not None and (
                    "train message" in _tail(root / "killed.log", 200)
                    or time.monotonic() - round1_sent_at > 20):
                dep.kill("killed")
                killed_at = time.monotonic()
                summary_at_kill = summary
            status = _run_status(dep, run_id)
            if status.startswith("finished"):
                break
            if summary.get("phase") == "failed":
                break
            time.sleep(2)
        else:
            pytest.fail(f"run {run_id} not finished after {RUN_TIMEOUT} s (status "
                        f"{status!r}):\n{dep.logs()}")
        timings["flower_run_s"] = time.monotonic() - start
        summary = _read_summary(summary_path)
        assert status == "finished:completed", \
            f"run {run_id} ended {status!r}; summary phase {summary.get('phase')!r} " \
            f"{summary.get('error', '')}\n{dep.logs()}"
        assert killed_at is not None, "the run finished before the node could be killed"
        yield {"summary": summary, "out_dir": out_dir, "fed": fed, "roles": roles,
               "summary_at_kill": summary_at_kill, "timings": timings, "dep": dep}
    finally:
        dep.stop()


def _by_key(summary: dict) -> dict[str, dict]:
    return {n["client_key"].removeprefix("device-"): n for n in summary["nodes"]}


# --------------------------------------------------------------------------- end to end


def test_nodes_with_different_budgets_get_different_plans(federation_run):
    nodes = _by_key(federation_run["summary"])
    assert set(nodes) == set(ROLES)
    small, large = nodes["small"], nodes["large"]
    assert small["budget_bytes"] < large["budget_bytes"]
    assert small["plan_digest"] != large["plan_digest"]
    assert small["recomputed"] > 0 and large["recomputed"] == 0
    assert nodes["nan"]["plan_digest"] == large["plan_digest"]  # same bucket, same plan
    # each reply echoed the digest of the plan its node was sent
    for rnd in federation_run["summary"]["rounds"]:
        for reply in rnd["replies"]:
            node = next(n for n in nodes.values() if n["client_id"] == reply["client_id"])
            assert reply["plan_digest"] == node["plan_digest"]


def test_every_measured_peak_within_its_budget(federation_run):
    summary = federation_run["summary"]
    roles = federation_run["roles"]
    assert len(summary["rounds"]) == ROUNDS
    for rnd in summary["rounds"]:
        replied = {r["client_id"]: r for r in rnd["replies"]}
        # on a failure, say why a node is missing (pytest truncates the round's dict)
        assert set(replied) == {roles["small"], roles["large"]}, \
            (rnd["rejected"], rnd["no_reply"], rnd.get("skipped"))
        for reply in replied.values():
            assert 0 < reply["measured_peak_bytes"] <= reply["budget_bytes"], reply
        assert not [x for x in rnd["rejected"] if "budget" in x["reason"]]
    small = _by_key(summary)["small"]
    peaks = [r["measured_peak_bytes"] for rnd in summary["rounds"] for r in rnd["replies"]
             if r["client_id"] == roles["small"]]
    assert max(peaks) <= small["budget_bytes"] < summary["keep_all_bytes"]


def test_global_accuracy_rises(federation_run):
    summary = federation_run["summary"]
    accuracy = [summary["initial"]["accuracy"]] + [r["accuracy"] for r in summary["rounds"]]
    assert accuracy[-1] > accuracy[0] + 0.2, accuracy
    assert accuracy[-1] == max(accuracy) or accuracy[-1] > 0.5, accuracy


def test_nan_replies_rejected(federation_run):
    cid = federation_run["roles"]["nan"]
    for rnd in federation_run["summary"]["rounds"]:
        rejected = [x for x in rnd["rejected"] if x["client_id"] == cid]
        assert len(rejected) == 1 and "NaN/Inf" in rejected[0]["reason"], rnd
        assert cid not in rnd["participants"]
    weights = np.load(federation_run["out_dir"] / f"weights-round-{ROUNDS}.npz")
    assert all(np.isfinite(weights[k]).all() for k in weights.files)


def test_supernode_killed_mid_round_does_not_stop_the_run(federation_run):
    summary, cid = federation_run["summary"], federation_run["roles"]["killed"]
    at_kill = federation_run["summary_at_kill"]
    assert len(at_kill.get("rounds", [])) == 1 and "accuracy" not in at_kill["rounds"][0], \
        "the node was not killed during round 1"
    first, *later = summary["rounds"]
    assert [x["client_id"] for x in first["no_reply"]] == [cid]
    assert first["participants"] and "accuracy" in first
    for rnd in later:  # dropped after its silence: not selected again
        assert cid not in rnd["selected"] and "accuracy" in rnd
    assert _by_key(summary)["killed"]["online"] is False
    assert not [e for e in summary["events"] if e["kind"] == "ignored"]  # replies matched
    assert summary["phase"] == "finished"


# --------------------------------------------------------------------------- parity


def test_parity_with_embedded_simulation(federation_run):
    """Two rounds, the same seed, partitions, plans and faults: the embedded simulation and
    Flower aggregate the same weights."""
    from fedplan.fl.server import Server

    fed, roles = federation_run["fed"], federation_run["roles"]
    server = Server(fed)

    def client_fn(instruction: TrainInstruction) -> ClientReply:
        if instruction.client_id == roles["killed"]:
            raise RuntimeError("killed")  # never replies
        reply = server.local_client(instruction)
        if instruction.client_id == roles["nan"]:
            weights = {k: np.full_like(v, np.nan) for k, v in reply.weights.items()}
            reply = dataclasses.replace(reply, weights=weights)
        return reply

    server.client_fn = client_fn
    # what both sides start from: the same keep-all peak, budgets and plans per node (a
    # failure below names the first of these that differs)
    summary = federation_run["summary"]
    assert summary["keep_all_bytes"] == fed.cache.keep_all_bytes
    for role, node in _by_key(summary).items():
        cid = roles[role]
        assert node["client_id"] == cid
        assert node["budget_bytes"] == fed.devices[cid].budget_bytes, role
        entry = fed.cache.lookup(node["budget_bytes"])
        assert hasattr(entry, "plan_json"), f"{role}: {entry}"  # every role has a plan
        assert node.get("recomputed") == entry.recomputed, role
        assert node["decisions_digest"] == decisions_digest(entry.plan_json), \
            f"{role}: the server app planned other decisions than the embedded cache"
    from fedplan.fl.server import torch_threads
    with torch_threads(1):
        for flower_round in (1, 2):
            server.run_round()
            flower = np.load(federation_run["out_dir"] / f"weights-round-{flower_round}.npz")
            assert sorted(flower.files) == sorted(server.weights)
            for name, embedded in server.weights.items():
                np.testing.assert_allclose(flower[name], embedded, rtol=0, atol=1e-6,
                                           err_msg=f"round {flower_round}, {name}")
            assert server.history[-1]["clients"] == \
                federation_run["summary"]["rounds"][flower_round - 1]["participants"]
    # the weights moved: parity is not two copies of the initial model
    initial = np.load(federation_run["out_dir"] / "weights-round-0.npz")
    assert max(float(np.abs(initial[k] - server.weights[k]).max()) for k in initial.files) > 1e-3
    print("timings", federation_run["timings"])


# --------------------------------------------------------------------------- pieces


def test_run_and_node_config_parsing():
    cfg = FlowerRunConfig.from_run_config({"num-server-rounds": 5, "round-timeout": 30,
                                           "lr": 1, "unknown-key": "ignored"})
    assert cfg.num_server_rounds == 5 and cfg.round_timeout == 30.0 and cfg.lr == 1.0
    with pytest.raises(BadInputError, match="partition"):
        FlowerRunConfig(partition="correlated")
    with pytest.raises(BadInputError, match="num-server-rounds"):
        FlowerRunConfig.from_run_config({"num-server-rounds": 0})
    node = NodeSpec.from_node_config({"partition-id": 2, "num-partitions": 4,
                                      "budget": "12MB", "tier": "4GB"})
    assert node.budget_for(10**9) == 12 * 10**6 and node.key == "partition-2"
    again = NodeSpec.from_node_config(node.to_config())
    assert dataclasses.replace(again, client_key="") == node and again.key == node.key
    half = NodeSpec.from_node_config({"partition-id": 0, "num-partitions": 1,
                                      "budget-fraction": 0.5})
    assert half.budget_for(1000) == 500
    for bad, match in [({"num-partitions": 4, "budget": "1MB"}, "partition-id"),
                       ({"partition-id": 4, "num-partitions": 4, "budget": "1MB"},
                        "partition-id"),
                       ({"partition-id": 0, "num-partitions": 4}, "exactly one"),
                       ({"partition-id": 0, "num-partitions": 4, "budget": "1MB",
                         "fault": "explode"}, "fault")]:
        with pytest.raises(BadInputError, match=match):
            NodeSpec.from_node_config(bad)


def test_records_round_trip_and_tampered_plan():
    weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
               "n": np.array(3, dtype=np.int64)}
    plan = {"schema_version": 1, "decisions": {"a": "recompute"}}
    instruction = TrainInstruction(round=1, client_id=2, plan=plan, weights=weights,
                                   epochs=1, batch_size=8, lr=0.05,
                                   seed=derive_seed(0, 1, 2), budget_bytes=123)
    first = instruction_to_content(instruction, plan_digest(plan))
    second = instruction_to_content(instruction, plan_digest(plan))
    assert first["arrays"] is not second["arrays"] and first["config"] is not second["config"]
    back, digest = instruction_from_content(first)
    assert digest == plan_digest(plan) and back.plan == plan and back.seed == instruction.seed
    assert all(np.array_equal(back.weights[k], weights[k]) for k in weights)
    assert back.weights["n"].shape == ()
    first["config"]["plan"] = json.dumps({**plan, "decisions": {"a": "keep"}})
    with pytest.raises(MessageError, match="altered"):
        instruction_from_content(first)
    reply = ClientReply(round=1, client_id=2, weights=weights, num_samples=10, steps=2,
                        loss_sum=3.0, loss_sq_sum=5.0, loss_count=16,
                        measured_peak_bytes=100, budget_bytes=123, train_seconds=0.5)
    got, echoed = reply_from_content(reply_to_content(reply, "abc", "device-x"))
    assert echoed == "abc" and got.num_samples == 10 and got.measured_peak_bytes == 100
    del first["arrays"]
    with pytest.raises(MessageError):
        instruction_from_content(first)


def test_decisions_digest_ignores_the_solves_timings():
    plan = {"decisions": {"a": "recompute", "b": "keep"}, "step": {}, "budget_bytes": 10,
            "fingerprint": "f", "batch_size": 8, "solve_seconds": 1.07,
            "notes": ["CBC: 24 units, 1.07 s"]}
    again = {**plan, "solve_seconds": 1.72, "notes": ["CBC: 24 units, 1.72 s"]}
    assert plan_digest(plan) != plan_digest(again)  # what a reply echoes: per process
    assert decisions_digest(plan) == decisions_digest(again)
    other = {**plan, "decisions": {"a": "keep", "b": "keep"}}
    assert decisions_digest(other) != decisions_digest(plan)


def test_flower_app_folder_names_the_apps():
    text = (APP_DIR / "pyproject.toml").read_text()
    assert 'serverapp = "fedplan.fl.flower.server_app:app"' in text
    assert 'clientapp = "fedplan.fl.flower.client_app:app"' in text
    # every run-config key the app declares is one FlowerRunConfig knows
    import tomllib
    declared = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]
    assert set(declared) == set(FlowerRunConfig().to_json())


# --------------------------------------------------------------------------- the strategy


class _KnownNodesOnly:
    """Stands in for the SuperLink's node list in a unit test of the strategy's hooks (the
    end-to-end test above runs them against a real SuperLink): no new nodes to query."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return self.node_ids


def test_strategy_sends_one_message_per_node_and_validates_replies(embedded, monkeypatch):
    from flwr.app import ConfigRecord, Error, Message
    from flwr.common.constant import ErrorCode
    from flwr.supercore.task_identity import TaskIdentity

    # Flower 1.41 stamps a new message with the identity of the task process it runs in
    # (set when a ServerApp process starts); this test calls the hooks in pytest's process
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)

    from fedplan.fl.flower.nodes import NodeRegistry
    from fedplan.fl.flower.records import arrays_to_record
    from fedplan.fl.flower.strategy import FedPlanStrategy
    from fedplan.fl.messages import state_to_arrays
    from fedplan.fl.policy import PolicyConfig, RoundPolicy
    from fedplan.fl.selectors import make_selector

    spec, cache = embedded["fed"].spec, embedded["fed"].cache
    events = []
    registry = NodeRegistry(cache, batch_size=8, epochs=1,
                            log=lambda kind, fields: events.append((kind, fields)))
    fractions = {11: 0.75, 22: 1.2, 33: 1.2, 44: 1.2, 55: 1.2}
    for cid, (node_id, fraction) in enumerate(fractions.items()):
        registry.register(node_id, NodeSpec(partition_id=cid, num_partitions=5,
                                            budget_fraction=fraction), num_samples=40)
    with pytest.raises(BadInputError, match="already held"):
        registry.register(99, NodeSpec(partition_id=0, num_partitions=5, budget_bytes=10**9),
                          num_samples=40)
    config = FlowerRunConfig(clients_per_round=5, selector="random", round_timeout=5.0)
    policy = RoundPolicy(config=PolicyConfig(clients_per_round=5, epochs=1, batch_size=8,
                                             lr=0.05, seed=0),
                         cache=cache, model_factory=spec.build,
                         selector=make_selector("random", keep_all_bytes=cache.keep_all_bytes),
                         log=lambda kind, fields: events.append((kind, fields)))
    strategy = FedPlanStrategy(config=config, registry=registry, policy=policy,
                               log=lambda kind, fields: events.append((kind, fields)))
    weights = state_to_arrays(spec.build().state_dict())
    messages = list(strategy.configure_train(1, arrays_to_record(weights), ConfigRecord(),
                                             _KnownNodesOnly(fractions)))
    assert sorted(m.metadata.dst_node_id for m in messages) == sorted(fractions)
    contents = [m.content for m in messages]
    assert len({id(c) for c in contents}) == len({id(c["arrays"]) for c in contents}) \
        == len({id(c["config"]) for c in contents}) == 5  # nothing shared between nodes
    by_node = {m.metadata.dst_node_id: m for m in messages}
    digests = {n: by_node[n].content["config"]["plan-digest"] for n in fractions}
    assert digests[11] != digests[22] == digests[33]
    assert json.loads(by_node[11].content["config"]["plan"])["budget_bytes"] <= \
        registry.nodes[0].budget_bytes

    def reply(node_id, *, digest=None, peak=None, weights_=None):
        instruction, sent = instruction_from_content(by_node[node_id].content)
        answer = ClientReply(round=0, client_id=instruction.client_id,
                             weights=weights_ or {k: v + 1 if v.dtype.kind == "f" else v
                                                  for k, v in weights.items()},
                             num_samples=40, steps=5, loss_sum=1.0, loss_sq_sum=1.0,
                             loss_count=40, measured_peak_bytes=peak or 1000,
                             budget_bytes=instruction.budget_bytes, train_seconds=0.1)
        return Message(reply_to_content(answer, digest or sent, "k"),
                       reply_to=by_node[node_id])

    replies = [
        reply(11),                                                     # accepted
        reply(22, digest="0" * 16),                                    # another plan
        reply(33, peak=registry.nodes[2].budget_bytes + 1),            # over budget
        Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="boom"),
                reply_to=by_node[44]),                                 # the app raised
        Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="gone"),
                reply_to=by_node[55]),                                 # the node is gone
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    rnd = strategy.history[-1]
    assert rnd["participants"] == [0] and metrics["participants"] == 1
    reasons = {x["client_id"]: x["reason"] for x in rnd["rejected"]}
    assert "plan digest" in reasons[1] and "over budget" in reasons[2] \
        and "boom" in reasons[3]
    assert [x["client_id"] for x in rnd["no_reply"]] == [4]
    assert registry.nodes[4].online is False and registry.nodes[3].online is True
    new = {k: v.numpy() for k, v in arrays.items()}
    np.testing.assert_array_equal(new["stem.weight"], weights["stem.weight"] + 1)
    assert not [e for e in events if e[0] == "ignored"]
