"""Plans for many clients from few solves: :class:`PlanCache`.

A thousand clients must not mean a thousand solves. The cache traces and measures the
model once (one :class:`fedplan.Analysis`, shared by every budget) and keys plans by
``(model fingerprint, budget bucket, optimizer, batch size)``.

**Buckets.** Let ``K`` be the keep-all peak a client measures (:func:`client.measure_plan_peak`
on the keep-all plan; the profiler sees a few bytes more than the simulator predicts).
A budget ``>= K`` gets the keep-all plan (bucket 0). A smaller budget ``b`` falls in
bucket ``j = ceil((K - b) / step)`` with ``step = bucket_fraction * K``, and gets the plan
solved for the bucket's bottom edge ``K - j * step <= b``: one plan serves every budget
in the bucket and never exceeds any of them. A bucket whose edge no plan reaches is
cached as infeasible, so a client within one bucket of the smallest reachable peak may be
turned away although an exact solve would fit it (at most ``bucket_fraction`` of ``K``).

**Measured, not predicted.** Every cached plan is measured once with the very profiled
steps a client runs (:func:`client.measure_plan_peak`); a plan that measures above its
edge is solved again with the excess as extra margin (twice at most), else the bucket is
infeasible. A client's reported peak is therefore the cached measurement, and it is at
or under the client's budget.

**Time.** Plans are solved on the analytic cost model (``planner.cost.analytic_costs``:
FLOPs and bytes written at ``flops_per_second``), so the plan a bucket gets, and the
step time the clock charges, do not depend on timing noise: the same seed gives the same
run. Per-device speed scales every operator's time by the same factor, which leaves the
argmin of the solve unchanged, so one plan per bucket serves every speed; a device's
step time is the plan's analytic step time divided by its speed.

**Compression.** Plans may keep activations compressed as well as recompute them
(``compress=True``, the default; codes no narrower than ``min_bits``, default 4). The
measured pack/unpack times are replaced by analytic ones for the same reason as above:
``(bytes read + bytes written) / flops_per_second`` times a work factor per kind of code,
:data:`COMPRESS_WORK_FACTOR` (the median of measured over analytic time on this machine).
Planner keywords are passed in exactly one place, :meth:`PlanCache.planner_keywords`.

**Robust.** A bucket whose solve fails for any reason other than an infeasible budget (a
``SolverError``, say) is logged in :attr:`PlanCache.failures`, solved again with the
recompute-only ``greedy`` solver, and marked infeasible if that fails too: one bucket
never ends a federation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

import fedplan
from fedplan.planner.cost import analytic_costs
from fedplan.planner.simulate import simulate

from .client import measure_plan_peak, no_collection

__all__ = ["COMPRESS_WORK_FACTOR", "REFERENCE_FLOPS_PER_SECOND", "CachedPlan", "Infeasible",
           "PlanCache", "analytic_compress_costs"]

REFERENCE_FLOPS_PER_SECOND = 1.2e10
"""Analytic rate (FLOPs plus bytes written, per second) of this 2-vCPU machine at speed
1.0, calibrated once: the analytic keep-all step of ``examples/mnist_mbconv.py`` at batch
16 (forward, plus a backward counted as twice the forward) is then 20.4 ms, against 18 ms
measured on an idle machine with one thread (0.245 s at 1e9)."""

COMPRESS_WORK_FACTOR = {"uniform": 2.0, "mixed": 8.0}
"""Measured pack+unpack seconds over ``2 * (4 * numel + packed bytes) / 1.2e10``, median
over the 27 compressible activations of ``examples/mnist_mbconv.py`` at batch 16, one
thread (8/4/2-bit uniform codes: 1.8, 2.1, 1.8; channel-wise mixed 4/3: 7.5, 8.5)."""


def analytic_compress_costs(costs, *, flops_per_second: float):
    """``costs`` with every compression option's pack and unpack time made analytic:
    each moves ``4 * numel`` float bytes and the packed bytes once, at
    ``flops_per_second`` times :data:`COMPRESS_WORK_FACTOR` of its kind."""
    out = []
    for item in costs.compress:
        numel = math.prod(item.shape)
        pack, unpack = {}, {}
        for option, packed in item.packed_bytes.items():
            kind = "mixed" if option.startswith("mixed") else "uniform"
            seconds = COMPRESS_WORK_FACTOR[kind] * (4 * numel + packed) / flops_per_second
            pack[option] = unpack[option] = seconds
        out.append(replace(item, pack_seconds=pack, unpack_seconds=unpack))
    return replace(costs, compress=tuple(out))


@dataclass(frozen=True)
class CachedPlan:
    """A plan that serves every budget in ``[edge_bytes, ...)`` of its bucket."""

    bucket: int
    edge_bytes: int                 # the budget it was solved for (bucket bottom)
    plan: fedplan.Plan
    plan_json: dict[str, Any]
    measured_peak_bytes: int        # what a client measures with it
    step_seconds: float             # analytic seconds of one step at speed 1.0
    recomputed: int                 # nodes recomputed


@dataclass(frozen=True)
class Infeasible:
    """No plan fits the bucket's edge; ``smallest_bytes`` is the smallest reachable peak."""

    bucket: int
    edge_bytes: int
    smallest_bytes: int | None
    reason: str


