"""The memory simulator: one training step, event by event, and its peak.

``simulate(graph, costs, decisions)`` replays what fedplan's runtime does with a plan:
forward in topological order, the loss, backward in reverse order (recomputing each
checkpoint region when backward reaches it), then the optimizer step, and returns the
memory timeline, its peak and the breakdown at the peak.

It is the independent check of every planner: it shares no code with any solver's
constraint builder, and walks storages one by one instead of summing per-node figures.

Semantics (the runtime's, stated once):

* a node whose decision is ``recompute`` runs inside a checkpoint region (a maximal run
  of consecutive ``recompute`` nodes in topological order); what it saves is dropped
  after the forward and made again when backward reaches the region;
* a region saves its inputs (values defined outside it) until its backward is done;
* a ``keep`` node's saved storages live until its own backward has run;
* a ``compress:OPTION`` node's output storage is packed when the node runs (if anyone
  holds it for backward), at the packed size the cost model measured for that option; the
  full tensor is then freed at its last forward read. Backward unpacks it transiently for
  each kept node that saved it; a region whose input is packed holds the unpacked copy
  from its recomputation until its backward is done. The packed copy is freed when its
  last holder's backward is done.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .candidates import COMPUTE_OPS
from .costmodel import CostModel
from .ir import PlanGraph
from .program import Schedule, lower, program_of, regions

CATEGORIES = ("parameters", "optimizer_state", "inputs", "gradients", "saved_activations",
              "temporaries")


@dataclass(frozen=True)
class Event:
    phase: str        # forward | recompute | backward | optimizer
    node: str
    bytes_after: int  # level after the event
    peak_inside: int  # highest level inside the event (transients included)
    levels: tuple[int, ...] = ()  # bytes per CATEGORIES entry after the event


@dataclass(frozen=True)
class Timeline:
    peak_bytes: int
    peak_phase: str
    peak_node: str
    breakdown: dict[str, int]
    events: tuple[Event, ...] = field(repr=False, default=())
    fixed_bytes: int = 0

    def to_json(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "peak_phase": self.peak_phase,
                "peak_node": self.peak_node, "breakdown": dict(self.breakdown)}


def regions_of(graph: PlanGraph, decisions: Mapping[str, str]) -> list[list[str]]:
    """The checkpoint regions of ``decisions`` on ``graph`` (``planner.program.regions``)."""
    return regions([n.name for n in graph.nodes if n.op in COMPUTE_OPS], decisions)


class _Memory:
    """Live storages by category, with the running level and peak."""

    def __init__(self) -> None:
        self.live: dict[str, tuple[int, str]] = {}
        self.by_category = dict.fromkeys(CATEGORIES, 0)
        self.level = 0
        self.peak = 0
        self.peak_at: tuple[str, str] = ("", "")
        self.peak_breakdown: dict[str, int] = {}

    def alloc(self, key: str, nbytes: int, category: str) -> None:
        if key in self.live or nbytes <= 0:
            return
        self.live[key] = (nbytes, category)
        self.by_category[category] += nbytes
        self.level += nbytes

    def free(self, key: str) -> None:
        item = self.live.pop(key, None)
        if item is not None:
            self.level -= item[0]
            self.by_category[item[1]] -= item[0]

    def recategorise(self, key: str, category: str) -> None:
        if key in self.live:
            nbytes, old = self.live[key]
            self.by_category[old] -= nbytes
            self.by_category[category] += nbytes
            self.live[key] = (nbytes, category)

    def levels(self) -> tuple[int, ...]:
        return tuple(self.by_category[category] for category in CATEGORIES)

    def observe(self, phase: str, node: str, transient: int = 0) -> int:
        level = self.level + max(transient, 0)
        if level > self.peak:
            self.peak = level
            self.peak_at = (phase, node)
            breakdown = dict.fromkeys(CATEGORIES, 0)
            for nbytes, category in self.live.values():
                breakdown[category] += nbytes
            breakdown["temporaries"] += max(transient, 0)
            self.peak_breakdown = breakdown
        return level


def simulate(graph: PlanGraph, costs: CostModel, decisions: Mapping[str, str] | None = None,
             *, packed_bytes: Mapping[str, int] | None = None,
             optimizer_in_backward: bool = False, gradients_held: bool = False) -> Timeline:
    """Replay one training step under ``decisions`` (node -> keep | recompute | compress:*).

    ``packed_bytes`` overrides the packed sizes (storage key -> bytes) that the cost model
    gives the compressed nodes. Step-level decisions (``planner.step``):

    * ``optimizer_in_backward``: a parameter is updated as soon as its gradient is complete
      (after the backward of its first user in forward order, the last to reach it), with
      its share of the optimizer step's temporaries, and its gradient is freed at once;
      no optimizer step at the end.
    * ``gradients_held``: every parameter's gradient is allocated before the step starts
      (a second or later micro-batch: the earlier ones left them to accumulate into), so
      backward accumulates into them.
    """
    schedule = lower(program_of(graph, costs), decisions or {}, packed_bytes)
    return walk(schedule, optimizer_in_backward=optimizer_in_backward,
                gradients_held=gradients_held)


def walk(schedule: Schedule, *, optimizer_in_backward: bool = False,
         gradients_held: bool = False) -> Timeline:
    """Replay the step ``schedule`` lowers (see ``simulate`` for the step-level flags)."""
    program = schedule.program
    costs = program.costs
    packed = schedule.packed
    node_cost = costs.node
    storage = costs.storage
    order = program.order
    region_of = schedule.region_of
    regions = schedule.regions
    reads = program.reads
    last_read = program.last_read
    holders = {key: set(held) for key, held in schedule.holders.items()}
    region_keys = schedule.region_inputs

    memory = _Memory()
    fixed = {"parameters": costs.param_bytes + costs.buffer_bytes,
             "optimizer_state": costs.optimizer_state_bytes, "inputs": costs.input_bytes}
    for category, nbytes in fixed.items():
        memory.alloc(f"<{category}>", nbytes, category)
    events: list[Event] = []

    # ---- forward -------------------------------------------------------------------
    for position, name in enumerate(order):
        cost = node_cost[name]
        in_region = name in region_of
        if in_region and regions[region_of[name]][0] == name:
            # a region saves the RNG state when it starts, until its backward is done
            memory.alloc(f"rng:{region_of[name]}", costs.region_bytes, "temporaries")
        new = [key for key in cost.allocates if storage[key].kind != "input"]
        added = 0
        for key in new:
            if key not in memory.live:
                added += storage[key].nbytes
        packing = [key for key in new if key in packed and holders.get(key)]
        added += sum(packed[key] for key in packing)
        inside = memory.observe("forward", name, added + cost.temp_bytes)
        for key in new:
            memory.alloc(key, storage[key].nbytes, "temporaries")
        for key in packing:  # packed once, when the node (or its first saver) runs
            memory.alloc(f"packed:{key}", packed[key], "saved_activations")
        # free what nobody needs any more: not read later, not held for backward
        for key in new + sorted(reads.get(name, ())):
            if key not in memory.live or storage[key].kind == "input":
                continue
            if last_read.get(key, -1) > position:
                continue
            held = holders.get(key)
            if held:
                if f"packed:{key}" in memory.live:  # the holders hold the packed copy
                    memory.free(key)
                else:
                    memory.recategorise(key, "saved_activations")
                continue
            memory.free(key)
        if in_region:  # internal storages of a recomputed node are not kept
            for key in new:
                if storage[key].kind == "internal" and not holders.get(key):
                    memory.free(key)
        events.append(Event("forward", name, memory.level, inside, memory.levels()))

    # ---- backward ------------------------------------------------------------------
    grads: dict[str, str] = {}          # node name -> buffer holding its output's grad
    buffer_refs: dict[str, int] = {}    # grad buffer -> nodes whose grad lives in it
    shared: set[str] = set()            # nodes whose grad is another node's grad tensor
    param_sizes = dict(costs.params)
    if gradients_held:
        for param, size in param_sizes.items():
            memory.alloc(f"param_grad:{param}", size, "gradients")
    # parameter -> node whose backward completes its grad
    completes_at = program.param_completes_at if optimizer_in_backward else {}
    total_param_bytes = max(sum(param_sizes.values()), 1)
    started_regions: set[int] = set()
    node_bytes = program.output_bytes
    for position in range(len(order) - 1, -1, -1):
        name = order[position]
        cost = node_cost[name]
        if name in region_of and region_of[name] not in started_regions:
            index = region_of[name]
            started_regions.add(index)
            transient = 0
            for key in region_keys[index]:  # a packed input is unpacked for the replay
                if f"packed:{key}" in memory.live and key not in memory.live:
                    memory.alloc(f"unpacked:{index}:{key}", storage[key].nbytes,
                                 "saved_activations")
            for member in regions[index]:
                member_cost = node_cost[member]
                transient = max(transient, member_cost.temp_bytes)
                for key in member_cost.saved:
                    # a recomputed saved tensor lives until its own node's backward
                    holders.setdefault(key, set()).add(member)
                    if key not in memory.live and f"unpacked:{index}:{key}" not in memory.live:
                        memory.alloc(key, storage[key].nbytes, "saved_activations")
            events.append(Event("recompute", name, memory.level,
                                memory.observe("recompute", name, transient),
                                memory.levels()))
        if not cost.requires_grad:
            continue
        # gradients flowing into this node's inputs
        accumulate = 0
        targets = program.inputs_of[name]
        for inp in targets:
            if inp not in node_cost or not node_cost[inp].requires_grad:
                continue
            if program.op[inp] in ("placeholder", "get_attr"):
                continue
            size = node_bytes[inp]
            if inp in grads and inp in shared:
                # accumulating into a gradient tensor that another node also holds goes
                # out of place: a new buffer, and the shared one loses a reference
                old = grads[inp]
                buffer_refs[old] -= 1
                if buffer_refs[old] == 0:
                    memory.free(old)
                shared.discard(inp)
                grads[inp] = f"grad:{inp}"
                buffer_refs[grads[inp]] = 1
                memory.alloc(f"grad:{inp}", size, "temporaries")
            elif inp in grads:
                accumulate = max(accumulate, size)
            elif cost.grad_aliases and name in grads:
                # the input's grad is a view of this node's output grad: no new bytes,
                # but that buffer now lives until the input's own backward too
                grads[inp] = grads[name]
                buffer_refs[grads[name]] += 1
                if cost.grad_shares:
                    shared.add(inp)
            else:
                grads[inp] = f"grad:{inp}"
                buffer_refs[grads[inp]] = 1
                memory.alloc(f"grad:{inp}", size, "temporaries")
        for param in cost.params:
            key = f"param_grad:{param}"
            if key in memory.live:
                accumulate = max(accumulate, param_sizes.get(param, 0))
            else:
                memory.alloc(key, param_sizes.get(param, 0), "gradients")
        unpacked = sum(storage[key].nbytes for key in cost.saved
                       if f"packed:{key}" in memory.live and key not in memory.live
                       and name not in region_of)
        inside = memory.observe("backward", name,
                                accumulate + cost.backward_temp_bytes + unpacked)
        for param in cost.params:  # the step inside backward: update, then free the grad
            if completes_at.get(param) == name:
                share = costs.optimizer_step_temp_bytes * param_sizes.get(param, 0)
                inside = max(inside, memory.observe(
                    "backward", name, share // total_param_bytes))
                memory.free(f"param_grad:{param}")
        # this node's own output gradient and what only it held are released
        if name in grads:
            buffer = grads[name]
            buffer_refs[buffer] -= 1
            if buffer_refs[buffer] == 0:
                memory.free(buffer)
        released = list(cost.saved) + list(cost.outputs)
        for key in released:
            held = holders.get(key)
            if held is not None:
                held.discard(name)
        if name in region_of and regions[region_of[name]][0] == name:
            index = region_of[name]
            for member in regions[index]:
                released.extend(node_cost[member].saved)
            for key in region_keys[index]:
                holders[key].discard(f"region:{index}")
                released.append(key)
                memory.free(f"unpacked:{index}:{key}")
            memory.free(f"rng:{index}")
        for key in released:  # freed once nobody holds it any more
            if holders.get(key) or storage[key].kind == "input":
                continue
            memory.free(key)
            memory.free(f"packed:{key}")
        events.append(Event("backward", name, memory.level, inside, memory.levels()))

    # ---- optimizer step ----------------------------------------------------------------
    for key in list(memory.live):
        if key.startswith("grad:"):
            memory.free(key)
    inside = memory.observe("optimizer", "step",
                            0 if optimizer_in_backward else costs.optimizer_step_temp_bytes)
    events.append(Event("optimizer", "step", memory.level, inside, memory.levels()))
    return Timeline(peak_bytes=memory.peak, peak_phase=memory.peak_at[0],
                    peak_node=memory.peak_at[1], breakdown=memory.peak_breakdown,
                    events=tuple(events), fixed_bytes=sum(fixed.values()))
