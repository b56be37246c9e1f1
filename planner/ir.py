"""PlanGraph: the small IR every planner stage reads.

A PlanGraph is a topologically ordered tuple of nodes keyed by their ``torch.fx`` node
name. It carries what the planner needs and nothing that ties it to a live module:
op kind, a printable target, input edges, output shape, dtype and bytes. It is plain
data, so a graph can also come from a JSON file (see ``planner.graphio``) and a solver
never needs PyTorch.

``PlanGraph.validate()`` checks the invariants in the spirit of ``fx.Graph.lint``:
unique names, inputs defined before use, exactly one output node, sizes non-negative.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property

OPS = ("placeholder", "get_attr", "call_module", "call_function", "call_method", "output")


@dataclass(frozen=True)
class IRNode:
    """One value of the traced program."""

    name: str
    op: str
    target: str
    inputs: tuple[str, ...] = ()
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    output_bytes: int = 0
    module_type: str | None = None   # class of the innermost module that made the node
    module_path: str = ""            # its qualified name in the user's model ("" = root)
    source: str = ""                 # "file.py:LINE" of the user's code that made it

    @property
    def where(self) -> str:
        """Where the user wrote this node: module path and source line, for messages."""
        parts = [self.module_path or "<root>"]
        if self.source:
            parts.append(self.source)
        return " ".join(parts)

    def to_json(self) -> dict:
        return {"name": self.name, "op": self.op, "target": self.target,
                "inputs": list(self.inputs),
                "shape": list(self.shape) if self.shape is not None else None,
                "dtype": self.dtype, "output_bytes": self.output_bytes,
                "module_type": self.module_type, "module_path": self.module_path,
                "source": self.source}


class GraphInvariantError(ValueError):
    """A PlanGraph breaks an invariant; the message names the node and how to fix it."""


@dataclass(frozen=True)
class PlanGraph:
    """Nodes in topological order plus a name; derived indexes are cached."""

    nodes: tuple[IRNode, ...]
    name: str = "model"
    notes: tuple[str, ...] = field(default=())
    structure_hash: str | None = None  # set by tracing: graph and parameter shapes

    @cached_property
    def index(self) -> dict[str, int]:
        return {node.name: i for i, node in enumerate(self.nodes)}

    @cached_property
    def users(self) -> dict[str, tuple[str, ...]]:
        users: dict[str, list[str]] = {node.name: [] for node in self.nodes}
        for node in self.nodes:
            for name in node.inputs:
                if name in users:
                    users[name].append(node.name)
        return {name: tuple(found) for name, found in users.items()}

    def node(self, name: str) -> IRNode:
        return self.nodes[self.index[name]]

    def __len__(self) -> int:
        return len(self.nodes)

    @cached_property
    def fingerprint(self) -> str:
        """A stable hash of the model's structure, independent of the batch size.

        For a captured model: the graph (names, ops, targets, edges) and the parameter
        names and shapes (``structure_hash``), so a plan can be checked against a model
        without running it. Otherwise: nodes, edges and non-batch shapes.
        """
        if self.structure_hash:
            return self.structure_hash
        digest = hashlib.sha256()
        for node in self.nodes:
            shape = list(node.shape[1:]) if node.shape else None
            digest.update(json.dumps([node.name, node.op, node.target, list(node.inputs),
                                      shape, node.dtype]).encode())
        return digest.hexdigest()[:16]

    def validate(self) -> PlanGraph:
        """Check the invariants; return self so calls chain."""
        seen: set[str] = set()
        outputs = 0
        for position, node in enumerate(self.nodes):
            if node.op not in OPS:
                raise GraphInvariantError(
                    f"node {node.name!r} has op {node.op!r}; expected one of {', '.join(OPS)}")
            if node.name in seen:
                raise GraphInvariantError(
                    f"node name {node.name!r} appears twice; names must be unique")
            for name in node.inputs:
                if name not in seen:
                    raise GraphInvariantError(
                        f"node {node.name!r} (position {position}) uses {name!r} before it is "
                        f"defined; nodes must be in topological order")
            if node.output_bytes < 0:
                raise GraphInvariantError(
                    f"node {node.name!r} has negative output_bytes {node.output_bytes}")
            if node.op == "output":
                outputs += 1
                if position != len(self.nodes) - 1:
                    raise GraphInvariantError(
                        f"output node {node.name!r} must be last; found at {position}")
            seen.add(node.name)
        if outputs != 1:
            raise GraphInvariantError(f"expected exactly one output node; found {outputs}")
        return self

    def to_json(self) -> dict:
        return {"name": self.name, "notes": list(self.notes),
                "nodes": [node.to_json() for node in self.nodes]}
