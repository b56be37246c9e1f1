"""The fedplan ``ServerApp``: plans per node on the SuperLink side and runs the rounds.

1. Read the run config (:class:`~.config.FlowerRunConfig`), load the model file and the
   dataset's test split, and build the embedded layer's
   :class:`~fedplan.fl.plan_cache.PlanCache` (trace and measure once; plans per budget
   bucket, each measured with the profiled steps a client runs).
2. Wait for ``min-nodes`` nodes, then the **query round**: every node reports its
   ``node_config`` (budget, tier, partition, client key) and its sample count
   (:class:`~.nodes.NodeRegistry`).
3. ``FedPlanStrategy.start``: the rounds (:mod:`.strategy`), with the global model
   evaluated on the test split before the first round and after every round.
4. With ``out-dir`` set: ``summary.json`` (rewritten atomically after every phase, so a
   watcher sees progress: ``phase``, per-node budgets and plan digests, per-round
   accuracy, replies with measured peaks, rejections with reasons) and
   ``weights-round-R.npz`` (the global weights after round R; ``R = 0`` the initial ones).

Every log line also goes to Flower's log (``flwr run --stream``, or ``flwr log RUN_ID``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log as flwr_log

from fedplan.errors import BadInputError
from fedplan.fl import data as fldata
from fedplan.fl.plan_cache import PlanCache
from fedplan.fl.policy import PolicyConfig
from fedplan.fl.server import solver_options
from fedplan.fl.strategies import build_policy
from fedplan.modelfile import load_model_file

from .config import FlowerRunConfig
from .nodes import NodeRegistry
from .records import arrays_from_record, arrays_to_record
from .strategy import FedPlanStrategy

__all__ = ["RunRecorder", "app"]

app = ServerApp()

_WARN = {"rejected", "no_reply", "dropped", "refused", "query_failed", "skipped"}


class RunRecorder:
    """Events and results of one run; ``summary.json`` in ``out_dir`` after each change."""

    def __init__(self, out_dir: str, config: FlowerRunConfig):
        self.out_dir = Path(out_dir) if out_dir else None
        self.summary: dict[str, Any] = {"phase": "starting", "config": config.to_json(),
                                        "events": [], "rounds": [], "nodes": []}
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)

    def log(self, kind: str, fields: dict[str, Any]) -> None:
        self.summary["events"].append({"kind": kind, "time": time.time(), **fields})
        flwr_log(WARNING if kind in _WARN else INFO, "[fedplan] %s %s", kind,
                 json.dumps(fields, default=str))
        self.write()

    def phase(self, name: str, **fields: Any) -> None:
        self.summary["phase"] = name
        self.summary.update(fields)
        self.write()

    def write(self) -> None:
        if self.out_dir is not None:
            _write_atomic(self.out_dir / "summary.json",
                          json.dumps(self.summary, indent=1, default=_json_default).encode())

    def save_weights(self, server_round: int, weights: dict[str, np.ndarray]) -> None:
        if self.out_dir is not None:
            handle, tmp = tempfile.mkstemp(dir=self.out_dir, suffix=".npz")
            with os.fdopen(handle, "wb") as stream:
                np.savez(stream, **weights)
            os.replace(tmp, self.out_dir / f"weights-round-{server_round}.npz")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _write_atomic(path: Path, data: bytes) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "wb") as stream:
        stream.write(data)
    os.replace(tmp, path)


def _wait_for_nodes(grid: Grid, config: FlowerRunConfig, recorder: RunRecorder) -> None:
    deadline = time.monotonic() + config.node_wait_seconds
    while True:
        found = len(list(grid.get_node_ids()))
        if found >= config.min_nodes:
            return
        if time.monotonic() > deadline:
            raise BadInputError(f"expected at least {config.min_nodes} connected SuperNodes "
                                f"(min-nodes); found {found} after "
                                f"{config.node_wait_seconds} s; start more SuperNodes or "
                                "lower min-nodes")
        time.sleep(1.0)


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = FlowerRunConfig.from_run_config(context.run_config)
    recorder = RunRecorder(config.out_dir, config)
    try:
        _run(grid, config, recorder)
    except Exception as exc:
        recorder.phase("failed", error=f"{type(exc).__name__}: {exc}")
        raise


def _run(grid: Grid, config: FlowerRunConfig, recorder: RunRecorder) -> None:
    started = time.perf_counter()
    torch.set_num_threads(config.threads)
    spec = load_model_file(config.model_path)
    batch_size = config.batch_size or spec.default_batch_size
    dataset, _ = fldata.load_federated(config.dataset, config.test_clients, config.seed)
    (inputs, *rest), targets = spec.batch(batch_size)
    if rest or tuple(inputs.shape[1:]) != dataset.input_shape:
        raise BadInputError(f"{spec.path}: inputs of shape {tuple(inputs.shape[1:])} per "
                            f"sample; dataset {dataset.name!r} has {dataset.input_shape}")
    recorder.phase("planning")
    cache = PlanCache(spec.build, inputs, targets, lr=config.lr, loss_fn=spec.loss_fn,
                      bucket_fraction=config.bucket_fraction,
                      options=solver_options(config.plan_time_limit))
    recorder.phase("waiting_for_nodes", keep_all_bytes=cache.keep_all_bytes,
                   batch_size=batch_size)
    _wait_for_nodes(grid, config, recorder)
    registry = NodeRegistry(cache, batch_size=batch_size, epochs=config.epochs,
                            log=recorder.log)
    registry.discover(grid, timeout=min(60.0, config.round_timeout), group="query-0")
    if not registry.online():
        raise BadInputError("no SuperNode answered the query round with a valid node config")
    policy = build_policy(
        config.strategy or config.selector, cache=cache, spec=spec, log=recorder.log,
        options={"plan_time_limit": config.plan_time_limit} | config.options(),
        config=PolicyConfig(clients_per_round=config.clients_per_round, epochs=config.epochs,
                            batch_size=batch_size, lr=config.lr, seed=config.seed,
                            rounds=config.num_server_rounds))
    strategy = FedPlanStrategy(config=config, registry=registry, policy=policy,
                               log=recorder.log)
    recorder.summary["rounds"] = strategy.history
    initial = policy.initial_weights()

    def evaluate_fn(server_round: int, arrays) -> MetricRecord:
        weights = arrays_from_record(arrays)
        accuracy, test_loss = policy.evaluate(weights, dataset.test_x, dataset.test_y)
        recorder.save_weights(server_round, weights)
        if server_round == 0:
            recorder.summary["initial"] = {"accuracy": accuracy, "test_loss": test_loss}
        else:
            strategy.history[-1].update(accuracy=accuracy, test_loss=test_loss)
        recorder.summary["nodes"] = registry.summaries()
        recorder.phase(f"round {server_round} done")
        return MetricRecord({"accuracy": accuracy, "test-loss": test_loss})

    recorder.phase("training", nodes=registry.summaries())
    strategy.start(grid, arrays_to_record(initial), num_rounds=config.num_server_rounds,
                   timeout=config.round_timeout, train_config=ConfigRecord(),
                   evaluate_fn=evaluate_fn)
    history = strategy.history
    recorder.phase("finished", nodes=registry.summaries(),
                   final_accuracy=history[-1].get("accuracy", math.nan) if history else None,
                   plan_cache=cache.stats(), wall_seconds=time.perf_counter() - started)
