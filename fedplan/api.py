"""The public functions: plan, compile, apply and measure."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from fedplan.planner.budget import Budget
from fedplan.planner.capture import (
    ModelCall,
    call_from_signature,
    capture,
    input_signature,
)
from fedplan.planner.errors import BadInputError, BudgetInfeasibleError
from fedplan.planner.optimizers import check_optimizer, make_optimizer
from fedplan.planner.plan import Plan
from fedplan.planner.program import lower, program_of
from fedplan.planner.simulate import simulate
from fedplan.planner.solvers import BASELINES, SolverOptions, solve
from fedplan.planner.trace import structure_fingerprint
from fedplan.runtime.measure import StepMeasurement, measure_step
from fedplan.runtime.rewrite import PlannedModule

from .analysis import Analysis, analyze, default_targets, warn_leaf_modules
from .modelfile import default_loss


def measure(module: nn.Module, example_inputs: Any, targets: Any = None, *,
            loss_fn: Callable | None = None, optimizer: str = "sgd",
            optimizer_instance: torch.optim.Optimizer | None = None, steps: int = 3,
            warmup: int = 1) -> StepMeasurement:
    """Run real training steps of ``module`` and report measured peak and step time.

    The peak is the README's definition: bytes held at the start of a step (parameters,
    buffers, optimizer state, the batch) plus the peak of what PyTorch allocates during
    the step, from the profiler's memory events on CPU (CUDA allocator statistics on GPU).
    The module is trained for ``warmup + steps + 1`` steps: pass a copy if that matters.
    """
    call = ModelCall.of(example_inputs)
    if targets is None:
        targets = default_targets(call)
    check_optimizer(optimizer)
    opt = optimizer_instance or make_optimizer(optimizer, module.parameters())
    return measure_step(module, call, targets, loss_fn or default_loss, opt, steps=steps,
                        warmup=warmup)


def _budget(value) -> Budget:
    return value if isinstance(value, Budget) else Budget.of(value)


def plan(model: nn.Module, example_inputs: Any, targets: Any = None, *, budget,
         loss_fn: Callable | None = None, optimizer: str = "sgd", solver: str = "ilp",
         leaf_modules: Sequence[Any] = (), options: SolverOptions | None = None,
         compress: bool = True, min_bits: int | None = None,
         analysis: Analysis | None = None, repeats: int = 5, verify: bool = True,
         decisions: str | Sequence[str] | None = None,
         progress: Callable[[str], None] | None = None) -> tuple[Plan, Analysis]:
    """Trace, measure and solve: the Plan for ``model`` under ``budget``, and the analysis.

    ``budget`` is bytes (int), a size string (``"512MB"``) or a :class:`Budget`
    (``Budget(fraction=0.5)``: half the keep-all activation memory on top of the fixed
    costs). Raises BudgetInfeasibleError when no plan fits.

    ``compress`` (the default) lets the ``ilp`` solver keep activations compressed
    (8/4/2-bit, uniform or channel-wise mixed) as well as recompute them; ``min_bits``
    (default 4) is the lowest code width it may choose. Compressed plans trade a small,
    measured gradient error for memory; ``compress=False`` gives plans whose gradients
    are bit-identical to the unplanned model's.

    ``decisions`` (a list or a comma-separated string from ``recompute, compress,
    microbatch, optimizer-in-backward, compress-optimizer-state``, or ``"all"``) plans the
    whole step: the step-level decisions are chosen together with the activation plan
    (``fedplan.stepplan``), and the plan then runs through ``planned.train_step(...)``.
    ``"default"`` is recompute, microbatch (dropped for models with BatchNorm) and
    optimizer-in-backward: nothing that changes the numbers a step computes. Without
    ``decisions`` (None) the plan is per activation only (recompute, and compress when
    ``compress``), and runs through the plain three-line loop. ``budget="min"`` plans for
    the smallest peak the allowed decisions reach.

    With ``verify`` (the default) a plan that recomputes or compresses anything is
    checked by one real training step on a copy of the model; if that step's measured
    peak is over the budget, the plan is solved again with the measured excess as extra
    margin.
    """
    check_optimizer(optimizer)
    budget = _budget(budget)
    say = progress or (lambda _m: None)
    options = replace(options or SolverOptions(), compress=compress)
    if min_bits is not None:
        options = replace(options, min_bits=min_bits)
    if decisions is not None or budget.minimum:
        from .stepplan import plan_step
        if decisions == "default":
            decisions = None
        elif decisions is None:  # budget="min" without decisions: this plan space
            decisions = ["recompute"] + (["compress"] if compress else [])
        return plan_step(model, example_inputs, targets, budget=budget, loss_fn=loss_fn,
                         optimizer=optimizer, solver=solver, options=options,
                         decisions=decisions, analysis=analysis, repeats=repeats,
                         verify=verify, progress=say)
    if analysis is None:
        analysis = analyze(model, example_inputs, targets, loss_fn=loss_fn,
                           optimizer=optimizer, leaf_modules=leaf_modules, repeats=repeats,
                           compress=compress and solver == "ilp", progress=say)
    keep_all = simulate(analysis.graph, analysis.costs).peak_bytes
    budget_bytes = budget.resolve(analysis.costs, keep_all)
    say(f"solving with {solver!r} for a budget of {budget_bytes} B")
    signature = input_signature(ModelCall.of(example_inputs))
    result = replace(solve(analysis.graph, analysis.costs, budget_bytes, solver=solver,
                           options=options, model_name=type(model).__name__),
                     inputs=signature)
    if not verify or not (result.recomputed or result.compressed):
        return result, analysis
    # The budget is a measured quantity, so the plan is measured too: one real step of
    # the planned model (on a copy). Should checkpointing allocate more than the
    # simulator predicts, the plan is solved again with that excess as extra margin.
    call = ModelCall.of(example_inputs)
    if targets is None:
        targets = default_targets(call)
    for attempt in range(3):
        say("measuring one planned step")
        shadow = copy.deepcopy(model)
        step = measure_step(PlannedModule(shadow, capture(shadow, call), result), call, targets,
                            loss_fn or default_loss,
                            make_optimizer(optimizer, shadow.parameters()), steps=1)
        note = (f"verified: one planned step measured {step.peak_bytes} B against the "
                f"budget {budget_bytes} B")
        if step.peak_bytes <= budget_bytes:
            return replace(result, notes=result.notes + (note,)), analysis
        if solver in BASELINES or attempt == 2:
            break
        excess = step.peak_bytes - result.predicted_peak_bytes
        options = replace(options, safety_bytes=options.safety_bytes + max(excess, 0) + 4096)
        say(f"the planned step measured {excess} B above the prediction; solving again")
        result = replace(solve(analysis.graph, analysis.costs, budget_bytes, solver=solver,
                               options=options, model_name=type(model).__name__),
                         inputs=signature)
        result = replace(result, notes=result.notes + (
            f"re-solved: the previous plan measured {step.peak_bytes} B, {excess} B above "
            f"its prediction",))
        if not (result.recomputed or result.compressed):
            return result, analysis
    raise BudgetInfeasibleError(
        f"the {solver!r} plan measured {step.peak_bytes} B in a real step, above the budget "
        f"{budget_bytes} B (predicted {result.predicted_peak_bytes} B); raise the budget",
        smallest_bytes=step.peak_bytes)


def compile(model: nn.Module, example_inputs: Any, targets: Any = None, *, budget,
            loss_fn: Callable | None = None, optimizer: str = "sgd", solver: str = "ilp",
            leaf_modules: Sequence[Any] = (), options: SolverOptions | None = None,
            compress: bool = True, min_bits: int | None = None,
            repeats: int = 5, verify: bool = True,
            decisions: str | Sequence[str] | None = None,
            progress: Callable[[str], None] | None = None) -> PlannedModule:
    """Plan ``model`` for ``budget`` and return a module that runs the plan.

    The returned module shares parameters and buffers with ``model`` (an optimizer built
    on either trains both), has the plan as ``.plan``, and drops into a training loop
    unchanged: ``loss_fn(planned(*inputs), targets).backward()``; a plan with step-level
    decisions (``decisions=``) runs through ``planned.train_step(inputs, targets,
    optimizer, loss_fn)``.
    """
    result, analysis = plan(model, example_inputs, targets, budget=budget, loss_fn=loss_fn,
                            optimizer=optimizer, solver=solver, leaf_modules=leaf_modules,
                            options=options, compress=compress, min_bits=min_bits,
                            repeats=repeats, verify=verify, decisions=decisions,
                            progress=progress)
    return PlannedModule(model, analysis.captured, result,
                         schedule=lower(program_of(analysis.graph, analysis.costs),
                                        result.decision_map))


def apply(model: nn.Module, plan_or_path: Plan | str | os.PathLike,
          example_inputs: Any = None, *, leaf_modules: Sequence[Any] = ()) -> PlannedModule:
    """Run a saved plan on ``model``; the plan must have been made for this model.

    The model is captured again, with ``example_inputs`` when given and otherwise with
    zero inputs of the shapes the plan records (a plan is made for one batch size).
    """
    warn_leaf_modules(leaf_modules)
    loaded = plan_or_path if isinstance(plan_or_path, Plan) else Plan.load(plan_or_path)
    if example_inputs is None:
        if not loaded.inputs:
            raise BadInputError("the plan records no input signature; pass example_inputs")
        call = call_from_signature(dict(loaded.inputs))
    else:
        call = ModelCall.of(example_inputs)
        chunks = loaded.step_choice.microbatches
        if chunks > 1 and call.batch_size == loaded.batch_size:
            # the plan runs micro-batches: the model is captured for one of them
            from fedplan.runtime.step import split_batch
            inputs = dict(call.kwargs) if call.kwargs else tuple(call.args)
            call = ModelCall.of(split_batch(inputs, None, chunks)[0][0])
    captured = capture(model, call)
    loaded.check_matches(fingerprint=structure_fingerprint(captured.graph_module),
                         source="plan")
    return PlannedModule(model, captured, loaded)
