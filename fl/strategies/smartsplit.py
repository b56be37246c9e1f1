"""SmartSplit (Tian et al., TPDS'24, arXiv 2410.11577): split training with an edge server.

A client trains the blocks before its **cut** on the device, under a fedplan plan for its
own budget (the device's part of the model with the gradient from the edge as its loss
signal, so the plan's recompute and compression choices are the paper's "cost-aware
checkpointing" on the device); the **edge server** (MEC) trains the blocks after the cut
for it: per local step the device sends the cut activation up, the edge runs forward and
backward of its part and the loss, and sends the activation's gradient back. A client
whose budget holds a plan for the whole model trains it locally (cut at the end).

**The edge server** is its own participant: ``edge_memory_bytes`` (default 4 GB) and
``edge_speed`` (relative to a speed-1.0 device; default 8). Each split client it serves
holds its part's keep-all training peak (measured with fedplan's planner) on the edge; a
round serves split clients in selection order while the sum fits the edge's memory, and
skips the rest ("edge server full"). The split clients of a round share the edge's
compute: each one's edge work runs at ``edge_speed / m`` with ``m`` split clients in the
round.

**The simulated clock** charges a split client per local step: its device part's step
time (plan included) over its speed, plus its edge part's step time over the edge's share,
plus the bytes across the cut (activation up and gradient down) over
``bandwidth_bytes_per_second`` (default 2.5 MB/s = 20 Mbit/s). Those bytes are counted in
``bytes_sent`` too.

**The cut** (the paper's central manager picks it from memory, capacity and data):
among the block boundaries (:mod:`.blocks`) whose device part has a plan within the
client's budget, the one with the least simulated step time (device + edge share +
link). Clients are chosen uniformly among those with any feasible cut (the paper's
manager also weighs data; here the cut is the system-aware part).

**Failure**: ``edge_fail_round`` (1-based; fault injection) makes the edge server fail
halfway through that round's local training: every split client of that round ends with
an error and is rejected with the reason "edge server failed" (logged); clients training
locally still count, and the next round goes on.

In the embedded simulation the edge's computation runs in the client's process (its
memory, speed and link are accounted as above); the device's measured peak excludes the
edge's tensors: the profiled steps replay the device's step with the edge's gradient
(:func:`train_split`). Where the paper is silent (edge concurrency, cut candidates,
bandwidth), the choices above were made before any run and are not tuned.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fedplan
from fedplan.modelfile import ModelSpec
from fedplan.planner.optimizers import make_optimizer
from fedplan.runtime.measure import held_bytes, profiled_peak

from ..client import PROFILED_STEPS, local_steps, no_collection, train_client
from ..messages import ClientReply, TrainInstruction, state_from_arrays, state_to_arrays
from ..plan_cache import REFERENCE_FLOPS_PER_SECOND, CachedPlan, Infeasible, PlanCache
from ..policy import (
    Assignment,
    ClientInfo,
    PolicyConfig,
    RoundPolicy,
    make_candidate,
    plan_digest,
)
from ..selectors import Candidate, FeasibleRandomSelector
from . import register
from .blocks import blocks_of, example_input, shared, spec_key

__all__ = ["EdgeFailure", "SmartSplitPolicy", "train_split"]


class EdgeFailure(RuntimeError):
    """The edge server failed during the round."""


def cut_loss(outputs: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """The device part's loss: its output times the gradient the edge sent back (its
    backward is exactly the split step's)."""
    return (outputs * gradient).sum()


def _parts(model: nn.Module, cut: int, example: torch.Tensor
           ) -> tuple[nn.Module, nn.Module]:
    blocks = blocks_of(model, "smartsplit", example)
    return nn.Sequential(*blocks[:cut]), nn.Sequential(*blocks[cut:])


