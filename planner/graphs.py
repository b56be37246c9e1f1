"""Framework-free graphs: Checkmate/Moccasin node-link JSON onto fedplan's plan space.

The Checkmate graphs published with the Moccasin code are networkx node-link JSON files
(``networkx.node_link_data``): ``nodes`` with ``id``, ``cost_cpu`` (compute time),
``cost_ram`` (output size) and ``backward`` (true for a backward node), and ``links``
(``edges`` in newer networkx) from producer ``source`` to consumer ``target``.

How a graph becomes a (PlanGraph, CostModel) that ``solve()`` and the simulator read
unchanged:

* every **forward** node is a candidate (``call_function``) whose single output storage
  is ``cost_ram`` units and whose recompute cost is ``cost_cpu``;
* every **backward** node is attached to a *partner* forward node: the forward node of
  highest topological position among the forward values it reads (for a gradient node
  that is the node whose gradient it computes, or that node's input). The forward values
  a backward node reads become the partner's *saved* storages, so they are held until
  the partner's backward has run, exactly as fedplan's runtime holds what autograd
  saves. A backward node that reads no forward value is attached to nothing;
* **approximation**: fedplan's simulator models gradients itself (a gradient buffer the
  size of a forward output, allocated when backward reaches the consumer, freed after
  the producer's backward), instead of replaying the graph's backward nodes one by one.
  On graphs whose backward mirrors the forward (the published Checkmate graphs, and the
  generator below) the gradient sizes equal the forward sizes; on others the keep-all
  peak differs from the graph's own. ``GraphProblem.keep_all_units`` and
  ``no_recompute_peak`` report both, so the difference is visible;
* units: one ``cost_ram`` unit is one KiB and one ``cost_cpu`` unit one millisecond
  inside fedplan, so the ILP's KiB and microsecond rounding is exact for integer costs;
  every figure reported back is in the graph's own units.

The budget follows Moccasin's published protocol: a fraction of the **no-recompute peak
over node outputs in one topological order** (each output live from its producer until
its last consumer), see ``no_recompute_peak``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from .costmodel import LOSS, CostModel, NodeCost, Storage
from .errors import BadInputError
from .ir import IRNode, PlanGraph

RAM_SCALE = 1024          # bytes per cost_ram unit inside fedplan (1 unit = 1 KiB)
SECONDS_PER_CPU = 1e-3    # seconds per cost_cpu unit inside fedplan (1 unit = 1 ms)


@dataclass(frozen=True)
class ExternalGraph:
    """A compute graph as read from node-link JSON, nodes in one topological order."""

    names: tuple[str, ...]
    cost_cpu: dict[str, float]
    cost_ram: dict[str, int]
    backward: dict[str, bool]
    preds: dict[str, tuple[str, ...]]
    name: str = "graph"

    @property
    def forward_names(self) -> list[str]:
        return [n for n in self.names if not self.backward[n]]

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class GraphProblem:
    """An external graph mapped onto fedplan: what ``solve()`` and ``simulate()`` read."""

    external: ExternalGraph
    graph: PlanGraph
    costs: CostModel

    def units_to_bytes(self, units: float) -> int:
        return int(units * RAM_SCALE)

    @property
    def base_cost(self) -> float:
        """Compute cost of running every node once (the objective of a no-recompute plan)."""
        return float(sum(self.external.cost_cpu.values()))


def _bad(path: str, what: str) -> BadInputError:
    return BadInputError(
        f"{path}: {what}; expected networkx node-link JSON with nodes carrying cost_cpu, "
        f"cost_ram and backward (the Checkmate/Moccasin graph format)")


def parse_node_link(data: object, *, source: str = "graph") -> ExternalGraph:
    """Read node-link data (already parsed JSON) into an ExternalGraph; errors are one line."""
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise _bad(source, "no 'nodes' list found")
    links = data.get("links", data.get("edges"))
    if not isinstance(links, list):
        raise _bad(source, "no 'links' (or 'edges') list found")
    digraph = nx.DiGraph()
    order: dict[str, int] = {}
    cost_cpu: dict[str, float] = {}
    cost_ram: dict[str, int] = {}
    backward: dict[str, bool] = {}
    for position, node in enumerate(data["nodes"]):
        if not isinstance(node, dict) or "id" not in node:
            raise _bad(source, f"node #{position} has no 'id'")
        name = str(node["id"])
        if name in order:
            raise _bad(source, f"node id {name!r} appears twice")
        for field in ("cost_cpu", "cost_ram"):
            value = node.get(field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise _bad(source, f"node {name!r} has {field}={value!r}, not a number >= 0")
        order[name] = position
        cost_cpu[name] = float(node["cost_cpu"])
        ram = node["cost_ram"]
        if float(ram) != int(ram):
            raise _bad(source, f"node {name!r} has a fractional cost_ram {ram!r}")
        cost_ram[name] = int(ram)
        backward[name] = bool(node.get("backward") or False)
        digraph.add_node(name)
    for position, link in enumerate(links):
        if not isinstance(link, dict) or "source" not in link or "target" not in link:
            raise _bad(source, f"link #{position} lacks 'source' or 'target'")
        u, v = str(link["source"]), str(link["target"])
        if u not in order or v not in order:
            unknown = u if u not in order else v
            raise _bad(source, f"link #{position} joins unknown node {unknown!r}")
        digraph.add_edge(u, v)
    if not order:
        raise _bad(source, "the graph has no nodes")
    if not nx.is_directed_acyclic_graph(digraph):
        raise _bad(source, "the graph has a cycle")
    if not any(not b for b in backward.values()):
        raise _bad(source, "no forward node (every node has backward=true)")
    # the file's own order where it is topological (Moccasin's protocol uses one order)
    names = tuple(nx.lexicographical_topological_sort(digraph, key=lambda n: order[n]))
    preds = {name: tuple(sorted(digraph.predecessors(name), key=order.get)) for name in names}
    return ExternalGraph(names=names, cost_cpu=cost_cpu, cost_ram=cost_ram,
                         backward=backward, preds=preds,
                         name=str((data.get("graph") or {}).get("name", source))
                         if isinstance(data.get("graph"), dict) else source)


def read_node_link(path: str | Path) -> ExternalGraph:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"graph file {str(path)!r} not found; expected networkx node-link "
                            f"JSON (make one with `fedplan bench-solver --generate`)")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"graph file {str(path)!r} is not valid JSON ({exc}); expected "
                            f"networkx node-link JSON") from exc
    graph = parse_node_link(data, source=str(path))
    if graph.name == str(path):
        graph = ExternalGraph(graph.names, graph.cost_cpu, graph.cost_ram, graph.backward,
                              graph.preds, name=path.stem)
    return graph


def no_recompute_peak(graph: ExternalGraph) -> int:
    """Moccasin's budget base: the peak over node outputs in the graph's topological order.

    Each output is live from its producer's step to its last consumer's step, both
    inclusive (an output nobody reads lives only during its own step).
    """
    position = {name: i for i, name in enumerate(graph.names)}
    last = {name: i for i, name in enumerate(graph.names)}
    for name in graph.names:
        for pred in graph.preds[name]:
            last[pred] = max(last[pred], position[name])
    change = [0] * (len(graph.names) + 1)
    for name, i in position.items():
        change[i] += graph.cost_ram[name]
        change[last[name] + 1] -= graph.cost_ram[name]
    level = peak = 0
    for delta in change[:-1]:
        level += delta
        peak = max(peak, level)
    return peak


def to_problem(graph: ExternalGraph) -> GraphProblem:
    """Map an external graph onto fedplan's plan space (see the module docstring)."""
    forward = graph.forward_names
    forward_set = set(forward)
    position = {name: i for i, name in enumerate(forward)}
    saved: dict[str, list[str]] = {name: [] for name in forward}
    for name in graph.names:
        if not graph.backward[name]:
            continue
        reads = [p for p in graph.preds[name] if p in forward_set]
        if not reads:
            continue
        partner = max(reads, key=position.get)
        for key in reads:
            if key not in saved[partner]:
                saved[partner].append(key)
    consumers: dict[str, int] = {name: 0 for name in forward}
    for name in forward:
        for pred in graph.preds[name]:
            if pred in forward_set:
                consumers[pred] += 1
    sinks = [name for name in forward if consumers[name] == 0]
    nodes = [IRNode(name=name, op="call_function", target="graph_node",
                    inputs=tuple(p for p in graph.preds[name] if p in forward_set),
                    output_bytes=graph.cost_ram[name] * RAM_SCALE) for name in forward]
    nodes.append(IRNode(name="output", op="output", target="output", inputs=tuple(sinks)))
    plan_graph = PlanGraph(nodes=tuple(nodes), name=graph.name).validate()
    costs = [NodeCost(name=name, outputs=(name,), allocates=(name,),
                      saved=tuple(saved[name]),
                      forward_seconds=graph.cost_cpu[name] * SECONDS_PER_CPU,
                      requires_grad=True) for name in forward]
    costs.append(NodeCost(name=LOSS, requires_grad=True))
    storages = tuple(Storage(key=name, nbytes=graph.cost_ram[name] * RAM_SCALE,
                             producer=name, kind="activation") for name in forward)
    cost_model = CostModel(
        nodes=tuple(costs), storages=storages, params=(), param_bytes=0, buffer_bytes=0,
        input_bytes=0, optimizer="sgd", optimizer_state_bytes=0, optimizer_step_temp_bytes=0,
        batch_size=1, mode="graph", region_bytes=0)
    return GraphProblem(external=graph, graph=plan_graph, costs=cost_model)


