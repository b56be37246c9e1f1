"""The memory simulator on toy graphs with exact numbers (1 MiB activations).

Graphs and costs are built by hand, framework-free, as in PyTorch's test_ac.py: every
activation is exactly 1 MiB so every expected peak is an integer number of MiB.
"""

from __future__ import annotations

import pytest

from fedplan.planner.cost import LOSS, CostModel, NodeCost, Storage
from fedplan.planner.ir import GraphInvariantError, IRNode, PlanGraph
from fedplan.planner.simulate import regions_of, simulate

MiB = 2**20


def chain(n: int, *, saved_internal: int = 0) -> tuple[PlanGraph, CostModel]:
    """x -> a0 -> a1 -> ... -> a{n-1} -> output; each a_i is 1 MiB and saves its input."""
    nodes = [IRNode("x", "placeholder", "x", shape=(1,), output_bytes=MiB)]
    costs = [NodeCost("x", outputs=("x",))]
    storages = [Storage("x", MiB, "x", "input")]
    previous = "x"
    for i in range(n):
        name = f"a{i}"
        nodes.append(IRNode(name, "call_function", "f", (previous,), (1,), "float32", MiB))
        saved = (previous,) if previous != "x" else ()
        allocates = (name,)
        if saved_internal:
            storages.append(Storage(f"{name}#0", saved_internal, name, "internal"))
            saved = saved + (f"{name}#0",)
            allocates = allocates + (f"{name}#0",)
        costs.append(NodeCost(name, outputs=(name,), allocates=allocates, saved=saved,
                              forward_seconds=1.0, requires_grad=True))
        storages.append(Storage(name, MiB, name, "activation"))
        previous = name
    nodes.append(IRNode("output", "output", "output", (previous,)))
    costs.append(NodeCost("output", requires_grad=True))
    # the loss saves its input (the last activation) and nothing else
    costs.append(NodeCost(LOSS, saved=(previous,), requires_grad=True))
    graph = PlanGraph(tuple(nodes), name="chain").validate()
    model = CostModel(nodes=tuple(costs), storages=tuple(storages), params=(),
                      param_bytes=0, buffer_bytes=0, input_bytes=MiB, optimizer="sgd",
                      optimizer_state_bytes=0, optimizer_step_temp_bytes=0, batch_size=1)
    return graph, model


def test_keep_all_chain_peak_is_exact():
    graph, costs = chain(4)
    timeline = simulate(graph, costs)
    # forward end: input 1 + a0..a3 held (a0..a2 saved by their consumers, a3 by the loss)
    # backward of the loss: + grad of a3 (1 MiB) -> 6 MiB
    assert timeline.peak_bytes == 6 * MiB
    assert timeline.breakdown["inputs"] == MiB
    assert timeline.breakdown["saved_activations"] == 4 * MiB
    assert timeline.breakdown["temporaries"] == MiB


def test_recompute_middle_region_lowers_peak_exactly():
    graph, costs = chain(6)
    keep_all = simulate(graph, costs).peak_bytes
    assert keep_all == 8 * MiB
    # recompute a1..a3: their saved inputs a0..a2 are dropped except the region input a0
    decisions = {"a1": "recompute", "a2": "recompute", "a3": "recompute"}
    assert regions_of(graph, decisions) == [["a1", "a2", "a3"]]
    timeline = simulate(graph, costs, decisions)
    # forward end: x, a0 (region input), a3 (saved by a4), a4, a5 held = 5 MiB;
    # the loss's backward adds grad(a5): 6 MiB; when backward reaches a3 the region is
    # recomputed: a1, a2 come back (a0 is still held) next to a3 and grad(a3): still 6 MiB
    assert timeline.peak_bytes == 6 * MiB


def test_internal_saved_tensors_count_and_are_dropped_when_recomputed():
    graph, costs = chain(3, saved_internal=MiB // 2)
    keep = simulate(graph, costs)
    # three internal half-MiB tensors on top of the plain chain's 5 MiB peak
    assert keep.peak_bytes == 5 * MiB + 3 * (MiB // 2)
    recompute = simulate(graph, costs, {"a0": "recompute", "a1": "recompute"})
    assert recompute.peak_bytes < keep.peak_bytes


def test_fixed_costs_are_added_once():
    graph, costs = chain(2)
    from dataclasses import replace
    heavy = replace(costs, param_bytes=10 * MiB, optimizer_state_bytes=10 * MiB)
    assert simulate(graph, heavy).peak_bytes == simulate(graph, costs).peak_bytes + 20 * MiB


def test_nothing_is_freed_before_its_last_use():
    graph, costs = chain(5)
    timeline = simulate(graph, costs, {"a2": "recompute"})
    levels = [event.bytes_after for event in timeline.events]
    assert min(levels) >= MiB  # the input is held by the caller throughout
    assert all(event.peak_inside >= event.bytes_after or event.phase == "backward"
               for event in timeline.events)


def test_validate_rejects_use_before_definition():
    nodes = (IRNode("a", "call_function", "f", ("b",)), IRNode("b", "placeholder", "b"),
             IRNode("output", "output", "output", ("a",)))
    with pytest.raises(GraphInvariantError, match="before it is defined"):
        PlanGraph(nodes).validate()


def test_validate_rejects_duplicate_names_and_missing_output():
    with pytest.raises(GraphInvariantError, match="appears twice"):
        PlanGraph((IRNode("a", "placeholder", "a"), IRNode("a", "placeholder", "a"))).validate()
    with pytest.raises(GraphInvariantError, match="exactly one output"):
        PlanGraph((IRNode("a", "placeholder", "a"),)).validate()
