"""Where a model can be cut into blocks: articulation points of its graph.

A **cut** follows a node of the model's data-flow graph through which exactly one tensor
passes from everything before it to everything after it: every path from the input to
the output goes through that tensor (an articulation point of the graph ordered as the
forward runs). Only then can the blocks before the cut run on their own (frozen, under
``no_grad``, or on a device) and hand one tensor to the blocks after it (in training, or
on an edge server). A cut inside a skip connection (a residual add, a U-Net's encoder
feature kept for its decoder) would have two tensors crossing: it is never offered.

**The graph** is ``torch.fx.symbolic_trace`` of the model (module calls kept as
``call_module`` nodes over the model's own submodules). Why not fedplan's capture
(``torch.export``'s training IR): its graph is specialised to the example batch's shapes
and bakes training-mode BatchNorm and dropout into ATen calls, and the blocks cut from it
must also run the evaluation batches (another size) in eval mode. The fx pieces call the
user's modules, so they share their parameters and buffers, follow ``train()``/``eval()``
and take any batch size. A model fx cannot trace (control flow on a tensor's value) gets
one line saying so (:class:`~fedplan.errors.BadInputError`); build it as
``nn.Sequential`` instead. Each block's memory is measured with fedplan's own planner
(:func:`.blocks.block_profile`), which captures the block with ``torch.export``.

**Units and blocks.** The cuts split the graph into *units* (the nodes between two
consecutive cuts); each unit becomes a ``GraphModule`` over the user's modules. Blocks
group units by the **top-level child** each node belongs to (the first name of its module
path, from ``nn_module_stack``, a ``call_module`` target or a ``get_attr`` target), or by
the child's own children when the top-level child is a container (``nn.Sequential``,
``nn.ModuleList``, ``nn.ModuleDict``) of blocks, such as MobileNetV2's ``features`` or a
ViT's ``blocks``, which would otherwise be one block holding most of the model (a
container of plain layers, VGG's ``features``, stays one owner). A block is the units
of one or more consecutive such owners, so an owner's parameters are never split between
blocks; an owner used again later (weight sharing) merges everything between its uses
into one block. Units of root-level operations only
(``torch.relu`` or a pooling written in the model's own ``forward``) join the *following*
block: the pooling and flattening before a classifier belong to the classifier's block,
as in the packaged models (chosen before any run; either side would be a valid cut).
A block is an ``nn.Sequential`` of its units, so "the last sub-layers of the previous
block" (NeuLite's co-adaptation) is its last unit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from fedplan.errors import BadInputError

__all__ = ["Cut", "cut_points", "graph_blocks", "trace"]


@dataclass(frozen=True)
class Cut:
    """A place where the model can be cut: after the node at ``index``, with ``node``'s
    output the one tensor that crosses (usually the node at ``index`` itself; an earlier
    one when the nodes after it only changed it in place or produced nothing read)."""

    index: int
    """Position of the cut among the graph's nodes (placeholder included): the nodes up
    to ``index`` are before it."""
    node: str
    """The fx node whose tensor crosses."""
    owner: str
    """Top-level child that made the tensor ('' for an operation in the root forward)."""
    shape: tuple[int, ...]
    """The crossing tensor's shape on the example input."""


def trace(model: nn.Module, example: torch.Tensor, strategy: str = "block-wise training"
          ) -> torch.fx.GraphModule:
    """``model``'s fx graph with each tensor's shape on ``example`` in ``node.meta``
    (propagated in eval mode under ``no_grad``: no BatchNorm statistics change)."""
    try:
        graph_module = torch.fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise BadInputError(
            f"{strategy} cuts a model into blocks along its torch.fx graph, and fx cannot "
            f"trace {type(model).__name__} ({type(exc).__name__}: {first}); build the model "
            "as nn.Sequential(block1, block2, ...)") from exc
    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise BadInputError(f"{strategy} needs a model with one input tensor; "
                            f"{type(model).__name__}.forward takes {len(placeholders)}")
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(graph_module).propagate(example)
    finally:
        for module, mode in modes.items():
            module.training = mode
    return graph_module


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _owner(node: torch.fx.Node, containers: frozenset[str] = frozenset()) -> str:
    """The top-level child a node belongs to (a child of it when the top-level child is a
    container in ``containers``); ``"param:NAME"`` for a parameter or buffer of the root
    module itself; '' for an operation in the root ``forward``."""
    if node.op in ("call_module", "get_attr"):
        path = str(node.target)
        if "." not in path and node.op == "get_attr":
            return f"param:{path}"
    else:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            return ""
        path = str(list(stack.values())[-1][0])  # the innermost module
    parts = path.split(".")
    depth = 2 if parts[0] in containers and len(parts) > 1 else 1
    return ".".join(parts[:depth])


