"""Trace a model with ``torch.fx.symbolic_trace`` into a GraphModule and a PlanGraph.

Failures become a one-line :class:`TraceError` that names the innermost module being
traced, the construct fx could not follow (with the user's file and line) and what to
do: mark that submodule as a leaf (``leaf_modules=`` in the API, ``--leaf`` in the CLI)
or rewrite the construct.

``torch.utils.checkpoint`` calls inside the model are traced through (fx would
otherwise drop them silently): fedplan plans the whole graph itself and discloses each
call in ``PlanGraph.notes``.
"""

from __future__ import annotations

import contextlib
import traceback
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx
import torch.utils.checkpoint
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import TraceError
from .ir import IRNode, PlanGraph


class _Tracer(torch.fx.Tracer):
    """A Tracer that keeps user-named leaves whole and remembers where it is."""

    def __init__(self, leaf_names: set[str], leaf_types: tuple[type, ...]):
        super().__init__()
        self.leaf_names = leaf_names
        self.leaf_types = leaf_types
        self.fedplan_stack: list[tuple[str, str]] = []
        self.failed_in: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        qualified = self.path_of_module(m)
        self.fedplan_stack.append((qualified, type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module sees the exception first
                self.failed_in = self.fedplan_stack[-1]
            raise
        finally:
            self.fedplan_stack.pop()


def _split_leaves(leaf_modules: Iterable[Any]) -> tuple[set[str], tuple[type, ...]]:
    names: set[str] = set()
    types: list[type] = []
    for leaf in leaf_modules or ():
        if isinstance(leaf, str):
            names.add(leaf)
        elif isinstance(leaf, type) and issubclass(leaf, nn.Module):
            types.append(leaf)
        else:
            raise TypeError(f"leaf_modules entries must be qualified names or nn.Module "
                            f"classes; found {leaf!r}")
    return names, tuple(types)


def _user_frame(exc: BaseException) -> str:
    """The innermost frame of the traceback that is not inside torch or fedplan."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and "/planner/" not in path and "/fedplan/" not in path:
            return f"{frame.filename}:{frame.lineno} ({(frame.line or '').strip()})"
    return ""


@contextlib.contextmanager
def _disclose_checkpoints(tracer: _Tracer, notes: list[str]):
    """Trace through torch.utils.checkpoint calls and record where they were."""
    original = torch.utils.checkpoint.checkpoint

    def traced_checkpoint(function, *args, **kwargs):
        where = tracer.fedplan_stack[-1][0] if tracer.fedplan_stack else "<root>"
        notes.append(
            f"model calls torch.utils.checkpoint in module {where or '<root>'!r}; fedplan "
            f"traces through it and decides recomputation for the whole graph itself")
        for key in ("use_reentrant", "context_fn", "determinism_check", "debug",
                    "preserve_rng_state"):
            kwargs.pop(key, None)
        return function(*args, **kwargs)

    torch.utils.checkpoint.checkpoint = traced_checkpoint
    try:
        yield
    finally:
        torch.utils.checkpoint.checkpoint = original


def symbolic_trace(model: nn.Module, *, leaf_modules: Sequence[Any] = ()
                   ) -> tuple[torch.fx.GraphModule, list[str]]:
    """Trace ``model`` into a GraphModule sharing its submodules and parameters."""
    names, types = _split_leaves(leaf_modules)
    tracer = _Tracer(names, types)
    notes: list[str] = []
    try:
        with _disclose_checkpoints(tracer, notes):
            graph = tracer.trace(model)
    except Exception as exc:
        where = tracer.failed_in or ("", type(model).__name__)
        module_name = where[0] or "<root>"
        frame = _user_frame(exc)
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = (f"mark it as a leaf (leaf_modules=[{where[0]!r}] or --leaf {where[0]})"
                if where[0] else "move the construct into a submodule and mark it as a leaf")
        raise TraceError(
            f"torch.fx cannot trace module {module_name!r} ({where[1]}): {detail}"
            + (f" at {frame}" if frame else "")
            + f"; {hint}, or rewrite the construct "
            f"(see https://pytorch.org/docs/stable/fx.html#limitations-of-symbolic-tracing)"
        ) from exc
    graph_module = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return graph_module, notes


def _target_text(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
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
    """Hash of the traced graph and the parameter and buffer shapes: what a plan binds to."""
    import hashlib
    import json

    digest = hashlib.sha256()
    for node in graph_module.graph.nodes:
        digest.update(json.dumps([node.name, node.op, _target_text(node),
                                  [n.name for n in node.all_input_nodes]]).encode())
    for name, tensor in list(graph_module.named_parameters()) + list(
            graph_module.named_buffers()):
        digest.update(json.dumps([name, list(tensor.shape), str(tensor.dtype)]).encode())
    return digest.hexdigest()[:16]


def build_plan_graph(graph_module: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor],
                     *, name: str = "model", notes: Sequence[str] = ()) -> PlanGraph:
    """Propagate shapes with the example inputs and read the fx graph into a PlanGraph."""
    values: dict[str, Any] = {}

    class _Recorder(ShapeProp):
        def run_node(self, n):
            result = super().run_node(n)
            values[n.name] = result
            return result

    with torch.no_grad():
        _Recorder(graph_module).propagate(*example_inputs)
    nodes = []
    modules = dict(graph_module.named_modules())
    for node in graph_module.graph.nodes:
        value = values.get(node.name)
        inputs = tuple(dict.fromkeys(n.name for n in node.all_input_nodes))
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        dtype = str(value.dtype).replace("torch.", "") if isinstance(value, torch.Tensor) else None
        module_type = (type(modules[node.target]).__name__
                       if node.op == "call_module" and node.target in modules else None)
        nodes.append(IRNode(
            name=node.name, op=node.op, target=_target_text(node), inputs=inputs,
            shape=shape, dtype=dtype,
            output_bytes=0 if node.op == "output" else _tensor_bytes(value),
            module_type=module_type))
    return PlanGraph(nodes=tuple(nodes), name=name, notes=tuple(notes),
                     structure_hash=structure_fingerprint(graph_module)).validate()
