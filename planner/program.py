"""The step program, and its lowering: the facts every stage reads, computed once.

``program_of(graph, costs)`` builds a :class:`StepProgram` once per (graph, cost model):
the step as a linear order of compute nodes with the loss as a real node, and per storage
its producer, who reads it in forward (and the last to do so), who saves it for backward;
the decision units (``planner.candidates``); the gradient facts of backward; the fixed
bytes. It is plain data (no torch), so the solvers, the simulator and the exact reference
read it instead of deriving the facts again.

``lower(program, decisions)`` turns one assignment of decisions into a
:class:`Schedule`: the checkpoint regions (the one definition of a region, used by the
simulator, the solvers' checks and the runtime), what each region saves, which storages
are packed and at what size, and the runtime's pack and unpin points. A plan file stores
decisions only; everything in the schedule is derived again from them.

Semantics of a region (stated once, here): a maximal run of consecutive ``recompute``
compute nodes in the step order. It saves the storages its members read that were made
outside it, and replays its members when backward reaches its last member.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from .candidates import COMPUTE_OPS, PlanSpace, plan_space
from .costmodel import LOSS, CostModel
from .ir import PlanGraph
from .packing import option_of, packed_sizes

RECOMPUTE = "recompute"


@dataclass(frozen=True, eq=False)
class StepProgram:
    """One training step's facts, decision-independent (see the module doc).

    Positions index ``order``: the compute nodes in topological order, then the loss.
    """

    graph: PlanGraph = field(repr=False)
    costs: CostModel = field(repr=False)
    order: tuple[str, ...]
    position: Mapping[str, int]
    inputs_of: Mapping[str, tuple[str, ...]]     # node (and the loss) -> its input nodes
    reads: Mapping[str, frozenset[str]]          # node (and the loss) -> storages it reads
    last_read: Mapping[str, int]                 # storage -> last position reading it
    producer: Mapping[str, int]                  # activation/internal storage -> position
    end_read: Mapping[str, int]                  # ... its last forward reader (or producer)
    savers: Mapping[str, tuple[int, ...]]        # ... positions of the nodes saving it
    readers: Mapping[str, tuple[tuple[int, int], ...]]  # (provider, reader) positions
    free_from: Mapping[str, int]                 # backward frees it no earlier than here
    space: PlanSpace = field(repr=False)

    @property
    def storages(self) -> tuple[str, ...]:
        """Storages a plan can act on (activations and internals; not the inputs)."""
        return tuple(self.producer)

    @cached_property
    def size(self) -> dict[str, int]:
        storage = self.costs.storage
        return {key: storage[key].nbytes for key in self.producer}

    @cached_property
    def output_bytes(self) -> dict[str, int]:
        return {node.name: node.output_bytes for node in self.graph.nodes}

    @cached_property
    def op(self) -> dict[str, str]:
        return {node.name: node.op for node in self.graph.nodes}

    @cached_property
    def param_completes_at(self) -> dict[str, str]:
        """Parameter -> the node whose backward completes its gradient (its first user in
        forward order, the last backward reaches)."""
        completes: dict[str, str] = {}
        for name in self.order:
            for param in self.costs.node[name].params:
                completes.setdefault(param, name)
        return completes

    @cached_property
    def param_last(self) -> dict[str, int]:
        """Parameter -> the last position (forward order) of a node that uses it."""
        last: dict[str, int] = {}
        for i, name in enumerate(self.order):
            cost = self.costs.node[name]
            if cost.requires_grad:
                for param in cost.params:
                    last[param] = i
        return last

    @cached_property
    def grad_span(self) -> dict[str, int]:
        """Node -> position of its last consumer (whose backward makes its gradient)."""
        node_cost = self.costs.node
        ops = self.op
        span: dict[str, int] = {}
        for i, name in enumerate(self.order):
            if not node_cost[name].requires_grad:
                continue
            for inp in self.inputs_of[name]:
                if inp in self.position and node_cost[inp].requires_grad \
                        and ops.get(inp) in COMPUTE_OPS:
                    span[inp] = max(span.get(inp, -1), i)
        return span

    @cached_property
    def articulation_points(self) -> tuple[str, ...]:
        """Compute nodes after which exactly one activation storage (their own) is live:
        the cuts between the stages of a model (between ResNet blocks, between the layers
        of a chain), where checkpointing baselines put segment boundaries."""
        storage = self.costs.storage
        last = len(self.order) - 1
        starts = [0] * (last + 1)  # crossing(i): produced at or before i, read after i
        for key, read in self.last_read.items():
            produced = self.position.get(storage[key].producer, -1)
            if storage[key].kind != "input" and produced >= 0 and read > produced:
                starts[produced] += 1
                starts[read] -= 1
        cuts = []
        crossing = 0
        for i, name in enumerate(self.order[:-1]):
            crossing += starts[i]
            own = sum(1 for key in self.costs.node[name].outputs
                      if self.last_read.get(key, -1) > i and storage[key].producer == name)
            if crossing and crossing == own:
                cuts.append(name)
        return tuple(cuts)

    def schedule(self, decisions: Mapping[str, str] | None = None) -> Schedule:
        return lower(self, decisions or {})


def program_of(graph: PlanGraph, costs: CostModel) -> StepProgram:
    """The step program of ``graph`` under ``costs``, built once per pair (both frozen)."""
    cache = costs.__dict__.setdefault("_programs", {})
    program = cache.get(id(graph))
    if program is None or program.graph is not graph:
        program = _build(graph, costs)
        cache[id(graph)] = program  # the program holds the graph: the id stays its own
    return program


def _build(graph: PlanGraph, costs: CostModel) -> StepProgram:
    node_cost = costs.node
    storage = costs.storage
    order = tuple(n.name for n in graph.nodes if n.op in COMPUTE_OPS) + (LOSS,)
    position = {name: i for i, name in enumerate(order)}
    inputs_of = {node.name: tuple(node.inputs) for node in graph.nodes}
    inputs_of[LOSS] = tuple(graph.nodes[-1].inputs)

    def storages_of(names) -> frozenset[str]:
        keys: set[str] = set()
        for inp in names:
            keys.update(node_cost[inp].outputs if inp in node_cost else ())
        return frozenset(keys)

    reads = {node.name: storages_of(node.inputs) for node in graph.nodes}
    reads[LOSS] = reads[graph.nodes[-1].name]
    last_read: dict[str, int] = {}
    for i, name in enumerate(order):
        for key in reads[name]:
            last_read[key] = i

    ours = [key for key in storage if storage[key].kind != "input"]
    producer = {key: position[storage[key].producer] for key in ours}
    end_read = dict(producer)
    readers: dict[str, list[tuple[int, int]]] = {key: [] for key in ours}
    for name in order:
        for inp in inputs_of[name]:
            provider = position.get(inp)
            for key in node_cost[inp].outputs if inp in node_cost else ():
                if key in producer:
                    end_read[key] = max(end_read[key], position[name])
                    if provider is not None:
                        readers[key].append((provider, position[name]))
    savers: dict[str, list[int]] = {key: [] for key in ours}
    for name in order:
        for key in node_cost[name].saved:
            if key in savers:
                savers[key].append(position[name])
    free_from = {key: min(savers[key] + [producer[key] + 1]) for key in ours}
    return StepProgram(
        graph=graph, costs=costs, order=order, position=position, inputs_of=inputs_of,
        reads=reads, last_read=last_read, producer=producer, end_read=end_read,
        savers={k: tuple(v) for k, v in savers.items()},
        readers={k: tuple(v) for k, v in readers.items()}, free_from=free_from,
        space=plan_space(graph, costs))


def regions(order: tuple[str, ...] | list[str], decisions: Mapping[str, str]
            ) -> list[list[str]]:
    """Maximal runs of consecutive ``recompute`` nodes of ``order`` (compute nodes in
    topological order): the checkpoint regions of a plan. The runtime calls this on the
    captured graph's compute order, the lowering on the program's."""
    found: list[list[str]] = []
    current: list[str] = []
    for name in order:
        if decisions.get(name, "keep") == RECOMPUTE:
            current.append(name)
        elif current:
            found.append(current)
            current = []
    if current:
        found.append(current)
    return found


@dataclass(frozen=True, eq=False)
class Schedule:
    """One plan, lowered: what the simulator walks and the runtime builds (module doc)."""

    program: StepProgram = field(repr=False)
    decisions: Mapping[str, str]
    regions: tuple[tuple[str, ...], ...]
    region_of: Mapping[str, int]
    region_inputs: tuple[frozenset[str], ...]   # storages each region saves
    packed_bytes: Mapping[str, int] | None      # overrides of the packed sizes
    pack_after: Mapping[str, str]               # compressed node -> node its mark follows
    unpin_after: Mapping[str, str]              # compressed node -> its last forward reader

    @cached_property
    def packed(self) -> dict[str, int]:
        """Storage -> packed bytes, for the compressed storages (the cost model's measured
        sizes, or the overrides given to ``lower``)."""
        packed = packed_sizes(self.program.costs, self.decisions)
        packed.update(self.packed_bytes or {})
        return packed

    @cached_property
    def holders(self) -> dict[str, frozenset[str]]:
        """Storage -> what holds it for backward after the forward: kept savers (by name)
        and regions (``region:INDEX``) that save it as an input."""
        held: dict[str, set[str]] = {}
        node_cost = self.program.costs.node
        for name in self.program.order:
            if name in self.region_of:
                continue
            for key in node_cost[name].saved:
                held.setdefault(key, set()).add(name)
        for index, keys in enumerate(self.region_inputs):
            for key in keys:
                held.setdefault(key, set()).add(f"region:{index}")
        return {key: frozenset(value) for key, value in held.items()}


def lower(program: StepProgram, decisions: Mapping[str, str],
          packed_bytes: Mapping[str, int] | None = None) -> Schedule:
    """The schedule of ``decisions`` (node -> keep | recompute | compress:OPTION).

    ``packed_bytes`` overrides the packed sizes (storage key -> bytes) that the cost model
    gives the compressed nodes."""
    decisions = dict(decisions)
    costs = program.costs
    node_cost = costs.node
    found = regions(program.order[:-1], decisions)
    region_of = {name: index for index, members in enumerate(found) for name in members}
    region_inputs = []
    for members in found:
        member_set = set(members)
        keys: set[str] = set()
        for name in members:
            for inp in program.inputs_of[name]:
                if inp not in member_set:
                    keys.update(node_cost[inp].outputs if inp in node_cost else ())
        region_inputs.append(frozenset(keys))
    compressed = [name for name, decision in decisions.items()
                  if option_of(decision) is not None]
    pack_after: dict[str, str] = {}
    unpin_after: dict[str, str] = {}
    if compressed:
        space = program.space
        last_of_unit = {name: group[-1] for group in space.groups for name in group}
        for name in compressed:
            if last_of_unit.get(name, name) != name:
                pack_after[name] = last_of_unit[name]
            # a compressible node has one output storage, its own (planner.packing)
            key = node_cost[name].outputs[0] if node_cost[name].outputs else None
            readers = [program.order[r] for _, r in program.readers.get(key, ())
                       if program.order[r] != LOSS]
            if readers:
                unpin_after[name] = max(readers, key=program.position.__getitem__)
    return Schedule(program=program, decisions=decisions,
                    regions=tuple(tuple(members) for members in found),
                    region_of=region_of, region_inputs=tuple(region_inputs),
                    packed_bytes=dict(packed_bytes) if packed_bytes else None,
                    pack_after=pack_after, unpin_after=unpin_after)