class PlanCache:
    """Per-budget plans for one model, optimizer and batch size (see the module doc)."""

    def __init__(self, model_factory: Callable[[], nn.Module], example_inputs: torch.Tensor,
                 example_targets: torch.Tensor, *, optimizer: str = "sgd", lr: float = 0.01,
                 loss_fn: Callable | None = None, bucket_fraction: float = 0.025,
                 flops_per_second: float = REFERENCE_FLOPS_PER_SECOND, solver: str = "ilp",
                 options: fedplan.SolverOptions | None = None, compress: bool = True,
                 min_bits: int = 4, prefix_factory: Callable[[], nn.Module] | None = None,
                 progress: Callable[[str], None] | None = None):
        if not 0 < bucket_fraction < 1:
            raise ValueError(f"bucket_fraction must be in (0, 1); got {bucket_fraction}")
        self.model_factory = model_factory
        self.inputs, self.targets = example_inputs, example_targets
        # Block-wise training: the device also holds a frozen prefix and runs it (no
        # grad) before the planned part. Budgets and measurements are of the whole
        # device step; the planner plans the trained part with what the prefix leaves.
        self.prefix_factory = prefix_factory
        self.raw_inputs = example_inputs
        self.offset_bytes = 0
        if prefix_factory is not None:
            prefix = prefix_factory().eval()
            with torch.no_grad():
                self.inputs = example_inputs = prefix(example_inputs)
        self.optimizer, self.lr, self.loss_fn = optimizer, lr, loss_fn
        self.batch_size = int(example_inputs.shape[0])
        self.bucket_fraction = bucket_fraction
        self.flops_per_second = flops_per_second
        self.solver = solver
        self.compress, self.min_bits = bool(compress), int(min_bits)
        self.failures: list[dict[str, Any]] = []  # buckets whose first solve raised
        # one worker: the solve is then deterministic for a seed (CP-SAT workers race;
        # CBC is single-threaded)
        self.options = options or fedplan.SolverOptions(workers=1, time_limit_seconds=20.0)
        self.say = progress or (lambda _m: None)
        self._entries: dict[tuple, CachedPlan | Infeasible] = {}
        self.hits = self.solves = 0
        self.solve_seconds = 0.0
        start = time.perf_counter()
        model = model_factory()
        with no_collection():  # the analysis measures bytes with the profiler (client.py)
            measured = fedplan.analyze(model, example_inputs, example_targets,
                                       loss_fn=loss_fn, optimizer=optimizer, repeats=1,
                                       compress=self.compress and solver == "ilp",
                                       progress=self.say)
        costs = analytic_costs(measured.costs, flops_per_second=flops_per_second)
        self.analysis = replace(measured, costs=analytic_compress_costs(
            costs, flops_per_second=flops_per_second))
        self.fingerprint = self.analysis.graph.fingerprint
        self.keep_all_predicted_bytes = simulate(self.analysis.graph,
                                                 self.analysis.costs).peak_bytes
        self.base_step_seconds = 3.0 * sum(n.forward_seconds for n in self.analysis.costs.nodes)
        self.prefix_seconds = 0.0
        if prefix_factory is not None:  # its forward only: analytic like the rest
            with no_collection():
                traced = fedplan.analyze(prefix_factory(), self.raw_inputs, None,
                                         loss_fn=lambda out, _t: out.float().mean(),
                                         repeats=1, compress=False)
            self.prefix_seconds = sum(n.forward_seconds for n in analytic_costs(
                traced.costs, flops_per_second=flops_per_second).nodes)
            self.base_step_seconds += self.prefix_seconds
        keep_all = self._solve(self.keep_all_predicted_bytes)
        self.keep_all_bytes = self._measure(keep_all)
        if prefix_factory is not None:
            alone = measure_plan_peak(model_factory, keep_all, self.inputs, example_targets,
                                      loss_fn=loss_fn, lr=lr)
            self.offset_bytes = max(0, self.keep_all_bytes - alone)
        self._entries[self._key(0)] = self._entry(0, self.keep_all_bytes, keep_all,
                                                  self.keep_all_bytes)
        self.analysis_seconds = time.perf_counter() - start

    # ---- the one place planner keywords are chosen ---------------------------------------
    def planner_keywords(self) -> dict[str, Any]:
        """Keywords every ``fedplan.plan`` call of the cache gets (one place to change)."""
        return {"solver": self.solver, "options": self.options, "optimizer": self.optimizer,
                "loss_fn": self.loss_fn, "verify": True, "compress": self.compress,
                "min_bits": self.min_bits}

    def _measure(self, plan: fedplan.Plan) -> int:
        """What a client measures with ``plan`` (through the prefix when there is one)."""
        prefix = self.prefix_factory() if self.prefix_factory is not None else None
        return measure_plan_peak(self.model_factory, plan, self.raw_inputs, self.targets,
                                 loss_fn=self.loss_fn, lr=self.lr, prefix=prefix)

    def _solve(self, budget_bytes: int, **overrides: Any) -> fedplan.Plan:
        self.solves += 1
        start = time.perf_counter()
        try:
            # the planner verifies a plan by measuring a planned step (client.py's
            # no_collection says why the collector must not run inside it)
            with no_collection():
                plan, _ = fedplan.plan(self.model_factory(), self.inputs, self.targets,
                                       budget=int(budget_bytes), analysis=self.analysis,
                                       **(self.planner_keywords() | overrides))
        finally:
            self.solve_seconds += time.perf_counter() - start
        return plan

    # ---- lookup ------------------------------------------------------------------------
    def _key(self, bucket: int) -> tuple:
        return (self.fingerprint, bucket, self.optimizer, self.batch_size)

    @property
    def step_bytes(self) -> int:
        return max(1, int(self.bucket_fraction * self.keep_all_bytes))

    def bucket_of(self, budget_bytes: int) -> int:
        if budget_bytes >= self.keep_all_bytes:
            return 0
        return math.ceil((self.keep_all_bytes - budget_bytes) / self.step_bytes)

    def edge_of(self, bucket: int) -> int:
        return self.keep_all_bytes - bucket * self.step_bytes

    def _entry(self, bucket: int, edge: int, plan: fedplan.Plan, measured: int) -> CachedPlan:
        return CachedPlan(bucket=bucket, edge_bytes=edge, plan=plan, plan_json=plan.to_json(),
                          measured_peak_bytes=measured,
                          step_seconds=self.base_step_seconds + plan.predicted_overhead_seconds,
                          recomputed=len(plan.recomputed))

    def lookup(self, budget_bytes: int) -> CachedPlan | Infeasible:
        """The cached plan for ``budget_bytes`` (solving its bucket on first use)."""
        bucket = self.bucket_of(int(budget_bytes))
        key = self._key(bucket)
        if key in self._entries:
            self.hits += 1
            return self._entries[key]
        edge = self.edge_of(bucket)
        self.say(f"planning bucket {bucket} (budget {edge} B)")
        entry: CachedPlan | Infeasible
        if edge <= 0:
            entry = Infeasible(bucket, edge, None, "budget bucket below zero bytes")
        else:
            entry = self._plan_bucket(bucket, edge)
        self._entries[key] = entry
        return entry

    def _plan_bucket(self, bucket: int, edge: int) -> CachedPlan | Infeasible:
        try:
            return self._plan_bucket_with(bucket, edge)
        except fedplan.BudgetInfeasibleError as exc:
            return Infeasible(bucket, edge, exc.smallest_bytes, str(exc))
        except Exception as exc:  # noqa: BLE001 - one bucket must never end a federation
            first = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self.failures.append({"bucket": bucket, "edge_bytes": edge,
                                  "solver": self.solver, "error": first})
            self.say(f"bucket {bucket} ({edge} B): {first}; falling back to 'greedy'")
        try:  # recompute-only fallback
            return self._plan_bucket_with(bucket, edge, solver="greedy", compress=False)
        except fedplan.BudgetInfeasibleError as exc:
            return Infeasible(bucket, edge, exc.smallest_bytes,
                              f"after {self.failures[-1]['error']}: greedy: {exc}")
        except Exception as exc:  # noqa: BLE001
            first = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self.failures.append({"bucket": bucket, "edge_bytes": edge, "solver": "greedy",
                                  "error": first})
            self.say(f"bucket {bucket} ({edge} B): greedy failed too ({first}); infeasible")
            return Infeasible(bucket, edge, None, f"solvers failed: {first}")

    def _plan_bucket_with(self, bucket: int, edge: int, **overrides: Any
                          ) -> CachedPlan | Infeasible:
        target = edge - self.offset_bytes
        if target <= 0:
            return Infeasible(bucket, edge, None, f"the frozen prefix alone holds "
                                                  f"{self.offset_bytes} B")
        for _ in range(3):
            plan = self._solve(target, **overrides)
            measured = self._measure(plan)
            if measured <= edge:
                return self._entry(bucket, edge, plan, measured)
            target -= measured - edge + 4096
        return Infeasible(bucket, edge, measured,
                          f"plans for {edge} B measured {measured} B after re-solving")

    def smallest_feasible_bytes(self) -> int:
        """The lowest bucket edge served so far (keep-all when nothing else was planned)."""
        served = [e.edge_bytes for e in self._entries.values() if isinstance(e, CachedPlan)]
        return min(served)

    def stats(self) -> dict[str, Any]:
        entries = list(self._entries.values())
        return {"buckets": len(entries),
                "feasible_buckets": sum(isinstance(e, CachedPlan) for e in entries),
                "solves": self.solves, "hits": self.hits, "failures": list(self.failures),
                "compress": self.compress, "min_bits": self.min_bits,
                "solve_seconds": round(self.solve_seconds, 3),
                "analysis_seconds": round(self.analysis_seconds, 3),
                "keep_all_bytes": self.keep_all_bytes,
                "keep_all_predicted_bytes": self.keep_all_predicted_bytes}