def _containers(model: nn.Module) -> frozenset[str]:
    """Top-level children that are stacks of blocks (an ``nn.Sequential``,
    ``nn.ModuleList`` or ``nn.ModuleDict`` with a child that has children itself): their
    children are the units of ownership (module doc). A container of plain layers (VGG's
    ``features``: convolutions, ReLUs, poolings) stays one owner."""
    return frozenset(name for name, child in model.named_children()
                     if isinstance(child, _CONTAINERS)
                     and any(next(c.children(), None) is not None for c in child.children()))


def _depends_on_input(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Nodes whose value depends on the input (activations); the rest are constants
    (parameters read with ``get_attr`` and what is computed from them alone)."""
    out: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in out for a in node.all_input_nodes):
            out.add(node)
    return out


def cut_points(graph_module: torch.fx.GraphModule) -> list[Cut]:
    """Every cut of a traced model (:func:`trace`): after each activation node whose
    tensor is the only one that later nodes read from earlier ones."""
    nodes = [n for n in graph_module.graph.nodes if n.op != "output"]
    position = {n: i for i, n in enumerate(nodes)}
    active = _depends_on_input(graph_module.graph)
    output = next(n for n in graph_module.graph.nodes if n.op == "output")
    # the last position at which each activation is read (the output counts as the end)
    last_read = {}
    for node in nodes:
        if node not in active:
            continue
        reads = [position.get(user, len(nodes)) for user in node.users]
        last_read[node] = max(reads, default=position[node])
    by_tensor: dict[torch.fx.Node, Cut] = {}
    for i in range(len(nodes) - 1):
        if nodes[i] not in active:
            continue  # a constant (a parameter read) goes with the unit that reads it
        crossing = [a for a in last_read if position[a] <= i < last_read[a]]
        if len(crossing) != 1 or crossing[0].op == "placeholder":
            continue  # more than one value crosses (a skip), or nothing was done yet
        tensor = crossing[0]
        meta = tensor.meta.get("tensor_meta")
        if not hasattr(meta, "shape") or tensor in output.all_input_nodes:
            continue  # not one tensor, or the model's result (the end, not a cut)
        if any(position[user] > i for user in _written_in_place(tensor)):
            continue
        # the latest position with this tensor crossing: nodes that only changed it in
        # place, or made nothing later read, stay before the cut
        by_tensor[tensor] = Cut(index=i, node=tensor.name, owner=_owner(tensor),
                                shape=tuple(int(s) for s in meta.shape))
    return sorted(by_tensor.values(), key=lambda c: c.index)


def _written_in_place(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Readers that change ``node``'s tensor in place (``x.relu_()``, ``x += y``, a module
    built with ``inplace=True``). A cut before one would let the block after it write
    into the previous block's output (on an edge server, into a leaf that requires grad,
    which autograd refuses): such a cut is not offered."""
    import operator
    in_place = {operator.iadd, operator.isub, operator.imul, operator.itruediv}
    out = []
    for user in node.users:
        first = bool(user.args) and user.args[0] is node
        if user.op == "call_method" and str(user.target).endswith("_") and first:
            out.append(user)
        elif user.op == "call_function" and user.target in in_place and first:
            out.append(user)
        elif user.op == "call_module" and getattr(
                user.graph.owning_module.get_submodule(str(user.target)), "inplace", False):
            out.append(user)
        elif user.kwargs.get("inplace") is True:
            out.append(user)
    return out


def _unit(graph_module: torch.fx.GraphModule, nodes: list[torch.fx.Node],
          start: torch.fx.Node | None, end: torch.fx.Node) -> torch.fx.GraphModule:
    """A GraphModule of ``nodes`` taking ``start``'s tensor (the model's input when
    None) and returning ``end``'s; constants from earlier units are copied in."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    source = start if start is not None else next(
        n for n in graph_module.graph.nodes if n.op == "placeholder")
    env[source] = graph.placeholder("x")
    mine = set(nodes)

    def copy(node: torch.fx.Node) -> torch.fx.Node:
        if node not in env:
            for arg in node.all_input_nodes:
                if arg not in env:
                    if arg in mine or arg.op == "placeholder":
                        raise AssertionError(f"{arg.name} is read before it is made")
                    copy(arg)  # a constant made in an earlier unit
            env[node] = graph.node_copy(node, lambda n: env[n] if n in env else copy(n))
        return env[node]

    for node in nodes:
        if node.op != "placeholder":
            copy(node)
    graph.output(env[end])
    graph.lint()
    return torch.fx.GraphModule(graph_module, graph, "Unit")


def graph_blocks(model: nn.Module, example: torch.Tensor,
                 strategy: str = "block-wise training") -> list[nn.Module]:
    """``model`` cut into blocks (see the module doc): each an ``nn.Sequential`` of units
    that call ``model``'s own submodules."""
    graph_module = trace(model, example, strategy)
    cuts = cut_points(graph_module)
    nodes = [n for n in graph_module.graph.nodes if n.op != "output"]
    output = next(n for n in graph_module.graph.nodes if n.op == "output")
    results = output.args[0]
    if not isinstance(results, torch.fx.Node):
        raise BadInputError(f"{strategy} needs a model that returns one tensor; "
                            f"{type(model).__name__} returns {type(results).__name__}")
    by_name = {n.name: n for n in nodes}
    containers = _containers(model)
    bounds = [-1] + [c.index for c in cuts] + [len(nodes) - 1]
    tensors = [None] + [by_name[c.node] for c in cuts] + [results]
    units = []  # (nodes, start node, end node, owners)
    for j, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        part = nodes[lo + 1:hi + 1]
        owned = {_owner(n, containers) for n in part} - {""}
        units.append((part, tensors[j], tensors[j + 1], owned))
    groups: list[list[int]] = []        # unit indices per block
    owners: list[set[str]] = []
    pending: list[int] = []             # root-level units waiting for the next block
    pending_owners: set[str] = set()    # the root's own parameters they read

    def place(units_: list[int], tags: set[str], new_block: bool) -> None:
        shared = [g for g, o in enumerate(owners) if o & tags]
        if shared:  # joins the earliest block that holds one of its modules or tensors
            first = shared[0]
            merged = [i for g in groups[first:] for i in g] + units_
            groups[first:], owners[first:] = [merged], [set().union(*owners[first:], tags)]
        elif new_block or not groups:
            groups.append(list(units_))
            owners.append(set(tags))
        else:
            groups[-1].extend(units_)
            owners[-1] |= tags

    for u, (_, _, _, unit_owners) in enumerate(units):
        if not any(not o.startswith("param:") for o in unit_owners):
            pending.append(u)  # root-level operations (and the root's own tensors)
            pending_owners |= unit_owners
            continue
        place(pending + [u], unit_owners | pending_owners, new_block=True)
        pending, pending_owners = [], set()
    if pending:  # trailing root-level operations join the last block
        place(pending, pending_owners, new_block=False)
    if len(groups) < 2:
        why = ("no place where one tensor passes between its top-level modules" if not cuts
               else f"{len(cuts)} cut(s), but they leave one block: each lies inside a "
                    "top-level module, or between two uses of one module or tensor (a "
                    "weight-tied head, say), whose parameters must stay in one block")
        raise BadInputError(
            f"{strategy} found {why} in {type(model).__name__}; a model needs at least two "
            "blocks: build it as nn.Sequential(block1, block2, ...)")
    blocks = []
    for group in groups:
        members = []
        for u in sorted(group):
            part, start, end, _ = units[u]
            members.append(_unit(graph_module, part, start, end))
        blocks.append(nn.Sequential(*members))
    return blocks
