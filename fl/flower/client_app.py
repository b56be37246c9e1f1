"""The fedplan ``ClientApp``: one per SuperNode (device).

* ``query``: replies with what the node says about itself (its ``node_config`` as a
  :class:`~.config.NodeSpec`: partition, budget, tier, speed, client key), because the
  server cannot read a node's ``node_config``.
* ``train``: checks that the plan hashes to the digest the server sent, applies the plan
  (``fedplan.apply`` checks the model's fingerprint), trains on the node's partition with
  the embedded layer's :func:`~fedplan.fl.strategies.run_instruction` (the whole model,
  or the part the instruction's task names; the measured peak is the same profiled
  quantity), and replies with the weights, ``num-examples``, the
  training-loss statistics, the measured peak and the plan digest.

The node's partition is recomputed on the node from the run config (dataset, partition
scheme, seed) and its ``partition-id``/``num-partitions``, with the same partitioners and
arguments as the embedded simulation, so node ``i`` holds exactly the samples of embedded
client ``i``.

Test hooks (node config ``fault``; never set in production): ``nan`` replies NaN weights,
``delay:SECONDS`` sleeps before training, ``bad-digest`` echoes a wrong plan digest.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedplan.fl import data as fldata
from fedplan.fl.messages import ClientReply
from fedplan.fl.server import MIN_SAMPLES
from fedplan.fl.strategies import run_instruction
from fedplan.modelfile import load_model_file

from .config import FlowerRunConfig, NodeSpec
from .records import instruction_from_content, reply_to_content

__all__ = ["app", "node_partition"]

app = ClientApp()


def node_partition(config: FlowerRunConfig, node: NodeSpec, labels: torch.Tensor
                   ) -> torch.Tensor:
    """Indices of the node's training samples (the embedded simulation's partitioners,
    called with the same arguments, so embedded client ``i`` holds the same samples)."""
    k, seed = node.num_partitions, config.seed
    if config.partition == "iid":
        parts = fldata.partition_iid(labels, k, seed)
    elif config.partition == "shards":
        parts = fldata.partition_shards(labels, k, config.shards_per_client, seed)
    else:
        parts = fldata.partition_dirichlet(labels, k, config.alpha, seed, min_size=MIN_SAMPLES)
    return parts[node.partition_id]


def _node_data(config: FlowerRunConfig, node: NodeSpec) -> tuple[torch.Tensor, torch.Tensor]:
    dataset, natural = fldata.load_federated(config.dataset, node.num_partitions, config.seed)
    idx = natural[node.partition_id] if natural is not None else \
        node_partition(config, node, dataset.train_y)
    return dataset.train_x[idx], dataset.train_y[idx]


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The node's config and how many samples it holds (what the selectors see)."""
    config = FlowerRunConfig.from_run_config(context.run_config)
    node = NodeSpec.from_node_config(context.node_config)
    _, train_y = _node_data(config, node)
    info = {**node.to_config(), "num-examples": int(train_y.shape[0])}
    return Message(RecordDict({"node": ConfigRecord(info)}), reply_to=msg)


def _faulty(reply: ClientReply, fault: str) -> ClientReply:
    if fault != "nan":
        return reply
    weights = {k: np.full_like(v, np.nan) if np.issubdtype(v.dtype, np.floating) else v
               for k, v in reply.weights.items()}
    return dataclasses.replace(reply, weights=weights)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = FlowerRunConfig.from_run_config(context.run_config)
    node = NodeSpec.from_node_config(context.node_config)
    instruction, digest = instruction_from_content(msg.content)
    if node.fault.startswith("delay:"):
        time.sleep(float(node.fault.split(":", 1)[1]))
    torch.set_num_threads(config.threads)
    spec = load_model_file(config.model_path)
    train_x, train_y = _node_data(config, node)
    reply = run_instruction(instruction, train_x, train_y, spec)
    reply = _faulty(reply, node.fault)
    if node.fault == "bad-digest":
        digest = "0" * len(digest)
    return Message(reply_to_content(reply, digest, node.key), reply_to=msg)
