"""Compression options as plain data: which option a decision names, who may be
compressed, and what a choice costs in bytes, seconds and error (torch-free).

``planner.compression`` measures the costs; the options are described there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .costmodel import CostModel
from .ir import PlanGraph

COMPRESS = "compress"
GROUP_SIZE = 256
MIN_ELEMENTS = 4096
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "torch.float32", "torch.float16",
                "torch.bfloat16")


@dataclass(frozen=True)
class Option:
    name: str
    bits: int            # code width ("group"), or the mean width bound ("mixed")
    mode: str            # group | mixed
    target_bits: float | None = None

    @property
    def decision(self) -> str:
        return f"{COMPRESS}:{self.name}"

    def kernel_args(self) -> dict:
        if self.mode == "group":
            return {"bits": self.bits, "mode": "group", "group_size": GROUP_SIZE}
        return {"bits": self.bits, "mode": "mixed", "target_bits": self.target_bits}


OPTIONS: dict[str, Option] = {
    "8": Option("8", 8, "group"),
    "4": Option("4", 4, "group"),
    "2": Option("2", 2, "group"),
    "mixed4": Option("mixed4", 4, "mixed", 4.0),
    "mixed3": Option("mixed3", 3, "mixed", 3.0),
}


def option_of(decision: str) -> Option | None:
    """The Option of a ``compress:NAME`` decision, None for keep/recompute."""
    if not decision.startswith(COMPRESS + ":"):
        return None
    name = decision.split(":", 1)[1]
    if name not in OPTIONS:
        raise ValueError(f"unknown compression option {name!r} in decision {decision!r}; "
                         f"valid: {', '.join(OPTIONS)}")
    return OPTIONS[name]


def allowed_options(min_bits: int = 4, max_error: float | None = None) -> tuple[str, ...]:
    """Option names whose (mean) width is at least ``min_bits``."""
    if min_bits not in (2, 3, 4, 8):
        raise ValueError(f"min_bits must be 2, 3, 4 or 8; found {min_bits}")
    return tuple(name for name, option in OPTIONS.items() if option.bits >= min_bits)


def packed_bound(shape: Sequence[int], option: Option) -> int:
    """Upper bound of the packed bytes of a tensor of ``shape`` (non-finite table aside)."""
    numel = math.prod(shape)
    if option.mode == "group":
        groups = -(-numel // GROUP_SIZE)
        return (numel * option.bits + 7) // 8 + 8 * groups
    channels = shape[1] if len(shape) >= 2 else 1
    per_channel = numel // max(channels, 1)
    bit_budget = math.floor(option.target_bits * channels + 1e-9)
    codes = (per_channel * bit_budget) // 8 + channels
    return codes + 9 * channels  # + scale, zero (float32) and width (uint8) per channel


def eligible(graph: PlanGraph, costs: CostModel) -> dict[str, str]:
    """Compute nodes whose output may be compressed: node -> its output storage key."""
    storage = costs.storage
    loss_reads: set[str] = set()
    for inp in graph.nodes[-1].inputs:
        loss_reads.update(costs.node[inp].outputs if inp in costs.node else ())
    saved: set[str] = set()
    for cost in costs.nodes:
        saved.update(cost.saved)
    result = {}
    for node in graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        cost = costs.node.get(node.name)
        if cost is None or len(cost.outputs) != 1 or node.dtype not in FLOAT_DTYPES:
            continue
        key = cost.outputs[0]
        item = storage.get(key)
        if (item is None or item.kind == "input" or item.producer != node.name
                or key not in cost.allocates or key in loss_reads or node.shape is None):
            continue
        if math.prod(node.shape) < MIN_ELEMENTS or item.nbytes != node.output_bytes:
            continue
        if key not in saved and not _read_by_compute(graph, node.name):
            continue
        result[node.name] = key
    return result


def _read_by_compute(graph: PlanGraph, name: str) -> bool:
    return any(name in node.inputs for node in graph.nodes
               if node.op in ("call_module", "call_function", "call_method"))


def packed_sizes(costs: CostModel, decisions: Mapping[str, str]) -> dict[str, int]:
    """Storage key -> packed bytes, for the nodes ``decisions`` compresses."""
    by_node = {item.node: item for item in costs.compress}
    sizes = {}
    for name, decision in decisions.items():
        option = option_of(decision)
        if option is None:
            continue
        item = by_node.get(name)
        if item is None:
            raise ValueError(f"node {name!r} is not compressible in this cost model "
                             f"(decision {decision!r})")
        sizes[item.storage] = item.packed_bytes[option.name]
    return sizes


def compress_seconds(costs: CostModel, decisions: Mapping[str, str]) -> float:
    by_node = {item.node: item for item in costs.compress}
    return sum(by_node[name].seconds(option_of(d).name) for name, d in decisions.items()
               if option_of(d) is not None and name in by_node)


def compress_error(costs: CostModel, decisions: Mapping[str, str]) -> float:
    by_node = {item.node: item for item in costs.compress}
    return sum(by_node[name].rel_error[option_of(d).name] for name, d in decisions.items()
               if option_of(d) is not None and name in by_node)


