"""The cost model: what every node of a PlanGraph costs in bytes and seconds.

Measured mode (the default) runs the traced model through an ``fx.Interpreter`` on
this machine:

* **storages**: every tensor a node allocates is keyed by its storage, so views and
  in-place ops alias their base instead of counting twice;
* **saved bytes**: ``saved_tensors_hooks`` record what autograd saves for backward in
  each node, de-duplicated by storage, parameters and model inputs excluded; tensors
  that are not node outputs (BatchNorm's batch statistics, dropout masks, max-pool
  indices) become *internal* storages of the node that saved them;
* **temporaries**: the profiler's memory events inside each node give the bytes a node
  allocates and frees again before it returns;
* **forward seconds**: the median over several runs of each node's wall time; this is
  the node's recompute cost;
* **fixed costs**: parameters, buffers, gradients, optimizer state and the optimizer
  step's own temporaries (measured by profiling a real step on copies of the weights).

Analytic mode (``analytic_costs``) keeps the bytes and replaces seconds by
FLOPs / (device FLOP/s): for planning on a device that is not this machine.
"""

from __future__ import annotations

import bisect
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch.profiler import record_function
from torch.utils.flop_counter import FlopCounterMode

from .costmodel import (  # noqa: F401  (re-exported: the data lives in planner.costmodel)
    LOSS,
    CompressCost,
    CostModel,
    NodeCost,
    Storage,
    analytic_costs,
)
from .ir import PlanGraph
from .optimizers import check_optimizer, make_optimizer, optimizer_state_bytes
from .profiling import memory_deltas, memory_profile, peak_allocated

RANDOM_TARGETS = ("dropout", "bernoulli", "rand", "randn", "randint", "multinomial",
                  "Dropout", "AlphaDropout", "FeatureAlphaDropout")


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) tuple, list or dict, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in tensors_in(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in tensors_in(item)]
    return []


