"""The planner's layering, checked on the source: no import cycles, and the parts that
must run without PyTorch (solvers, simulator, cost and plan data) import none of it.

The same check from the shell: ``python -m pytest -q tests/test_architecture.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"planner": "fedplan.planner", "planner/solvers": "fedplan.planner.solvers"}
# modules that must not import torch, directly or through another planner module
TORCH_FREE = ("fedplan.planner.ir", "fedplan.planner.costmodel", "fedplan.planner.packing",
              "fedplan.planner.candidates", "fedplan.planner.simulate",
              "fedplan.planner.plan", "fedplan.planner.budget", "fedplan.planner.graphs",
              "fedplan.planner.solvers")


def modules() -> dict[str, tuple[Path, str]]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = (path, package)
    return found


def import_graph() -> tuple[nx.DiGraph, dict[str, set[str]]]:
    """Edges between planner modules for every import statement (module level or inside a
    function: a deferred import is still a dependency); external imports per module."""
    found = modules()
    graph = nx.DiGraph()
    external: dict[str, set[str]] = {}
    for name, (path, package) in found.items():
        graph.add_node(name)
        external[name] = set()
        is_package = path.stem == "__init__"
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{alias.name}" for alias in node.names] + [module]
            for target in targets:
                if target in found and target != name:
                    graph.add_edge(name, target)
                    break
            else:
                for target in targets:
                    external[name].add(target.split(".")[0])
    return graph, external


def test_no_import_cycle_in_the_planner():
    graph, _ = import_graph()
    assert len(graph) > 15
    assert list(nx.simple_cycles(graph)) == []


def test_solvers_simulator_and_plan_data_import_no_torch():
    graph, external = import_graph()
    for name in TORCH_FREE:
        reached = {name} | nx.descendants(graph, name)
        users = sorted(module for module in reached if "torch" in external[module])
        assert not users, f"{name} reaches torch through {users}"
