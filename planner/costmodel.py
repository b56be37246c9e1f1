"""The cost model as plain data: what every node of a PlanGraph costs in bytes and seconds.

Torch-free, so the solvers, the simulator and the step program read it without PyTorch;
``planner.cost`` measures it (on this machine) and ``analytic_costs`` rescales it for
another device.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cached_property

LOSS = "__loss__"


@dataclass(frozen=True)
class CompressCost:
    """What compressing node ``node``'s output storage ``storage`` costs, per option."""

    node: str
    storage: str
    shape: tuple[int, ...]
    packed_bytes: Mapping[str, int]      # option -> bytes held while packed (upper bound)
    pack_seconds: Mapping[str, float]
    unpack_seconds: Mapping[str, float]
    rel_error: Mapping[str, float]       # ||x - Q(x)||^2 / ||x||^2 on the measured batch

    def seconds(self, option: str) -> float:
        return self.pack_seconds[option] + self.unpack_seconds[option]

    def to_json(self) -> dict:
        return {"node": self.node, "storage": self.storage, "shape": list(self.shape),
                "packed_bytes": dict(self.packed_bytes),
                "pack_seconds": dict(self.pack_seconds),
                "unpack_seconds": dict(self.unpack_seconds),
                "rel_error": dict(self.rel_error)}

    @classmethod
    def from_json(cls, data: dict) -> CompressCost:
        return cls(node=data["node"], storage=data["storage"], shape=tuple(data["shape"]),
                   packed_bytes={k: int(v) for k, v in data["packed_bytes"].items()},
                   pack_seconds=dict(data["pack_seconds"]),
                   unpack_seconds=dict(data["unpack_seconds"]),
                   rel_error=dict(data["rel_error"]))



@dataclass(frozen=True)
class Storage:
    """A block of memory: ``kind`` is ``activation`` (a node's output), ``internal``
    (a tensor a node saved for backward that no other node sees) or ``input``."""

    key: str
    nbytes: int
    producer: str
    kind: str


@dataclass(frozen=True)
class NodeCost:
    """Costs of one node (or of the loss, under the name ``__loss__``)."""

    name: str
    outputs: tuple[str, ...] = ()        # storage keys its output tensors live in
    allocates: tuple[str, ...] = ()      # storages it creates (subset of outputs + internal)
    saved: tuple[str, ...] = ()          # storages autograd saves in this node
    forward_seconds: float = 0.0
    flops: int = 0
    temp_bytes: int = 0                  # allocated and freed again inside the node
    backward_temp_bytes: int = 0         # the same, inside the node's backward
    grad_aliases: bool = False           # its backward returns views of its output's grad
    grad_shares: bool = False            # ... or the very same tensor (add, identity)
    requires_grad: bool = False          # its output takes part in backward
    params: tuple[str, ...] = ()         # trainable parameters it uses
    mutates: tuple[str, ...] = ()        # input nodes it modifies in place
    random: bool = False                 # draws random numbers (dropout)

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class CostModel:
    """Per-node costs plus the fixed costs of one training step, in bytes and seconds."""

    nodes: tuple[NodeCost, ...]
    storages: tuple[Storage, ...]
    params: tuple[tuple[str, int], ...]  # (key, bytes) of trainable parameters
    param_bytes: int                     # every parameter, trainable or not
    buffer_bytes: int
    input_bytes: int                     # inputs and targets, held by the caller
    optimizer: str
    optimizer_state_bytes: int
    optimizer_step_temp_bytes: int
    batch_size: int
    mode: str = "measured"
    device_speed: float = 1.0
    region_bytes: int = 0                # held per checkpoint region: its saved RNG state
    compress: tuple = ()                 # CompressCost per compressible node (compression.py)

    @cached_property
    def node(self) -> dict[str, NodeCost]:
        return {cost.name: cost for cost in self.nodes}

    @cached_property
    def storage(self) -> dict[str, Storage]:
        return {item.key: item for item in self.storages}

    @property
    def grad_bytes(self) -> int:
        return sum(size for _, size in self.params)

    @property
    def fixed_bytes(self) -> int:
        """Held at the start of a step: parameters, buffers, optimizer state, the batch."""
        return (self.param_bytes + self.buffer_bytes + self.optimizer_state_bytes
                + self.input_bytes)

    def saved_bytes(self, name: str) -> int:
        return sum(self.storage[key].nbytes for key in self.node[name].saved)

    def to_json(self) -> dict:
        return {
            "mode": self.mode, "device_speed": self.device_speed,
            "batch_size": self.batch_size, "optimizer": self.optimizer,
            "param_bytes": self.param_bytes, "buffer_bytes": self.buffer_bytes,
            "input_bytes": self.input_bytes, "grad_bytes": self.grad_bytes,
            "optimizer_state_bytes": self.optimizer_state_bytes,
            "optimizer_step_temp_bytes": self.optimizer_step_temp_bytes,
            "region_bytes": self.region_bytes,
            "params": [list(p) for p in self.params],
            "storages": [s.__dict__ for s in self.storages],
            "nodes": [n.to_json() for n in self.nodes],
            "compress": [item.to_json() for item in self.compress],
        }

    @classmethod
    def from_json(cls, data: dict) -> CostModel:
        nodes = tuple(NodeCost(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in item.items()}) for item in data["nodes"])
        return cls(nodes=nodes, storages=tuple(Storage(**s) for s in data["storages"]),
                   params=tuple((k, int(v)) for k, v in data["params"]),
                   param_bytes=data["param_bytes"], buffer_bytes=data["buffer_bytes"],
                   input_bytes=data["input_bytes"], optimizer=data["optimizer"],
                   optimizer_state_bytes=data["optimizer_state_bytes"],
                   optimizer_step_temp_bytes=data["optimizer_step_temp_bytes"],
                   batch_size=data["batch_size"], mode=data.get("mode", "measured"),
                   device_speed=data.get("device_speed", 1.0),
                   region_bytes=data.get("region_bytes", 0),
                   compress=tuple(CompressCost.from_json(item)
                                  for item in data.get("compress", ())))


def analytic_costs(costs: CostModel, *, flops_per_second: float, device_speed: float = 1.0
                   ) -> CostModel:
    """The same bytes with seconds from FLOPs: ``flops / (flops_per_second * speed)``.

    Nodes without FLOPs (views, elementwise ops the counter ignores) get a time from
    the bytes they write at an assumed 1 byte per FLOP-second ratio, so recomputing
    them is never free.
    """
    rate = flops_per_second * device_speed
    storage = costs.storage
    nodes = []
    for node in costs.nodes:
        written = sum(storage[key].nbytes for key in node.allocates)
        nodes.append(replace(node, forward_seconds=(node.flops + written) / rate))
    return replace(costs, nodes=tuple(nodes), mode="analytic", device_speed=device_speed)
