"""Read a captured GraphModule into a PlanGraph (our IR).

Shapes and sizes come from running the graph once on the example inputs (on a copy, so
the user's BatchNorm statistics are untouched); module paths and source lines come from
the metadata ``planner.capture`` wrote into ``node.meta``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from .capture import META_MODULE, META_SOURCE
from .ir import IRNode, PlanGraph


def target_text(node: torch.fx.Node) -> str:
    """A printable, stable name of what a node calls (``aten.conv2d.default``)."""
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[-1]}.{target._overloadname}"
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", repr(target))
    return f"{module}.{name}" if module else name


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(item) for item in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    return 0


def structure_fingerprint(graph_module: torch.fx.GraphModule) -> str:
    """Hash of the captured graph and the parameter and buffer shapes: what a plan binds to."""
    digest = hashlib.sha256()
    for node in graph_module.graph.nodes:
        digest.update(json.dumps([node.name, node.op, target_text(node),
                                  [n.name for n in node.all_input_nodes]]).encode())
    for name, tensor in list(graph_module.named_parameters()) + list(
            graph_module.named_buffers()):
        digest.update(json.dumps([name, list(tensor.shape), str(tensor.dtype),
                                  bool(tensor.requires_grad)]).encode())
    return digest.hexdigest()[:16]


def build_plan_graph(graph_module: torch.fx.GraphModule, flat_inputs: Sequence[Any], *,
                     name: str = "model", notes: Sequence[str] = ()) -> PlanGraph:
    """Run ``graph_module`` once on ``flat_inputs`` and read it into a PlanGraph."""
    values: dict[str, Any] = {}

    class _Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            values[n.name] = result
            return result

    with torch.no_grad():
        _Recorder(graph_module).run(*flat_inputs)
    nodes = []
    for node in graph_module.graph.nodes:
        value = values.get(node.name)
        inputs = tuple(dict.fromkeys(n.name for n in node.all_input_nodes))
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        dtype = str(value.dtype).replace("torch.", "") if isinstance(value, torch.Tensor) else None
        module_path, module_type = node.meta.get(META_MODULE, ("", None))
        nodes.append(IRNode(
            name=node.name, op=node.op, target=target_text(node), inputs=inputs,
            shape=shape, dtype=dtype,
            output_bytes=0 if node.op == "output" else _tensor_bytes(value),
            module_type=module_type, module_path=module_path,
            source=node.meta.get(META_SOURCE, "")))
    return PlanGraph(nodes=tuple(nodes), name=name, notes=tuple(notes),
                     structure_hash=structure_fingerprint(graph_module)).validate()
