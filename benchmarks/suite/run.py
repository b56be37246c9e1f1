"""``fedplan bench``: every model at every budget, every planner, measured side by side.

For one model: the keep-all module, every fixed scheme (``all``, ``sqrt``, selective
checkpointing, ActNN-style 2-bit) and every fedplan plan (``ilp``, ``greedy``,
``ilp+compress`` at each budget, plus ``ilp`` at the smallest budget its plan space
reaches) are built on copies of the same initial weights. Each gets, before it trains:
the largest gradient difference against keep-all (one forward and backward from the same
weights, same seed), then its measured peak (``fedplan.measure``'s definition, one
warm-up step first). Then ``repeats`` rounds time one step of every module in turn
(interleaved, so drift and other processes hit all of them alike), after one untimed
warm-up round; the step time is the median.

``torch.compile`` points cannot share a process-wide dynamo cache, so each budget is its
own block: reset, compile under the scoped budget, then ``repeats`` rounds alternating the
compiled step with a keep-all step. Every step time is reported with the keep-all time
of its own block, and the overhead is their ratio: that is the figure that compares
across blocks.

A planner that fails on a model (torch.compile raising, a budget the plan space cannot
reach, a keyword fedplan does not have yet) is a failed point with its reason; the run
goes on.
"""

from __future__ import annotations

import copy
import glob
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import fedplan
from fedplan.errors import BadInputError
from fedplan.modelfile import ModelSpec, call_model, load_model_file
from fedplan.planner.budget import fixed_floor
from fedplan.planner.optimizers import make_optimizer
from fedplan.planner.simulate import simulate
from fedplan.runtime.measure import measure_step

from . import peers

PLANNERS = ("none", "all", "sqrt", "sac", "actnn2", "ilp", "ilp+compress", "greedy",
            "torch.compile")
BUDGET_PLANNERS = ("ilp", "ilp+compress", "greedy", "torch.compile")
RECOMPUTE_ONLY = ("all", "sqrt", "sac", "ilp", "greedy", "torch.compile")
DEFAULT_MODELS = ("resnet18", "mobilenetv2", "vgg11", "gpt", "vit_tiny", "unet")
DEFAULT_BUDGETS = (0.8, 0.6, 0.4, 0.25)


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """What one ``fedplan bench`` run measures."""

    models: tuple[str, ...]
    """Model files (the README's model-file contract)."""
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    """Fractions of the keep-all activation memory on top of the fixed costs."""
    planners: tuple[str, ...] = PLANNERS
    """Which planners and peers to run (``none``, keep-all, always runs: it is the reference)."""
    batch_size: int | None = None
    """Batch size for every model (default: each file's DEFAULT_BATCH_SIZE)."""
    repeats: int = 5
    """Timed steps per point (interleaved rounds, after a warm-up round)."""
    time_limit: float = 30.0
    """ILP time limit per solve, seconds."""
    min_budget: bool = True
    """Also plan ``ilp`` at the smallest budget its plan space reaches."""

    def __post_init__(self):
        unknown = [p for p in self.planners if p not in PLANNERS]
        if unknown:
            raise BadInputError(f"unknown planner {unknown[0]!r}; valid planners: "
                                f"{', '.join(PLANNERS)}")
        if not self.budgets or any(not (0 < b <= 1.5) for b in self.budgets):
            raise BadInputError(f"expected budget fractions in (0, 1.5]; found "
                                f"{','.join(f'{b:g}' for b in self.budgets)}")
        if self.repeats < 1:
            raise BadInputError(f"expected --repeats >= 1; found {self.repeats}")
        if self.batch_size is not None and self.batch_size < 1:
            raise BadInputError(f"expected a positive --batch-size; found {self.batch_size}")


@dataclass
class Point:
    """One planner at one budget on one model: what was measured, or why it failed."""

    model: str
    planner: str
    budget: str                      # the fraction as given, "min", or "-" (fixed scheme)
    budget_fraction: float | None = None
    budget_bytes: int | None = None
    status: str = "ok"               # ok | failed
    error: str | None = None
    measured_peak_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    step_seconds: float | None = None
    keep_all_step_seconds: float | None = None
    overhead: float | None = None    # step / keep-all step of the same block, minus 1
    max_grad_diff: float | None = None
    solve_seconds: float | None = None
    solver_status: str | None = None
    graph_nodes: int | None = None
    keep_all_predicted_bytes: int | None = None
    floor_bytes: int | None = None
    block: str = "eager"
    notes: list[str] = field(default_factory=list)

    def fail(self, error: BaseException | str) -> Point:
        self.status = "failed"
        if isinstance(error, BaseException):
            text = str(error).strip().splitlines()[0] if str(error).strip() else ""
            self.error = f"{type(error).__name__}: {text}"[:300]
        else:
            self.error = error
        return self

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Variant:
    point: Point
    module: torch.nn.Module
    owner: torch.nn.Module          # holds the parameters by name
    optimizer: torch.optim.Optimizer
    samples: list[float] = field(default_factory=list)


