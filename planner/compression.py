"""Compression as a plan decision: the options, who may be compressed, what it costs.

A node whose decision is ``compress:OPTION`` keeps the activation it produces for
backward in packed form (``fedplan.kernels``): packed once per storage when autograd
first saves it, unpacked when backward needs it. Options:

=========  ===========================================================================
``8``      8-bit codes, per-group (256 elements) min/max
``4``      4-bit codes, per-group
``2``      2-bit codes, per-group
``mixed4`` channel-wise mixed: each channel (dim 1) gets 2, 4 or 8 bits from its range so
           that the mean is at most 4 bits (rule: ``kernels._common.allocate_mixed_bits``)
``mixed3`` the same with a mean of at most 3 bits
=========  ===========================================================================

Which activations may be compressed (``eligible``): the single floating-point output of a
compute node that owns its storage (not a view of another node's), of at least
``MIN_ELEMENTS`` elements, not read by the loss. Parameters, model inputs, masks and
indices are never compressed.

The cost of a choice is measured on this machine (``measure_compression``): on the
node's real output from one forward pass, the packed size, the seconds to pack and to
unpack, and the relative error ``||x - Q(x)||^2 / ||x||^2`` (the quantisation noise power
relative to the signal). The planner's error term is that relative error summed over
the compressed tensors (see ``planner.solvers``); it is an estimate of the gradient error
compression introduces, not a bound on it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx

from .cost import CostModel
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


def storage_order(tensor: torch.Tensor) -> torch.Tensor | None:
    """``tensor`` with its dims permuted so that it is contiguous (its storage's order).

    A dense output such as a transposed attention result is packed in the order of its
    storage, so every view of the storage can be rebuilt from the unpacked copy with its
    own strides. None when no permutation makes it contiguous (a strided slice).
    """
    if tensor.is_contiguous():
        return tensor
    order = sorted(range(tensor.dim()), key=lambda d: (-tensor.stride(d), -tensor.size(d)))
    permuted = tensor.permute(order)
    return permuted if permuted.is_contiguous() else None


class _Capture(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, wanted: set[str]):
        super().__init__(gm)
        self.wanted = wanted
        self.captured: dict[str, torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node):
        result = super().run_node(n)
        if n.name in self.wanted and isinstance(result, torch.Tensor):
            self.captured[n.name] = result.detach()
        return result


def _median_seconds(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_compression(graph_module: torch.fx.GraphModule, graph: PlanGraph,
                        costs: CostModel, inputs: Sequence[torch.Tensor], *,
                        repeats: int = 3, options: Sequence[str] = tuple(OPTIONS),
                        progress: Callable[[str], None] | None = None
                        ) -> tuple[CompressCost, ...]:
    """Measure every eligible node's compression options on its real output.

    ``graph_module`` is run once without autograd (pass a copy: BatchNorm statistics of a
    module in training mode are updated by the run).
    """
    from fedplan.kernels import dequantize, quantize

    nodes = eligible(graph, costs)
    if not nodes:
        return ()
    say = progress or (lambda _m: None)
    say(f"measuring compression of {len(nodes)} activations")
    capture = _Capture(graph_module, set(nodes))
    with torch.no_grad():
        capture.run(*inputs)
    result = []
    for name, key in nodes.items():
        x = capture.captured.get(name)
        if x is None or not x.is_floating_point():
            continue
        x = storage_order(x)  # packed in the order of its storage, as the runtime does
        if x is None:
            continue
        norm = float(x.double().pow(2).sum()) or 1.0
        packed, pack_s, unpack_s, error = {}, {}, {}, {}
        for option_name in options:
            option = OPTIONS[option_name]
            args = option.kernel_args()
            p = quantize(x, **args)
            out = torch.empty_like(x)
            pack_s[option_name] = _median_seconds(lambda a=args, x=x: quantize(x, **a), repeats)
            unpack_s[option_name] = _median_seconds(lambda p=p: dequantize(p), repeats)
            dequantize(p, out=out)
            error[option_name] = float((x.double() - out.double()).pow(2).sum()) / norm
            packed[option_name] = max(p.nbytes(), packed_bound(x.shape, option))
        result.append(CompressCost(node=name, storage=key, shape=tuple(x.shape),
                                   packed_bytes=packed, pack_seconds=pack_s,
                                   unpack_seconds=unpack_s, rel_error=error))
    return tuple(result)
