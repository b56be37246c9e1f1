"""Which nodes a plan may recompute, and which must share a decision.

Shared by every solver (not by the simulator, which only replays decisions).

* Candidates are the compute nodes of the graph (``call_module``, ``call_function``,
  ``call_method``); placeholders, attributes, the output and the loss are always kept.
* In-place ops tie decisions: a node that modifies its input ``u`` in place must run in
  the same checkpoint region as ``u``'s producer, otherwise the region would save ``u``
  and then see it changed (autograd's version check fails). So every compute node from
  ``u`` to the in-place node gets one shared decision; if ``u`` is a model input the
  in-place node is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from .costmodel import LOSS, CostModel
from .ir import PlanGraph

COMPUTE_OPS = ("call_module", "call_function", "call_method")


@dataclass(frozen=True)
class PlanSpace:
    """The decision units of a graph: groups of candidate nodes that share a decision."""

    order: tuple[str, ...]              # compute nodes in topological order, then the loss
    groups: tuple[tuple[str, ...], ...]  # decision units (a node alone, or a tied run)
    fixed_keep: frozenset[str]          # compute nodes that must be kept

    @cached_property
    def group_of(self) -> dict[str, int]:
        return {name: index for index, group in enumerate(self.groups) for name in group}

    @cached_property
    def candidates(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)

    def decisions_from_groups(self, recomputed_groups) -> dict[str, str]:
        decisions = {name: "keep" for name in self.candidates}
        for index in recomputed_groups:
            for name in self.groups[index]:
                decisions[name] = "recompute"
        return decisions


def plan_space(graph: PlanGraph, costs: CostModel) -> PlanSpace:
    order = [node.name for node in graph.nodes if node.op in COMPUTE_OPS]
    position = {name: i for i, name in enumerate(order)}
    parent = {name: name for name in order}

    def find(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    fixed_keep: set[str] = set()
    for name in order:
        for mutated in costs.node[name].mutates:
            if mutated not in position:  # a model input (or attribute) changed in place
                fixed_keep.add(name)
                continue
            for other in order[position[mutated]:position[name] + 1]:
                parent[find(other)] = find(name)
    members: dict[str, list[str]] = {}
    for name in order:
        members.setdefault(find(name), []).append(name)
    groups = []
    blocked = set(fixed_keep)
    for root in sorted(members, key=lambda r: position[members[r][0]]):
        group = members[root]
        if blocked.intersection(group):
            fixed_keep.update(group)
            continue
        groups.append(tuple(group))
    return PlanSpace(order=tuple(order) + (LOSS,), groups=tuple(groups),
                     fixed_keep=frozenset(fixed_keep))