def model_paths(models: tuple[str, ...] | None, root: Path) -> tuple[str, ...]:
    if models:
        return tuple(models)
    found = []
    for name in DEFAULT_MODELS:
        path = root / "examples" / f"{name}.py"
        if not path.is_file():
            raise BadInputError(f"example model {str(path)!r} not found; run from the "
                                f"repository root or pass --models FILE...")
        found.append(str(path))
    return tuple(found)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


class ModelBench:
    """Everything measured for one model file."""

    def __init__(self, spec: ModelSpec, config: BenchConfig, say: Callable[[str], None]):
        self.spec = spec
        self.config = config
        self.say = say
        self.batch_size = config.batch_size or spec.default_batch_size
        torch.manual_seed(0)
        self.base = spec.build()
        self.inputs, self.targets = spec.batch(self.batch_size)
        self.points: list[Point] = []
        self.variants: list[_Variant] = []

    # ---- one training step, and the measurements ------------------------------------
    def _step(self, module, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.spec.loss_fn(call_model(module, self.inputs), self.targets).backward()
        optimizer.step()

    def _grads(self, module, owner) -> dict[str, torch.Tensor]:
        owner.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        self.spec.loss_fn(call_model(module, self.inputs), self.targets).backward()
        grads = {name: p.grad.detach().clone() for name, p in owner.named_parameters()
                 if p.grad is not None}
        owner.zero_grad(set_to_none=True)
        return grads

    def _grad_diff(self, grads: dict[str, torch.Tensor]) -> float:
        worst = 0.0
        for name, reference in self.reference_grads.items():
            if name not in grads:
                return float("inf")
            worst = max(worst, float((grads[name] - reference).abs().max()))
        return worst

    def _measure_peak(self, module, optimizer) -> int:
        step = measure_step(module, self.inputs, self.targets, self.spec.loss_fn, optimizer,
                            steps=1, warmup=1)
        return step.peak_bytes

    def _add(self, point: Point, build: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        """Build a variant on a fresh copy of the weights, take its gradients and peak."""
        self.say(f"{self.spec.name}: {point.planner} {point.budget}")
        try:
            owner = copy.deepcopy(self.base)
            module = build(owner)
            optimizer = make_optimizer("sgd", owner.parameters())
            point.max_grad_diff = self._grad_diff(self._grads(module, owner))
            point.measured_peak_bytes = self._measure_peak(module, optimizer)
        except Exception as exc:  # a peer failing is a result, not a crash
            self.points.append(point.fail(exc))
            return
        self.points.append(point)
        self.variants.append(_Variant(point, module, owner, optimizer))

    # ---- the planners -----------------------------------------------------------------
    def _compress_analysis(self):
        """The analysis with compression costs measured, made once (None: not supported)."""
        if not hasattr(self, "_compressed"):
            try:
                self._compressed = fedplan.analyze(
                    self.base, self.inputs, self.targets, loss_fn=self.spec.loss_fn, compress=True)
            except TypeError:
                self._compressed = None
        return self._compressed

    def _plan(self, point: Point, solver: str, budget, *, compress: bool = False) -> None:
        start = time.perf_counter()
        common = dict(budget=budget, loss_fn=self.spec.loss_fn, solver=solver,
                      options=fedplan.SolverOptions(time_limit_seconds=self.config.time_limit))
        try:
            if compress:
                # the decision set: 8, 4 and 2 bits (ActNN's width included)
                plan, _ = fedplan.plan(self.base, self.inputs, self.targets, compress=True,
                                       min_bits=2, analysis=self._compress_analysis(),
                                       **common)
            else:
                try:  # recompute-only, explicitly: compression may be the default
                    plan, _ = fedplan.plan(self.base, self.inputs, self.targets,
                                           analysis=self.analysis, compress=False, **common)
                except TypeError as exc:
                    if "unexpected keyword" not in str(exc):
                        raise
                    plan, _ = fedplan.plan(self.base, self.inputs, self.targets,
                                           analysis=self.analysis, **common)
        except TypeError as exc:
            if compress and "unexpected keyword" in str(exc):
                self.points.append(point.fail(
                    f"fedplan.plan() does not accept compress= yet ({exc}); activation "
                    f"compression has not landed in this checkout"))
                return
            raise
        except fedplan.FedplanError as exc:
            point.fail(exc)
            point.notes.append(f"smallest_bytes={getattr(exc, 'smallest_bytes', None)}")
            self.points.append(point)
            return
        point.solve_seconds = plan.solve_seconds
        point.solver_status = plan.status
        point.predicted_peak_bytes = plan.predicted_peak_bytes
        point.budget_bytes = plan.budget_bytes
        point.notes.append(f"planning wall time {time.perf_counter() - start:.2f} s "
                           f"(trace reused, one verification step)")
        counts: dict[str, int] = {}
        for _, decision in plan.decisions:
            counts[decision] = counts.get(decision, 0) + 1
        point.notes.append("decisions " + ", ".join(f"{k} {v}" for k, v in sorted(
            counts.items())))

        def build(owner):  # as users run a saved plan
            return fedplan.apply(owner, plan, self.inputs)

        self._add(point, build)

    def _smallest_peak(self) -> int | None:
        """The smallest peak the recompute-only plan space reaches, asked for when every
        budget of the run was feasible (else the smallest budget's plan would stand in for
        fedplan's smallest peak): plan at one byte above the fixed costs, which no plan
        meets, and read the figure off the error."""
        try:
            fedplan.plan(self.base, self.inputs, self.targets, budget=int(self.floor) + 1,
                         loss_fn=self.spec.loss_fn, solver="ilp", analysis=self.analysis,
                         compress=False,
                         options=fedplan.SolverOptions(
                             time_limit_seconds=self.config.time_limit))
        except fedplan.FedplanError as exc:
            return getattr(exc, "smallest_bytes", None)
        return None

    def _point(self, planner: str, budget: str, fraction: float | None = None) -> Point:
        point = Point(model=self.spec.name, planner=planner, budget=budget,
                      budget_fraction=fraction, graph_nodes=len(self.analysis.graph),
                      keep_all_predicted_bytes=self.keep_all, floor_bytes=self.floor)
        if fraction is not None:
            point.budget_bytes = int(self.floor + fraction * (self.keep_all - self.floor))
        return point

    def run(self, advance: Callable[[], None]) -> list[Point]:
        config = self.config
        self.say(f"{self.spec.name}: tracing and measuring costs")
        try:  # compression costs are measured separately, only if ilp+compress runs
            self.analysis = fedplan.analyze(self.base, self.inputs, self.targets,
                                            loss_fn=self.spec.loss_fn, compress=False)
        except TypeError:
            self.analysis = fedplan.analyze(self.base, self.inputs, self.targets,
                                            loss_fn=self.spec.loss_fn)
        self.keep_all = simulate(self.analysis.graph, self.analysis.costs).peak_bytes
        self.floor = fixed_floor(self.analysis.costs)
        reference = copy.deepcopy(self.base)
        self.reference_grads = self._grads(reference, reference)
        planners = config.planners
        # keep-all: always, it is every other point's reference
        self._plan(self._point("none", "-"), "none", self.keep_all * 2)
        advance()
        for name in ("all", "sqrt"):
            if name in planners:
                self._plan(self._point(name, "-"), name, self.keep_all * 2)
            advance()
        if "sac" in planners:
            self._add(self._point("sac", "-"), peers.SelectiveCheckpoint)
        advance()
        if "actnn2" in planners:
            self._add(self._point("actnn2", "-"), peers.ActNNCompressed)
        advance()
        smallest = None
        for fraction in config.budgets:
            label = f"{fraction:g}"
            budget = fedplan.Budget(fraction=fraction)
            for name in ("ilp", "greedy"):
                if name in planners:
                    self._plan(self._point(name, label, fraction), name, budget)
                    last = self.points[-1]
                    if name == "ilp" and last.status == "failed":
                        for note in last.notes:
                            if note.startswith("smallest_bytes=") and note[15:] != "None":
                                smallest = int(note[15:])
            if "ilp+compress" in planners:
                self._plan(self._point("ilp+compress", label, fraction), "ilp", budget,
                           compress=True)
            advance()
        if config.min_budget and "ilp" in planners and smallest is None:
            smallest = self._smallest_peak()
        if config.min_budget and "ilp" in planners and smallest:
            # the smallest peak the plan space reaches, plus the plans' safety margin
            budget_bytes = int(smallest * 1.011) + 65536
            fraction = (budget_bytes - self.floor) / max(1, self.keep_all - self.floor)
            point = self._point("ilp", "min", fraction)
            point.budget_bytes = budget_bytes
            self._plan(point, "ilp", budget_bytes)
        advance()
        self._time_eager()
        advance()
        if "torch.compile" in planners:
            for fraction in config.budgets:
                self._compile_point(fraction)
                advance()
        else:
            for _ in config.budgets:
                advance()
        for point in self.points:
            point.notes = [n for n in point.notes if not n.startswith("smallest_bytes=")]
        self.variants.clear()
        return self.points

    def _time_eager(self) -> None:
        """Interleaved rounds over every eager variant; keep-all is one of them."""
        self.say(f"{self.spec.name}: timing {len(self.variants)} modules side by side")
        alive = list(self.variants)
        for round_index in range(self.config.repeats + 1):  # round 0 warms up
            for variant in list(alive):
                try:
                    start = time.perf_counter()
                    self._step(variant.module, variant.optimizer)
                    elapsed = time.perf_counter() - start
                except Exception as exc:
                    variant.point.fail(exc)
                    alive.remove(variant)
                    continue
                if round_index:
                    variant.samples.append(elapsed)
        keep = next((v for v in alive if v.point.planner == "none"), None)
        keep_seconds = statistics.median(keep.samples) if keep else None
        for variant in alive:
            variant.point.step_seconds = statistics.median(variant.samples)
            variant.point.keep_all_step_seconds = keep_seconds
            if keep_seconds:
                variant.point.overhead = variant.point.step_seconds / keep_seconds - 1
        self.keep_variant = keep

    def _compile_point(self, fraction: float) -> None:
        point = self._point("torch.compile", f"{fraction:g}", fraction)
        point.block = f"compile:{fraction:g}"
        self.say(f"{self.spec.name}: torch.compile at activation_memory_budget={fraction:g}")
        start = time.perf_counter()
        try:
            owner = copy.deepcopy(self.base)
            grads: dict[str, torch.Tensor] = {}

            def first_call(module):  # compiles forward and backward under the budget
                grads.update(self._grads(module, owner))

            module = peers.compiled(owner, fraction, first_call)
            point.notes.append(f"compile and first step {time.perf_counter() - start:.1f} s")
            point.max_grad_diff = self._grad_diff(grads)
            optimizer = make_optimizer("sgd", owner.parameters())
            point.measured_peak_bytes = self._measure_peak(module, optimizer)
            keep = self.keep_variant
            if keep is None:
                raise RuntimeError("keep-all failed, nothing to compare with")
            samples, keep_samples = [], []
            for round_index in range(self.config.repeats + 1):
                for which in ("compiled", "keep"):
                    begin = time.perf_counter()
                    if which == "compiled":
                        self._step(module, optimizer)
                    else:
                        self._step(keep.module, keep.optimizer)
                    if round_index:
                        (samples if which == "compiled" else keep_samples).append(
                            time.perf_counter() - begin)
            point.step_seconds = statistics.median(samples)
            point.keep_all_step_seconds = statistics.median(keep_samples)
            point.overhead = point.step_seconds / point.keep_all_step_seconds - 1
        except Exception as exc:
            point.fail(exc)
            point.notes.append(traceback.format_exc(limit=2).splitlines()[-1][:200])
        finally:
            import torch._dynamo
            torch._dynamo.reset()
        self.points.append(point)


def steps_per_model(config: BenchConfig) -> int:
    """Progress units per model (matches the ``advance`` calls in ``ModelBench.run``)."""
    return 1 + 2 + 2 + len(config.budgets) + 1 + 1 + len(config.budgets)


def run_bench(config: BenchConfig, *, say: Callable[[str], None],
              advance: Callable[[], None],
              checkpoint: Callable[[list[Point]], None] | None = None) -> list[Point]:
    """Every model in turn; ``checkpoint(points so far)`` after each, so a long run that
    is interrupted still leaves its finished models on disk."""
    points: list[Point] = []
    for path in config.models:
        spec = load_model_file(path)
        bench = ModelBench(spec, config, say)
        try:
            points.extend(bench.run(advance))
        except fedplan.FedplanError as exc:  # the model itself is unusable: record, go on
            points.append(Point(model=spec.name, planner="none", budget="-").fail(exc))
        if checkpoint:
            checkpoint(points)
    return points


def examples_glob(root: Path) -> list[str]:
    return sorted(glob.glob(str(root / "examples" / "*.py")))


def machine() -> dict[str, Any]:
    import os
    import platform
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "platform": platform.platform(), "fedplan": fedplan.__version__}