class SmartSplitPolicy(RoundPolicy):
    """SmartSplit: see the module doc."""

    name = "smartsplit"

    def __init__(self, *, config: PolicyConfig, cache: PlanCache, spec: ModelSpec,
                 log: Callable[[str, dict[str, Any]], None] | None = None,
                 edge_memory_bytes: int = 4 * 10**9, edge_speed: float = 8.0,
                 bandwidth_bytes_per_second: float = 12.5e6,
                 edge_fail_round: int | None = None, plan_time_limit: float = 10.0):
        super().__init__(config=config, cache=cache, selector=FeasibleRandomSelector(),
                         model_factory=spec.build, log=log)
        if edge_memory_bytes <= 0 or edge_speed <= 0 or bandwidth_bytes_per_second <= 0:
            raise ValueError("smartsplit: edge memory, edge speed and bandwidth must be "
                             "positive")
        self.spec = spec
        self.edge_memory_bytes = int(edge_memory_bytes)
        self.edge_speed = float(edge_speed)
        self.bandwidth = float(bandwidth_bytes_per_second)
        self.edge_fail_round = edge_fail_round
        self.plan_time_limit = float(plan_time_limit)
        self.inputs, self.targets = example_input(spec, config.batch_size)
        model = spec.build()
        blocks = blocks_of(model, "smartsplit", self.inputs)
        self.num_blocks = len(blocks)
        self.cut_facts: dict[int, dict[str, Any]] = {}
        x = self.inputs
        for cut in range(1, self.num_blocks):
            with torch.no_grad():
                x = blocks[cut - 1](x)
            self.cut_facts[cut] = shared(
                ("edge", spec_key(spec), cut, config.batch_size),
                lambda model=model, cut=cut, x=x: self._edge_facts(model, cut, x))
        self._caches: dict[int, PlanCache] = {self.num_blocks: cache}

    def _edge_facts(self, model: nn.Module, cut: int, activation: torch.Tensor
                    ) -> dict[str, Any]:
        """The edge part's keep-all peak and analytic step time, and the cut's bytes."""
        from fedplan.planner.cost import analytic_costs
        _, edge = _parts(model, cut, self.inputs)
        with no_collection():  # measured bytes (client.py's no_collection)
            plan, analysis = fedplan.plan(edge, activation, self.targets, budget=10**13,
                                          loss_fn=self.spec.loss_fn, repeats=1,
                                          compress=False, verify=False)
        costs = analytic_costs(analysis.costs, flops_per_second=REFERENCE_FLOPS_PER_SECOND)
        return {"edge_bytes": int(plan.predicted_peak_bytes),
                "edge_step_seconds": 3.0 * sum(n.forward_seconds for n in costs.nodes),
                "cut_bytes": int(activation.numel() * activation.element_size()),
                "shape": list(activation.shape)}

    def device_cache(self, cut: int) -> PlanCache:
        if cut not in self._caches:
            spec, facts = self.spec, self.cut_facts[cut]
            gradient = torch.randn(facts["shape"], generator=torch.Generator().manual_seed(3))
            key = ("cut", spec_key(spec), cut, self.config.batch_size, self.config.lr,
                   self.cache.bucket_fraction, self.plan_time_limit)
            self._caches[cut] = shared(key, lambda: PlanCache(
                lambda: _parts(spec.build(), cut, self.inputs)[0], self.inputs, gradient,
                lr=self.config.lr, loss_fn=cut_loss,
                bucket_fraction=self.cache.bucket_fraction,
                options=fedplan.SolverOptions(workers=1,
                                              time_limit_seconds=self.plan_time_limit)))
        return self._caches[cut]

    def step_estimate(self, cut: int, entry: CachedPlan, speed: float, sharing: int = 1
                      ) -> tuple[float, float, int]:
        """(device seconds per step at speed 1, edge + link seconds per step, bytes per
        step across the cut)."""
        if cut == self.num_blocks:
            return entry.step_seconds, 0.0, 0
        facts = self.cut_facts[cut]
        moved = 2 * facts["cut_bytes"]
        edge = facts["edge_step_seconds"] / (self.edge_speed / max(1, sharing))
        return entry.step_seconds, edge + moved / self.bandwidth, moved

    def best_cut(self, budget_bytes: int, speed: float
                 ) -> tuple[int, CachedPlan | Infeasible]:
        """The feasible cut with the least simulated step time (module doc)."""
        best, best_time, last = None, math.inf, None
        for cut in range(1, self.num_blocks + 1):
            entry = self.device_cache(cut).lookup(budget_bytes)
            last = entry
            if not isinstance(entry, CachedPlan):
                continue
            device, extra, _ = self.step_estimate(cut, entry, speed)
            seconds = device / speed + extra
            if seconds < best_time:
                best, best_time = (cut, entry), seconds
        return best if best is not None else (1, last)

    def candidate(self, client: ClientInfo) -> Candidate:
        cut, entry = self.best_cut(client.budget_bytes, client.speed)
        steps = local_steps(client.num_samples, self.config.batch_size, self.config.epochs)
        extra = self.step_estimate(cut, entry, client.speed)[1] \
            if isinstance(entry, CachedPlan) else 0.0
        return make_candidate(client, entry, steps=steps,
                              keep_all_bytes=self.cache.keep_all_bytes,
                              keep_all_step_seconds=self.cache.base_step_seconds,
                              extra_step_seconds=extra)

    def configure(self, round_index, clients, weights):
        by_id = {c.client_id: c for c in clients}
        chosen = self.select(round_index, clients)
        cuts = {cid: self.best_cut(by_id[cid].budget_bytes, by_id[cid].speed)
                for cid in chosen}
        # the edge's memory: split clients in selection order while their parts fit
        used, self._edge_served = 0, []
        for cid in chosen:
            cut, entry = cuts[cid]
            if isinstance(entry, CachedPlan) and cut < self.num_blocks:
                need = self.cut_facts[cut]["edge_bytes"]
                if used + need <= self.edge_memory_bytes:
                    used += need
                    self._edge_served.append(cid)
        self._cuts = cuts
        self._edge_bytes_used = used
        return super().configure(round_index, clients, weights, chosen=chosen)

    def assign(self, round_index: int, client: ClientInfo, weights: dict[str, np.ndarray]
               ) -> Assignment | str:
        cut, entry = self._cuts[client.client_id]
        if not isinstance(entry, CachedPlan):
            return f"no cut has a device plan within its budget of {client.budget_bytes} B"
        split = cut < self.num_blocks
        if split and client.client_id not in self._edge_served:
            return (f"edge server full: its {self.edge_memory_bytes} B hold the parts of "
                    f"{len(self._edge_served)} split clients this round")
        device, extra, moved = self.step_estimate(cut, entry, client.speed,
                                                  sharing=len(self._edge_served))
        task: dict[str, Any] = {"strategy": self.name, "cut": cut}
        if split and self.edge_fail_round is not None and \
                round_index + 1 == int(self.edge_fail_round):
            steps = local_steps(client.num_samples, self.config.batch_size,
                                self.config.epochs)
            task["edge_fail_step"] = max(1, steps // 2)
        return Assignment(
            client_id=client.client_id,
            instruction=self.instruction(round_index, client, entry.plan_json, weights, task),
            digest=plan_digest(entry.plan_json), expected=weights,
            budget_bytes=client.budget_bytes, speed=client.speed, step_seconds=device,
            extra_step_seconds=extra, bytes_per_step=moved,
            info={"cut": cut, "split": split})

    def round_info(self, round_index: int) -> dict[str, Any]:
        return {"edge_clients": len(getattr(self, "_edge_served", [])),
                "edge_bytes": getattr(self, "_edge_bytes_used", 0)}


def train_split(instruction: TrainInstruction, train_x: torch.Tensor, train_y: torch.Tensor,
                spec: ModelSpec) -> ClientReply:
    """One split client's round: the device part under its plan, the edge part plainly
    (see the module doc). The first :data:`PROFILED_STEPS` steps measure the device's
    peak: the edge's gradient for the batch is computed first from an unprofiled,
    no-grad device forward (the same values: the device part is deterministic), then the
    device's step (forward, backward with that gradient, optimizer step) runs alone under
    the profiler."""
    cut = int(instruction.task["cut"])
    model = spec.build()
    example, _ = example_input(spec, 2)
    if cut >= len(blocks_of(model, "smartsplit", example)):
        return train_client(instruction, train_x, train_y, model_factory=spec.build,
                            loss_fn=spec.loss_fn)
    model.load_state_dict(state_from_arrays(instruction.weights))
    model.train()
    plan = fedplan.Plan.from_json(instruction.plan, source="the device part's plan")
    device, edge = _parts(model, cut, example)
    planned = fedplan.apply(device, plan)
    device_opt = make_optimizer(plan.optimizer, device.parameters(), lr=instruction.lr)
    edge_opt = make_optimizer("sgd", edge.parameters(), lr=instruction.lr)
    loss_fn = spec.loss_fn
    fail_at = int(instruction.task.get("edge_fail_step", -1))
    batch, n = instruction.batch_size, int(train_y.shape[0])
    per_epoch = local_steps(n, batch, 1)
    order = torch.Generator().manual_seed(instruction.seed)
    started = time.perf_counter()
    peak = steps = 0
    loss_sum = loss_sq_sum = 0.0

    def edge_step(activation: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        a = activation.detach().requires_grad_(True)
        edge_opt.zero_grad(set_to_none=True)
        outputs = edge(a)
        loss_fn(outputs, targets).backward()
        edge_opt.step()
        nonlocal loss_sum, loss_sq_sum
        flat = outputs.detach()
        if flat.dim() == 3:
            per = F.cross_entropy(flat.transpose(1, 2), targets, reduction="none").mean(1)
        else:
            per = F.cross_entropy(flat, targets, reduction="none")
        per = per.double()
        loss_sum += float(per.sum())
        loss_sq_sum += float((per * per).sum())
        return a.grad

    with torch.random.fork_rng():
        torch.manual_seed(instruction.seed)
        for _ in range(instruction.epochs):
            perm = torch.randperm(n, generator=order)
            if n < batch:
                perm = perm.repeat(math.ceil(batch / n))[:batch]
            for b in range(per_epoch):
                if steps == fail_at:
                    raise EdgeFailure(f"edge server failed at local step {steps} of round "
                                      f"{instruction.round}; the split step cannot finish")
                idx = perm[b * batch:(b + 1) * batch]
                inputs, targets = train_x[idx], train_y[idx]
                if steps < PROFILED_STEPS:
                    with torch.no_grad():
                        activation = device(inputs)
                    gradient = edge_step(activation, targets)

                    def device_step(inputs=inputs, gradient=gradient):
                        device_opt.zero_grad(set_to_none=True)
                        cut_loss(planned(inputs), gradient).backward()
                        device_opt.step()

                    device_opt.zero_grad(set_to_none=True)
                    start = held_bytes(planned, device_opt, [inputs, gradient])
                    with no_collection():
                        measured, _ = profiled_peak(device_step)
                    peak = max(peak, start + measured)
                else:
                    device_opt.zero_grad(set_to_none=True)
                    outputs = planned(inputs)
                    gradient = edge_step(outputs, targets)
                    outputs.backward(gradient)
                    device_opt.step()
                steps += 1
    return ClientReply(
        round=instruction.round, client_id=instruction.client_id,
        weights=state_to_arrays(model.state_dict()), num_samples=n, steps=steps,
        loss_sum=loss_sum if math.isfinite(loss_sum) else math.inf, loss_sq_sum=loss_sq_sum,
        loss_count=steps * batch, measured_peak_bytes=int(peak),
        budget_bytes=instruction.budget_bytes, train_seconds=time.perf_counter() - started)


register("smartsplit", SmartSplitPolicy, train_split)