def _ptr(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _is_random(node: torch.fx.Node, modules: dict[str, torch.nn.Module]) -> bool:
    if isinstance(node.target, torch._ops.OpOverload):  # an ATen op says so in its tags
        return torch.Tag.nondeterministic_seeded in node.target.tags
    if node.op == "call_module":
        module = modules.get(node.target)
        return type(module).__name__ in RANDOM_TARGETS or any(
            type(m).__name__ in RANDOM_TARGETS for m in module.modules()) if module else False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return any(name == r or name.startswith(r + "_") for r in RANDOM_TARGETS)


def _unique_storage_bytes(tensors: Sequence[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for tensor in tensors:
        seen[_ptr(tensor)] = tensor.untyped_storage().nbytes()
    return sum(seen.values())


class _Profiler(torch.fx.Interpreter):
    """Runs the graph once, recording storages, saved tensors and in-place mutation.

    Every value is kept alive until the end of the run so that no storage address is
    reused by a later allocation (addresses identify storages here).
    """

    def __init__(self, gm: torch.fx.GraphModule, param_keys: dict[int, str],
                 input_ptrs: set[int]):
        super().__init__(gm, garbage_collect_values=False)
        self.param_keys = param_keys
        self.input_ptrs = input_ptrs
        self.owner: dict[int, str] = {}         # storage address -> storage key
        self.storages: dict[str, Storage] = {}
        self.outputs: dict[str, tuple[str, ...]] = {}
        self.allocates: dict[str, list[str]] = {}
        self.saved: dict[str, list[str]] = {}
        self.mutates: dict[str, tuple[str, ...]] = {}
        self.requires_grad: dict[str, bool] = {}
        self.keep_alive: list[Any] = []
        self.current = ""

    def _pack(self, tensor: torch.Tensor):
        self.keep_alive.append(tensor)
        ptr = _ptr(tensor)
        if ptr in self.param_keys or ptr in self.input_ptrs or tensor.numel() == 0:
            return tensor
        key = self.owner.get(ptr)
        if key is None:  # a tensor no node returned: internal to the node that saved it
            count = sum(1 for k in self.storages if k.startswith(self.current + "#"))
            key = f"{self.current}#{count}"
            self.owner[ptr] = key
            self.storages[key] = Storage(key, tensor.untyped_storage().nbytes(),
                                         self.current, "internal")
            self.allocates[self.current].append(key)
        saved = self.saved[self.current]
        if key not in saved:
            saved.append(key)
        return tensor

    def run_node(self, n: torch.fx.Node) -> Any:
        self.current = n.name
        self.allocates[n.name] = []
        self.saved[n.name] = []
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        inputs = [(inp.name, t) for inp in n.all_input_nodes for t in tensors_in(self.env[inp])]
        versions = [(name, t._version) for name, t in inputs]
        with record_function(f"fedplan::{n.name}"), \
                torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            result = getattr(self, n.op)(n.target, args, kwargs)
        self.keep_alive.append(result)
        self.mutates[n.name] = tuple(dict.fromkeys(
            name for (name, before), (_, t) in zip(versions, inputs) if t._version != before))
        keys = []
        for index, tensor in enumerate(tensors_in(result)):
            ptr = _ptr(tensor)
            if ptr in self.param_keys:
                continue
            key = self.owner.get(ptr)
            if key is None:
                key = n.name if index == 0 or n.name not in self.storages else f"{n.name}:{index}"
                # model inputs and attributes (buffers, constants) are held by their
                # owners for the whole step: never freed, never planned
                kind = "input" if (n.op in ("placeholder", "get_attr")
                                   or ptr in self.input_ptrs) else "activation"
                self.owner[ptr] = key
                self.storages[key] = Storage(key, tensor.untyped_storage().nbytes(), n.name, kind)
                if kind == "activation" and n.op != "get_attr":
                    self.allocates[n.name].append(key)
            if key not in keys:
                keys.append(key)
        self.outputs[n.name] = tuple(keys)
        self.requires_grad[n.name] = any(t.requires_grad for t in tensors_in(result))
        return result


def _memory_by_scope(prof) -> dict[str, tuple[int, int]]:
    """For each ``fedplan::NAME`` range: (peak above the level at entry, level change)."""
    events = prof.profiler.kineto_results.events()
    memory = memory_deltas(prof)
    scopes = [(e.start_ns(), e.end_ns(), e.name()[len("fedplan::"):])
              for e in events if e.name().startswith("fedplan::")]
    result = {}
    times = [t for t, _ in memory]
    levels = []
    level = 0
    for _, delta in memory:
        level += delta
        levels.append(level)
    for start, end, name in scopes:
        i = bisect.bisect_left(times, start)
        j = bisect.bisect_right(times, end)
        base = levels[i - 1] if i > 0 else 0
        inside = levels[i:j]
        peak = max(inside, default=base) - base
        change = (inside[-1] if inside else base) - base
        result[name] = (max(peak, 0), change)
    return result


def _backward_temps(gm: torch.fx.GraphModule, inputs: Sequence[torch.Tensor], targets: Any,
                    loss_fn: Callable, aliasing: set[str], sharing: set[str]
                    ) -> dict[str, tuple[int, int]]:
    """Profile one backward with a range around each node's autograd function.

    A prehook and a hook on the ``grad_fn`` of every node's output open and close a
    ``record_function`` range; on the CPU the autograd engine runs in the calling thread,
    so the ranges bracket exactly that node's backward work. Nodes whose backward hands
    its inputs views of its own output's gradient (cat, views, split) are added to
    ``aliasing``: that gradient buffer then lives until every view of it is released.
    """
    values: dict[str, Any] = {}

    class _Keeper(torch.fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            values[n.name] = result
            return result

    outputs = _Keeper(gm).run(*inputs)
    loss = loss_fn(outputs, targets)
    # The loss may be several autograd nodes (log_softmax, nll): profile its backward
    # alone, on detached outputs, so the whole of it is one range.
    detached = _detach_like(outputs)
    loss_alone = loss_fn(detached, targets)
    with memory_profile() as loss_prof:
        with record_function(f"fedplan::{LOSS}"):
            loss_alone.backward()
    loss_scope = _memory_by_scope(loss_prof)
    del detached, loss_alone
    seen: set[int] = set()

    input_fns: dict[str, set[int]] = {}
    for node in gm.graph.nodes:
        fns = set()
        for inp in node.all_input_nodes:
            for tensor in tensors_in(values.get(inp.name)):
                if tensor.grad_fn is not None:
                    fns.add(id(tensor.grad_fn))
        input_fns[node.name] = fns

    def bracket(name: str, grad_fn) -> None:
        ranges: list[Any] = []
        # "direct": this autograd function reads the node's inputs themselves, so the
        # gradients it returns are the inputs' gradients (not, say, a reshape inside
        # a Linear on 3-d input, whose result feeds a matmul first)
        following = {id(fn) for fn, _ in grad_fn.next_functions
                     if fn is not None and type(fn).__name__ != "AccumulateGrad"}
        direct = bool(following) and following <= input_fns.get(name, set())

        def pre(_grad_outputs):
            ranges.append(record_function(f"fedplan::{name}"))
            ranges[-1].__enter__()

        def post(grad_inputs, grad_outputs):
            if ranges:
                ranges.pop().__exit__(None, None, None)
            if not direct:  # several autograd ops inside: their inputs are not ours
                return
            outs = [g for g in grad_outputs if isinstance(g, torch.Tensor)]
            ptrs = {_ptr(g) for g in outs}
            for g in grad_inputs:
                if isinstance(g, torch.Tensor) and _ptr(g) in ptrs:
                    aliasing.add(name)
                    if any(g is out for out in outs):
                        sharing.add(name)

        grad_fn.register_prehook(pre)
        grad_fn.register_hook(post)

    for name, value in values.items():
        for tensor in tensors_in(value):
            grad_fn = tensor.grad_fn
            if grad_fn is not None and id(grad_fn) not in seen:
                seen.add(id(grad_fn))
                bracket(name, grad_fn)
    values.clear()
    del outputs
    with memory_profile() as prof:
        loss.backward()
    scopes = _memory_by_scope(prof)
    scopes.update(loss_scope)
    return scopes


def _detach_like(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().requires_grad_(value.requires_grad)
    if isinstance(value, (tuple, list)):
        return type(value)(_detach_like(item) for item in value)
    if isinstance(value, dict):
        return {key: _detach_like(item) for key, item in value.items()}
    return value


def _time_nodes(gm: torch.fx.GraphModule, inputs: Sequence[torch.Tensor], repeats: int
                ) -> dict[str, float]:
    samples: dict[str, list[float]] = {}

    class _Timer(torch.fx.Interpreter):
        def run_node(self, n):
            start = time.perf_counter()
            result = super().run_node(n)
            samples.setdefault(n.name, []).append(time.perf_counter() - start)
            return result

    for _ in range(repeats + 1):  # the first run warms caches and is dropped
        _Timer(gm).run(*inputs)
    return {name: statistics.median(values[1:]) for name, values in samples.items()}


def _count_flops(gm: torch.fx.GraphModule, inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    flops: dict[str, int] = {}

    class _Counter(torch.fx.Interpreter):
        def run_node(self, n):
            with FlopCounterMode(display=False) as counter:
                result = super().run_node(n)
            flops[n.name] = int(counter.get_total_flops())
            return result

    _Counter(gm).run(*inputs)
    return flops


def measure_optimizer_step_temp(optimizer: str, params: Sequence[torch.nn.Parameter]) -> int:
    """Profile one optimizer step on copies of the weights: bytes it allocates transiently."""
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p in copies:
        p.grad = torch.zeros_like(p)
    opt = make_optimizer(optimizer, copies)
    opt.step()  # creates the state, as the first training step does
    with memory_profile() as prof:
        opt.step()
    return peak_allocated(prof)


def measure_costs(gm: torch.fx.GraphModule, graph: PlanGraph, inputs: Sequence[torch.Tensor],
                  targets: Any, loss_fn: Callable, *, optimizer: str = "sgd",
                  repeats: int = 5, progress: Callable[[str], None] | None = None) -> CostModel:
    """Measure a CostModel for ``graph`` (traced as ``gm``) on this machine."""
    check_optimizer(optimizer)
    say = progress or (lambda _msg: None)
    model_params = list(gm.named_parameters(remove_duplicate=True))
    param_keys = {_ptr(p): name for name, p in model_params}
    trainable = [(name, p) for name, p in model_params if p.requires_grad]
    trainable_ptr = {_ptr(p): name for name, p in trainable}
    batch = tensors_in(list(inputs)) + tensors_in(targets)
    input_ptrs = {_ptr(t) for t in batch}
    modules = dict(gm.named_modules())

    say("profiling saved tensors and memory")
    profiler = _Profiler(gm, param_keys, input_ptrs)
    with memory_profile() as prof:
        outputs = profiler.run(*inputs)
        profiler.current = LOSS
        profiler.allocates[LOSS] = []
        profiler.saved[LOSS] = []
        with record_function(f"fedplan::{LOSS}"), \
                torch.autograd.graph.saved_tensors_hooks(profiler._pack, lambda t: t):
            loss = loss_fn(outputs, targets)
    scoped = _memory_by_scope(prof)
    del loss, outputs

    say("profiling backward")
    aliasing: set[str] = set()
    sharing: set[str] = set()
    backward = _backward_temps(gm, inputs, targets, loss_fn, aliasing, sharing)
    gm.zero_grad(set_to_none=True)

    say("timing nodes")
    seconds = _time_nodes(gm, inputs, repeats)
    loss_seconds = []
    for _ in range(repeats):
        out = gm(*inputs)
        start = time.perf_counter()
        loss_fn(out, targets)
        loss_seconds.append(time.perf_counter() - start)
    flops = _count_flops(gm, inputs)

    fx_nodes = {n.name: n for n in gm.graph.nodes}
    costs = []
    for node in graph.nodes:
        fx_node = fx_nodes[node.name]
        used: list[str] = []
        if node.op == "call_module":
            used = [trainable_ptr[_ptr(p)] for p in modules[fx_node.target].parameters()
                    if _ptr(p) in trainable_ptr]
        for inp in fx_node.all_input_nodes:
            if inp.op == "get_attr":
                value = profiler.env.get(inp)
                if isinstance(value, torch.Tensor) and _ptr(value) in trainable_ptr:
                    used.append(trainable_ptr[_ptr(value)])
        peak, change = scoped.get(node.name, (0, 0))
        back_peak, back_change = backward.get(node.name, (0, 0))
        costs.append(NodeCost(
            name=node.name, outputs=profiler.outputs.get(node.name, ()),
            allocates=tuple(profiler.allocates.get(node.name, ())),
            saved=tuple(profiler.saved.get(node.name, ())),
            forward_seconds=seconds.get(node.name, 0.0), flops=flops.get(node.name, 0),
            temp_bytes=max(0, peak - max(change, 0)),
            backward_temp_bytes=max(0, back_peak - max(back_change, 0)),
            grad_aliases=node.name in aliasing, grad_shares=node.name in sharing,
            requires_grad=profiler.requires_grad.get(node.name, False),
            params=tuple(dict.fromkeys(used)), mutates=profiler.mutates.get(node.name, ()),
            random=_is_random(fx_node, modules)))
    peak, change = scoped.get(LOSS, (0, 0))
    loss_back = backward.get(LOSS, (0, 0))
    costs.append(NodeCost(
        name=LOSS, outputs=(), allocates=tuple(profiler.allocates[LOSS]),
        saved=tuple(profiler.saved[LOSS]), forward_seconds=statistics.median(loss_seconds),
        temp_bytes=max(0, peak - max(change, 0)), requires_grad=True,
        backward_temp_bytes=max(0, loss_back[0] - max(loss_back[1], 0)),
        params=(), mutates=(), random=False))
    sizes = [p.numel() * p.element_size() for _, p in trainable]
    say("measuring the optimizer step")
    return CostModel(
        nodes=tuple(costs), storages=tuple(profiler.storages.values()),
        params=tuple((name, p.numel() * p.element_size()) for name, p in trainable),
        param_bytes=sum(p.numel() * p.element_size() for _, p in model_params),
        buffer_bytes=_unique_storage_bytes(list(gm.buffers())) if list(gm.buffers()) else 0,
        input_bytes=_unique_storage_bytes(batch),
        optimizer=optimizer, optimizer_state_bytes=optimizer_state_bytes(optimizer, sizes),
        optimizer_step_temp_bytes=measure_optimizer_step_temp(
            optimizer, [p for _, p in trainable]),
        batch_size=next(int(t.shape[0]) for t in batch if t.dim() > 0),
        # non-reentrant checkpoint saves the CPU RNG state per region (preserve_rng_state)
        region_bytes=torch.get_rng_state().numel())
