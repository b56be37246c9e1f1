"""Trace and measure a model: the first two stages of every compile."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx
from torch import nn

from fedplan.planner.capture import Captured, ModelCall, capture
from fedplan.planner.compression import measure_compression
from fedplan.planner.cost import CostModel, measure_costs
from fedplan.planner.ir import PlanGraph
from fedplan.planner.trace import build_plan_graph

from .errors import BadInputError, TraceError
from .modelfile import default_loss


@dataclass(frozen=True)
class Analysis:
    """A captured, measured model: the planner's inputs."""

    graph: PlanGraph
    costs: CostModel
    captured: Captured
    notes: tuple[str, ...] = ()

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        return self.captured.graph_module


def default_targets(call: ModelCall) -> torch.Tensor:
    """Class 0 for every sample: enough for a cross-entropy loss's memory footprint."""
    first = next(t for t in call.tensors() if t.dim() > 0)
    return torch.zeros(call.batch_size, dtype=torch.long, device=first.device)


def flat_loss(captured: Captured, loss_fn: Callable) -> Callable:
    """``loss_fn`` on what the model returns, from the captured graph's flat outputs.

    Checks that the loss is a scalar tensor: a BadInputError names what was found.
    """

    def loss(outputs: Any, targets: Any) -> torch.Tensor:
        value = loss_fn(captured.unflatten(outputs), targets)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            found = (f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                     else type(value).__name__)
            raise BadInputError(
                f"loss_fn must return a scalar tensor; found {found}; reduce it (for example "
                f"with .mean()) before returning")
        return value

    return loss


def trace(model: nn.Module, example_inputs: Any, *, name: str | None = None
          ) -> tuple[Captured, PlanGraph]:
    """Capture ``model`` (sharing its parameters) and read it into a validated PlanGraph."""
    call = ModelCall.of(example_inputs)
    captured = capture(model, call)
    try:
        # shapes come from a copy so the user's BatchNorm statistics stay untouched
        shadow = copy.deepcopy(captured.graph_module)
        graph = build_plan_graph(shadow, captured.flatten(*call.args, **call.kwargs),
                                 name=name or type(model).__name__, notes=captured.notes)
    except Exception as exc:
        raise TraceError(
            f"running the captured {type(model).__name__} on the example inputs failed: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; check that "
            f"example_batch returns inputs the model accepts") from exc
    return captured, graph


def warn_leaf_modules(leaf_modules: Sequence[Any]) -> None:
    if leaf_modules:
        warnings.warn("leaf_modules is ignored: fedplan captures models with torch.export, "
                      "which follows every module", DeprecationWarning, stacklevel=3)


def analyze(model: nn.Module, example_inputs: Any, targets: Any = None, *,
            loss_fn: Callable | None = None, optimizer: str = "sgd",
            leaf_modules: Sequence[Any] = (), repeats: int = 5, compress: bool = True,
            progress: Callable[[str], None] | None = None) -> Analysis:
    """Capture ``model`` and measure its costs for one training step on this machine.

    Profiling runs on a deep copy, so the model's parameters and BatchNorm statistics
    are untouched. ``targets`` defaults to class 0 for every sample (enough for a
    cross-entropy loss to have the right memory footprint). With ``compress`` the
    compression options of every eligible activation are measured too
    (``planner.compression``).
    """
    warn_leaf_modules(leaf_modules)
    call = ModelCall.of(example_inputs)
    say = progress or (lambda _m: None)
    say("capturing the model with torch.export")
    captured, graph = trace(model, call)
    inputs = captured.flatten(*call.args, **call.kwargs)
    loss = flat_loss(captured, loss_fn or default_loss)
    if targets is None:
        targets = default_targets(call)
    shadow = copy.deepcopy(captured.graph_module)
    shadow.train(model.training)
    try:
        costs = measure_costs(shadow, graph, inputs, targets, loss, optimizer=optimizer,
                              repeats=repeats, progress=progress)
    except BadInputError:
        raise
    except (ValueError, RuntimeError) as exc:
        raise BadInputError(
            f"measuring {type(model).__name__} failed: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if compress:
        shadow = copy.deepcopy(captured.graph_module)
        shadow.train(model.training)
        costs = replace(costs, compress=measure_compression(
            shadow, graph, costs, inputs, repeats=max(1, min(repeats, 3)),
            progress=progress))
    return Analysis(graph=graph, costs=costs, captured=captured, notes=graph.notes)
