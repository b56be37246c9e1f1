"""Rewrite a captured model so that it runs a plan.

The captured GraphModule (``planner.capture``: torch.export's training IR, flat inputs
and outputs) is split (``torch.fx.passes.split_module``) into consecutive
partitions, one per run of nodes with the same decision; every ``recompute`` partition
runs under ``torch.utils.checkpoint(use_reentrant=False)``: autograd keeps only the
partition's inputs and replays it when backward reaches it. Everything else runs as
before. The planned module registers the user's own submodules, parameters and buffers
under their own names, so an optimizer built on either module trains both and
``state_dict`` keys are unchanged.

Pitfalls handled here:

* **Buffer mutations** (BatchNorm's running statistics and ``num_batches_tracked``) would
  happen again when a region is replayed: the replay runs with the buffers the region
  mutates saved and restored around it, so they are applied once.
* **Randomness** (dropout): checkpoint saves and restores the RNG state, so the replay
  draws the same numbers (``preserve_rng_state=True``, the default).
* **In-place ops** never cross a region boundary: the plan space ties them to their
  input's producer (``planner.candidates``).

Compressed nodes (``compress:OPTION``) run as kept nodes; a mark after each (see
``runtime.compress``) packs its storage, and the whole forward runs under the
compression hooks, outside the checkpoint regions.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from collections.abc import Iterator, Mapping

import torch
import torch.fx
from torch import nn
from torch.fx.passes.split_module import split_module
from torch.utils.checkpoint import checkpoint

from fedplan.planner.capture import Captured
from fedplan.planner.errors import BadInputError
from fedplan.planner.plan import RECOMPUTE, Plan
from fedplan.planner.program import Schedule
from fedplan.planner.program import regions as plan_regions

from .compress import CompressionSession, active, insert_marks

COMPUTE_OPS = ("call_module", "call_function", "call_method")


@contextlib.contextmanager
def _buffers_restored(buffers: list[torch.Tensor]) -> Iterator[None]:
    """Run a replay without changing the buffers it mutates (BatchNorm statistics)."""
    saved = [(buffer, buffer.detach().clone()) for buffer in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


class RecomputeRegion(nn.Module):
    """A partition run under non-reentrant checkpoint.

    Buffer mutations (BatchNorm running statistics, ``num_batches_tracked``) are applied
    once. In the captured graph a region receives the buffers it reads as inputs
    (``buffer_inputs``: their positions). ATen's batch_norm updates running statistics
    without bumping version counters, so the first forward finds the mutated ones by
    value: it compares copies of the (small) buffer inputs before and after. Every replay
    in backward then runs with those buffers saved and restored around it.
    """

    def __init__(self, inner: torch.fx.GraphModule, buffer_inputs: list[int]):
        super().__init__()
        self.inner = inner
        self.buffer_inputs = buffer_inputs
        self.mutated: list[int] | None = None

    def _first_run(self, *inputs):
        before = {index: inputs[index].detach().clone() for index in self.buffer_inputs}
        result = self.inner(*inputs)
        self.mutated = [index for index, value in before.items()
                        if not torch.equal(value, inputs[index])]
        return result

    def forward(self, *args):
        if not torch.is_grad_enabled():
            return self.inner(*args)
        calls = [0]

        def run(*inputs):
            calls[0] += 1
            if calls[0] == 1:
                if self.mutated is None:
                    return self._first_run(*inputs)
                return self.inner(*inputs)
            if self.mutated:
                with _buffers_restored([inputs[index] for index in self.mutated]):
                    return self.inner(*inputs)
            return self.inner(*inputs)

        return checkpoint(run, *args, use_reentrant=False)


def build_program(graph_module: torch.fx.GraphModule, decisions: Mapping[str, str]
                  ) -> tuple[torch.fx.GraphModule, int]:
    """Split at the plan's checkpoint regions (``planner.program.regions``, the one
    definition of a region) and wrap them; returns (program, regions)."""
    compute = [node for node in graph_module.graph.nodes if node.op in COMPUTE_OPS]
    marks = {node.name for node in compute if node.name not in decisions
             and node.op == "call_function"
             and getattr(node.target, "__name__", "") in ("_mark", "_unpin")}
    region_of = {name: index for index, members in enumerate(
        plan_regions([node.name for node in compute if node.name not in marks], decisions))
        for name in members}
    partition: dict[str, int] = {}
    kinds: dict[int, str] = {}
    current, last = 0, None
    for node in compute:
        if node.name in marks and last is not None:
            partition[node.name] = current  # compression bookkeeping: with the node before
            continue
        kind = ("region", region_of[node.name]) if node.name in region_of else "keep"
        if last is not None and kind != last:
            current += 1
        last = kind
        partition[node.name] = current
        kinds[current] = RECOMPUTE if kind != "keep" else "keep"
    if not any(kind == RECOMPUTE for kind in kinds.values()):
        return graph_module, 0
    program = split_module(graph_module, graph_module, lambda node: partition[node.name],
                           keep_original_order=True)
    parameters = {id(p) for p in graph_module.parameters()}
    buffer_inputs: dict[str, list[int]] = {}
    for node in program.graph.nodes:
        if node.op == "call_module":
            buffer_inputs[node.target] = [
                position for position, arg in enumerate(node.args)
                if isinstance(arg, torch.fx.Node) and arg.op == "get_attr"
                and isinstance(value := _attribute(program, arg.target), torch.Tensor)
                and id(value) not in parameters]
    regions = 0
    for index, kind in kinds.items():
        name = f"submod_{index}"
        if kind == RECOMPUTE and hasattr(program, name):
            setattr(program, name, RecomputeRegion(getattr(program, name),
                                                   buffer_inputs.get(name, [])))
            regions += 1
        elif hasattr(program, name):
            _inline(program, name)
    program.graph.lint()
    program.recompile()
    return program, regions


def _inline(program: torch.fx.GraphModule, name: str) -> None:
    """Put a kept partition's nodes back into the top-level graph.

    Called as a submodule, a partition's inputs stay referenced by the caller until the
    call returns, so a tensor the partition reads first and never again (a region's output
    read by the next op) stayed alive through the whole rest of the forward: 16 MiB above
    the simulator on a conv-BN-ReLU stage whose BatchNorm alone was recomputed. Inlined,
    fx's generated code drops every value after its last use, as the simulator assumes.
    """
    graph = program.graph
    inner: torch.fx.GraphModule = getattr(program, name)
    for call in [n for n in graph.nodes if n.op == "call_module" and n.target == name]:
        env: dict[torch.fx.Node, object] = {}
        placeholders = [n for n in inner.graph.nodes if n.op == "placeholder"]
        for placeholder, arg in zip(placeholders, call.args, strict=True):
            env[placeholder] = arg
        result = None
        with graph.inserting_before(call):
            for node in inner.graph.nodes:
                if node.op == "placeholder":
                    continue
                if node.op == "output":
                    result = torch.fx.map_arg(node.args[0], env.__getitem__)
                    continue
                if node.op in ("get_attr", "call_module"):
                    target = f"{name}_{node.target}".replace(".", "_")
                    if not hasattr(program, target):
                        setattr(program, target, _attribute(inner, node.target))
                    copied = graph.node_copy(node, env.__getitem__)
                    copied.target = target
                else:
                    copied = graph.node_copy(node, env.__getitem__)
                env[node] = copied
        if isinstance(result, (tuple, list)):
            for user in list(call.users):
                if user.op == "call_function" and user.target is operator.getitem:
                    user.replace_all_uses_with(result[user.args[1]])
                    graph.erase_node(user)
            if call.users:
                raise RuntimeError(f"partition {name} is used other than by index; this is a "
                                   f"bug in fedplan, please report it")
        else:
            call.replace_all_uses_with(result)
        graph.erase_node(call)
    program.delete_submodule(name)


def derived_schedule(captured: Captured, plan: Plan) -> Schedule:
    """The plan lowered on the captured model's step program, for a caller that has no
    analysis (a saved plan applied to a model): the storage facts (aliases, in-place ops,
    readers) are measured once on zero inputs of the captured shapes, under a loss that
    sums the outputs (the loss's own costs play no part in the runtime's schedule)."""
    from fedplan.planner.cost import measure_costs
    from fedplan.planner.program import lower, program_of
    from fedplan.planner.trace import build_plan_graph

    graph_module = copy.deepcopy(captured.graph_module)
    inputs = []
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            value = node.meta.get("val")
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"the captured input {node.name} has no recorded shape; "
                                 f"pass the plan's schedule to PlannedModule")
            inputs.append(torch.zeros(value.shape, dtype=value.dtype))
    graph = build_plan_graph(copy.deepcopy(graph_module), inputs)

    def summed(outputs, _targets):
        leaves = [o for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point()]
        return sum(o.float().sum() for o in leaves)

    costs = measure_costs(graph_module, graph, inputs, None, summed, repeats=1)
    return lower(program_of(graph, costs), plan.decision_map)


def _attribute(module: nn.Module, qualified: str):
    for part in qualified.split("."):
        module = getattr(module, part)
    return module


class PlannedModule(nn.Module):
    """The user's model, running a plan; drop-in for the original in a training loop."""

    def __init__(self, model: nn.Module, captured: Captured, plan: Plan,
                 schedule: Schedule | None = None):
        """``schedule``: the plan lowered on the model's step program
        (``planner.program.lower``), whose pack and unpin points a plan that compresses
        needs; ``fedplan.compile`` passes it, otherwise it is derived again
        (:func:`derived_schedule`)."""
        super().__init__()
        graph_module = captured.graph_module
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, parameter in model.named_parameters(recurse=False):
            self.register_parameter(name, parameter)
        for name, buffer in model.named_buffers(recurse=False):
            self.register_buffer(name, buffer,
                                 persistent=name not in model._non_persistent_buffers_set)
        self.plan = plan
        object.__setattr__(self, "_captured", captured)
        object.__setattr__(self, "_model", model)
        self.compressed = len(plan.compressed)
        if self.compressed:
            if schedule is None:
                schedule = derived_schedule(captured, plan)
            # marks go into a copy of the graph (the caller's graph module is shared)
            graph_module = torch.fx.GraphModule(graph_module,
                                                copy.deepcopy(graph_module.graph))
            insert_marks(graph_module, plan.decision_map, dict(schedule.pack_after),
                         dict(schedule.unpin_after))
        program, regions = build_program(graph_module, plan.decision_map)
        # kept outside the module tree: its modules are ours already, registered above
        object.__setattr__(self, "_program", program)
        self.regions = regions
        self.original_type = type(model).__name__
        self.train(model.training)

    def forward(self, *args, **kwargs):
        if not self.training:
            # the captured graph is the training step's (dropout on, batch statistics);
            # evaluation runs the user's own module, which shares every tensor with us
            return self._model(*args, **kwargs)
        flat = self._captured.flatten(*args, **kwargs)
        if not self.compressed or not torch.is_grad_enabled():
            return self._captured.unflatten(self._program(*flat))
        params = {p.untyped_storage().data_ptr() for p in self.parameters()}
        params.update(b.untyped_storage().data_ptr() for b in self.buffers())
        session = CompressionSession(params)
        with active(session):
            return self._captured.unflatten(self._program(*flat))

    def train_step(self, inputs, targets, optimizer: torch.optim.Optimizer,
                   loss_fn=None) -> torch.Tensor:
        """One whole training step under the plan; returns the (detached) loss.

        ``inputs`` as the model takes them (a tensor, a tuple, or a dict of keyword
        inputs); ``loss_fn(outputs, targets)`` defaults to cross-entropy. A plan with
        step-level decisions (micro-batches, the optimizer step inside backward, 8-bit
        optimizer state) runs only through here; for a plan without them this is exactly
        ``optimizer.zero_grad(set_to_none=True); loss_fn(self(...), targets).backward();
        optimizer.step()``.
        """
        from .optim_state import _QuantizedStateOptimizer
        from .step import StepOptions, train_step

        choice = self.plan.step_choice
        if choice.state_bits == 8 and not isinstance(optimizer, _QuantizedStateOptimizer):
            raise BadInputError(
                f"the plan keeps the optimizer state in 8 bits; found a "
                f"{type(optimizer).__name__}; build the optimizer with "
                f"fedplan.runtime.optim_state.to_quantized(optimizer)")
        if loss_fn is None:
            loss_fn = torch.nn.functional.cross_entropy
        options = StepOptions(microbatches=choice.microbatches,
                              optimizer_in_backward=choice.optimizer_in_backward)
        return train_step(self, inputs, targets, loss_fn, optimizer, options=options)

    def extra_repr(self) -> str:
        counts = self.plan.counts()
        step = self.plan.step_choice
        return (f"plan={self.plan.solver}, step={step.describe()}, "
                f"budget={self.plan.budget_bytes} B, "
                f"recompute={counts.get(RECOMPUTE, 0)}, regions={self.regions}, "
                f"compressed={self.compressed}")
