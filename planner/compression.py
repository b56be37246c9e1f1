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

import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.fx

from .costmodel import CompressCost, CostModel
from .ir import PlanGraph
from .packing import (  # noqa: F401  (re-exported: the options live in planner.packing)
    COMPRESS,
    FLOAT_DTYPES,
    GROUP_SIZE,
    MIN_ELEMENTS,
    OPTIONS,
    Option,
    allowed_options,
    compress_error,
    compress_seconds,
    eligible,
    option_of,
    packed_bound,
    packed_sizes,
)


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
