"""Trace and measure a model: the first two stages of every compile."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx
from torch import nn

from fedplan.planner.compression import measure_compression
from fedplan.planner.cost import CostModel, measure_costs
from fedplan.planner.ir import PlanGraph
from fedplan.planner.trace import build_plan_graph, symbolic_trace

from .errors import BadInputError, TraceError
from .modelfile import default_loss


@dataclass(frozen=True)
class Analysis:
    """A traced, measured model: the planner's inputs."""

    graph: PlanGraph
    costs: CostModel
    graph_module: torch.fx.GraphModule
    notes: tuple[str, ...] = ()


def as_tuple(inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in inputs):
        return tuple(inputs)
    raise BadInputError(f"expected example inputs as a tensor or a tuple of tensors; found "
                        f"{type(inputs).__name__}")


def trace(model: nn.Module, example_inputs: Sequence[torch.Tensor], *,
          leaf_modules: Sequence[Any] = (), name: str | None = None
          ) -> tuple[torch.fx.GraphModule, PlanGraph]:
    """Trace ``model`` (sharing its parameters) and read it into a validated PlanGraph."""
    try:
        graph_module, notes = symbolic_trace(model, leaf_modules=leaf_modules)
    except TypeError as exc:
        raise BadInputError(str(exc)) from exc
    try:
        # shapes come from a copy so the user's BatchNorm statistics stay untouched
        shadow = copy.deepcopy(graph_module)
        graph = build_plan_graph(shadow, example_inputs, name=name or type(model).__name__,
                                 notes=notes)
    except Exception as exc:
        raise TraceError(
            f"running the traced {type(model).__name__} on the example inputs failed: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; check that "
            f"example_batch returns inputs the model accepts") from exc
    return graph_module, graph


def analyze(model: nn.Module, example_inputs: Any, targets: Any = None, *,
            loss_fn: Callable | None = None, optimizer: str = "sgd",
            leaf_modules: Sequence[Any] = (), repeats: int = 5, compress: bool = True,
            progress: Callable[[str], None] | None = None) -> Analysis:
    """Trace ``model`` and measure its costs for one training step on this machine.

    Profiling runs on a deep copy, so the model's parameters and BatchNorm statistics
    are untouched. ``targets`` defaults to class 0 for every sample (enough for a
    cross-entropy loss to have the right memory footprint). With ``compress`` the
    compression options of every eligible activation are measured too
    (``planner.compression``).
    """
    inputs = as_tuple(example_inputs)
    graph_module, graph = trace(model, inputs, leaf_modules=leaf_modules)
    loss_fn = loss_fn or default_loss
    if targets is None:
        targets = torch.zeros(inputs[0].shape[0], dtype=torch.long, device=inputs[0].device)
    shadow = copy.deepcopy(graph_module)
    shadow.train(model.training)
    try:
        costs = measure_costs(shadow, graph, inputs, targets, loss_fn, optimizer=optimizer,
                              repeats=repeats, progress=progress)
    except (ValueError, RuntimeError) as exc:
        raise BadInputError(
            f"measuring {type(model).__name__} failed: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if compress:
        shadow = copy.deepcopy(graph_module)
        shadow.train(model.training)
        costs = replace(costs, compress=measure_compression(
            shadow, graph, costs, inputs, repeats=max(1, min(repeats, 3)),
            progress=progress))
    return Analysis(graph=graph, costs=costs, graph_module=graph_module, notes=graph.notes)