def random_layered_graph(layers: int, width: int, *, seed: int = 0,
                         skip_probability: float = 0.2, max_cpu: int = 9,
                         max_ram: int = 4) -> dict:
    """Node-link data of a random layered forward graph with a mirrored backward.

    Layer 0 is one input node and the last layer one loss node; every other layer has
    1..``width`` nodes, each reading one or two nodes of the previous layer and, with
    ``skip_probability``, one node of an earlier layer (a residual edge). Costs are
    integers: ``cost_cpu`` in 1..``max_cpu``, ``cost_ram`` in 1..``max_ram`` (MiB-sized
    units suit the bench, any unit suits the planner). Each forward node ``fK`` gets a
    backward node ``bK`` of the same size that reads ``fK``, ``fK``'s inputs and the
    backward nodes of ``fK``'s consumers, as autograd's gradient of ``fK`` would.
    """
    if layers < 2 or width < 1:
        raise BadInputError(f"expected layers >= 2 and width >= 1; found {layers}, {width}")
    rng = random.Random(seed)
    levels: list[list[str]] = []
    preds: dict[str, list[str]] = {}
    count = 0
    for level in range(layers):
        size = 1 if level in (0, layers - 1) else rng.randint(1, width)
        names = []
        for _ in range(size):
            name = f"f{count}"
            count += 1
            inputs: list[str] = []
            if level > 0:
                previous = levels[-1]
                inputs = rng.sample(previous, k=min(len(previous), rng.randint(1, 2)))
                if level == layers - 1:
                    inputs = list(previous)  # the loss reads the whole last layer
                if level > 1 and rng.random() < skip_probability:
                    earlier = rng.choice(levels[rng.randrange(0, level - 1)])
                    if earlier not in inputs:
                        inputs.append(earlier)
            preds[name] = inputs
            names.append(name)
        levels.append(names)
    forward = [name for names in levels for name in names]
    # nodes of a level nobody reads would dangle: feed them into the next level's first
    users = {name: 0 for name in forward}
    for inputs in preds.values():
        for name in inputs:
            users[name] += 1
    for level in range(len(levels) - 1):
        for name in levels[level]:
            if users[name] == 0:
                preds[levels[level + 1][0]].append(name)
                users[name] += 1
    cost_cpu = {name: rng.randint(1, max_cpu) for name in forward}
    cost_ram = {name: rng.randint(1, max_ram) for name in forward}
    consumers: dict[str, list[str]] = {name: [] for name in forward}
    for name in forward:
        for pred in preds[name]:
            consumers[pred].append(name)
    nodes = [{"id": name, "cost_cpu": cost_cpu[name], "cost_ram": cost_ram[name],
              "backward": False} for name in forward]
    links = [{"source": pred, "target": name} for name in forward for pred in preds[name]]
    for name in reversed(forward):
        grad = "b" + name[1:]
        nodes.append({"id": grad, "cost_cpu": cost_cpu[name], "cost_ram": cost_ram[name],
                      "backward": True})
        reads = [name] + preds[name] + ["b" + c[1:] for c in consumers[name]]
        links.extend({"source": source, "target": grad} for source in dict.fromkeys(reads))
    return {"directed": True, "multigraph": False,
            "graph": {"name": f"layered-{layers}x{width}-s{seed}"},
            "nodes": nodes, "links": links}
