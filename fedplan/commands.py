"""Implementations of the CLI commands: load, run, print a table or return JSON."""

from __future__ import annotations

import argparse
import copy
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .analysis import analyze
from .api import measure as measure_api
from .errors import BadInputError
from .modelfile import ModelSpec, call_model, load_model_file
from .planner.simulate import CATEGORIES, simulate
from .progress import status
from .units import format_bytes

console = Console()


def _load(args: argparse.Namespace) -> tuple[ModelSpec, int]:
    spec = load_model_file(args.model)
    batch_size = args.batch_size if args.batch_size is not None else spec.default_batch_size
    if batch_size <= 0:
        raise BadInputError(f"expected a positive --batch-size; found {batch_size}")
    return spec, batch_size


def _breakdown_table(title: str, breakdown: dict[str, int], total: int) -> Table:
    table = Table(title=title, show_edge=False)
    table.add_column("part")
    table.add_column("bytes", justify="right")
    table.add_column("size", justify="right")
    for key in CATEGORIES:
        table.add_row(key.replace("_", " "), str(breakdown.get(key, 0)),
                      format_bytes(breakdown.get(key, 0)))
    table.add_row("[bold]peak[/bold]", str(total), format_bytes(total))
    return table


def profile(args: argparse.Namespace) -> dict[str, Any] | None:
    spec, batch_size = _load(args)
    quiet = args.json
    with status(f"profiling {spec.name} (batch {batch_size})", quiet=quiet) as say:
        model = spec.build()
        inputs, targets = spec.batch(batch_size)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            analysis = analyze(model, inputs, targets, loss_fn=spec.loss_fn,
                               optimizer=args.optimizer, repeats=args.repeats, progress=say)
        timeline = simulate(analysis.graph, analysis.costs)
        say("measuring real training steps")
        measured = measure_api(copy.deepcopy(model), inputs, targets, loss_fn=spec.loss_fn,
                           optimizer=args.optimizer, steps=args.steps)
    costs = analysis.costs
    rows = []
    for node in analysis.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr") or node.name == "_guards_fn":
            continue
        cost = costs.node[node.name]
        operator = node.target.split(".")[-2] if node.target.count(".") >= 2 else node.target
        rows.append({"node": node.name, "op": operator, "module": node.module_path,
                     "module_type": node.module_type, "source": node.source,
                     "output_bytes": node.output_bytes,
                     "saved_bytes": costs.saved_bytes(node.name),
                     "forward_seconds": cost.forward_seconds})
    error = (timeline.peak_bytes - measured.peak_bytes) / measured.peak_bytes
    result = {
        "model": str(spec.path), "batch_size": batch_size, "optimizer": args.optimizer,
        "nodes": len(analysis.graph), "fingerprint": analysis.graph.fingerprint,
        "predicted_peak_bytes": timeline.peak_bytes,
        "measured_peak_bytes": measured.peak_bytes,
        "prediction_error": error,
        "peak_at": {"phase": timeline.peak_phase, "node": timeline.peak_node},
        "breakdown": timeline.breakdown,
        "fixed": {"parameters": costs.param_bytes, "buffers": costs.buffer_bytes,
                  "gradients": costs.grad_bytes,
                  "optimizer_state": costs.optimizer_state_bytes,
                  "inputs": costs.input_bytes},
        "step_seconds": measured.step_seconds,
        "notes": [str(w.message) for w in caught],
        "tensors": rows,
    }
    if args.json:
        return result
    table = Table(title=f"{spec.name}: per-tensor costs (batch {batch_size})", show_edge=False)
    for column, justify in (("node", "left"), ("op", "left"), ("module", "left"),
                            ("output", "right"), ("saved", "right"), ("forward ms", "right")):
        table.add_column(column, justify=justify)
    for row in rows:
        module = row["module"] or "<root>"
        if row["module_type"]:
            module += f" ({row['module_type']})"
        table.add_row(row["node"], row["op"], module, format_bytes(row["output_bytes"]),
                      format_bytes(row["saved_bytes"]) if row["saved_bytes"] else "-",
                      f"{row['forward_seconds'] * 1e3:.3f}")
    console.print(table)
    console.print(_breakdown_table(
        f"predicted peak ({timeline.peak_phase} at {timeline.peak_node})",
        timeline.breakdown, timeline.peak_bytes))
    console.print(f"predicted peak  {format_bytes(timeline.peak_bytes)}  "
                  f"({timeline.peak_bytes} B)")
    console.print(f"measured peak   {format_bytes(measured.peak_bytes)}  "
                  f"({measured.peak_bytes} B)   prediction error {error:+.2%}")
    console.print(f"step time       {measured.step_seconds * 1e3:.1f} ms")
    for note in result["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")
    return None


def _solver_options(args: argparse.Namespace):
    from .planner.solvers import SolverOptions
    return SolverOptions(time_limit_seconds=args.time_limit, workers=args.workers,
                         seed=args.seed, backend=args.backend)


def compile_(args: argparse.Namespace) -> dict[str, Any] | None:
    from .api import plan as make_plan
    from .planner.budget import Budget
    from .planner.solvers import get_solver
    from .planner.step import parse_decisions
    from .units import parse_size

    spec, batch_size = _load(args)
    get_solver(args.solver)  # an unknown name fails before any work, listing valid ones
    if args.budget is not None and args.budget.strip().lower() == "min":
        budget = Budget(minimum=True)
    else:
        budget = (Budget(bytes=parse_size(args.budget, what="budget")) if args.budget
                  else Budget(fraction=args.budget_fraction))
    decisions = list(parse_decisions(args.decisions))
    if not args.compress and "compress" in decisions:
        decisions.remove("compress")
    options = _solver_options(args)
    output = Path(args.output) if args.output else spec.path.with_suffix(".plan.json")
    if args.timeline:
        from .timeline import check_path
        check_path(args.timeline)  # before any work
    if not output.parent.exists():
        raise BadInputError(f"cannot write the plan to {str(output)!r}: folder "
                            f"{str(output.parent)!r} does not exist")
    with status(f"compiling {spec.name} (batch {batch_size})", quiet=args.json) as say:
        model = spec.build()
        inputs, targets = spec.batch(batch_size)
        plan, analysis = make_plan(model, inputs, targets, budget=budget,
                                   loss_fn=spec.loss_fn, optimizer=args.optimizer,
                                   solver=args.solver, options=options,
                                   compress=args.compress, min_bits=args.min_bits,
                                   repeats=args.repeats, decisions=decisions,
                                   progress=say)
    plan = replace(plan, model_name=spec.name)
    plan.save(output)
    picture = _timeline(args, spec, model, inputs, targets, analysis, plan, batch_size)
    counts = plan.counts()
    result = {
        "model": str(spec.path), "plan": str(output), "batch_size": batch_size,
        "optimizer": args.optimizer, "budget_bytes": plan.budget_bytes,
        "predicted_peak_bytes": plan.predicted_peak_bytes,
        "keep_all_peak_bytes": plan.keep_all_peak_bytes, "breakdown": dict(plan.breakdown),
        "kept": counts.get("keep", 0), "recomputed": counts.get("recompute", 0),
        "compressed": {d.split(":", 1)[1]: n for d, n in counts.items()
                       if d.startswith("compress:")},
        "predicted_overhead_seconds": plan.predicted_overhead_seconds,
        "solver": plan.solver, "status": plan.status, "objective": plan.objective,
        "bound": plan.bound, "gap": plan.gap, "solve_seconds": plan.solve_seconds,
        "nodes": len(analysis.graph), "notes": list(plan.notes),
        "decisions": decisions, "step": plan.step_choice.to_json(),
        "timeline": picture,
    }
    if args.json:
        return result
    console.print(f"step            {plan.step_choice.describe()}")
    console.print(_breakdown_table(f"{spec.name}: predicted peak of the planned step",
                                   dict(plan.breakdown), plan.predicted_peak_bytes))
    console.print(f"budget          {format_bytes(plan.budget_bytes)}  ({plan.budget_bytes} B)")
    console.print(f"predicted peak  {format_bytes(plan.predicted_peak_bytes)}  (keep-all "
                  f"{format_bytes(plan.keep_all_peak_bytes)})")
    packed = ", ".join(f"{n} at {o}" for o, n in sorted(result["compressed"].items()))
    console.print(f"tensors         {result['kept']} kept, {result['recomputed']} recomputed"
                  + (f", compressed: {packed}" if packed else ""))
    console.print(f"overhead        {plan.predicted_overhead_seconds * 1e3:.2f} ms of "
                  f"recompute and compression per step (predicted)")
    gap = "-" if plan.gap is None else f"{plan.gap:.2%}"
    console.print(f"solver          {plan.solver}: {plan.status}, gap {gap}, "
                  f"{plan.solve_seconds:.2f} s")
    for note in plan.notes:
        console.print(f"[dim]note: {note}[/dim]")
    console.print(f"wrote {output}")
    return None


def _timeline(args, spec, model, inputs, targets, analysis, plan, batch_size
              ) -> dict[str, Any] | None:
    """Draw ``--timeline`` if asked; plans with step-level decisions are not drawn yet."""
    if not args.timeline:
        return None
    from .timeline import write_timeline
    if not plan.step_choice.is_ordinary:
        note = (f"timeline not drawn: the picture draws plans with an ordinary step, this "
                f"one has {plan.step_choice.describe()}")
        if not args.json:
            console.print(f"[yellow]note:[/yellow] {note}")
        return {"path": None, "note": note}
    picture = write_timeline(args.timeline, model, inputs, targets, analysis=analysis,
                             plan=plan, loss_fn=spec.loss_fn, optimizer=args.optimizer,
                             title=f"{spec.name}, batch {batch_size}")
    if not args.json:
        console.print(f"wrote {picture.path} (predicted peak "
                      f"{format_bytes(picture.predicted_peak_bytes)}, measured "
                      f"{format_bytes(picture.measured_peak_bytes or 0)})")
    return {"path": str(picture.path), "predicted_peak_bytes": picture.predicted_peak_bytes,
            "measured_peak_bytes": picture.measured_peak_bytes}


def measure(args: argparse.Namespace) -> dict[str, Any] | None:
    import torch

    from .api import apply
    from .planner.optimizers import make_optimizer
    from .planner.plan import Plan
    from .stepplan import planned_optimizer

    spec, _ = _load(args)
    plan = Plan.load(args.plan)
    batch_size = args.batch_size if args.batch_size is not None else plan.batch_size
    if args.steps < 1:
        raise BadInputError(f"expected --steps >= 1; found {args.steps}")
    with status(f"measuring {spec.name} with {args.plan}", quiet=args.json) as say:
        model = spec.build()
        reference = copy.deepcopy(model)
        # the model's fingerprint is checked by apply(); batch and optimizer here
        plan.check_matches(batch_size=batch_size, optimizer=args.optimizer,
                           source=f"plan {args.plan!r}")
        inputs, targets = spec.batch(batch_size)
        if args.timeline:
            from .timeline import check_path
            check_path(args.timeline)
            timeline_analysis = analyze(model, inputs, targets, loss_fn=spec.loss_fn,
                                        optimizer=args.optimizer,
                                        compress=bool(plan.compressed), repeats=1)
            picture = _timeline(args, spec, model, inputs, targets, timeline_analysis, plan,
                                batch_size)
        else:
            picture = None
        planned = apply(model, plan, inputs)
        differences = []
        if plan.step_choice.is_ordinary:
            say("gradients against the unplanned model")
            for module in (reference, planned):
                module.zero_grad(set_to_none=True)
                torch.manual_seed(0)
                spec.loss_fn(call_model(module, inputs), targets).backward()
            for (_, p_ref), (_, p_plan) in zip(reference.named_parameters(),
                                                   planned.named_parameters()):
                if p_ref.grad is not None and p_plan.grad is not None:
                    differences.append(float((p_ref.grad - p_plan.grad).abs().max()))
        else:
            # step-level decisions change how the step runs (the step inside backward
            # frees every gradient): compare the parameters after one step instead
            say("parameters after one step against the unplanned model")
            one_ref, one_model = copy.deepcopy(reference), copy.deepcopy(model)
            one_plan = apply(one_model, plan, inputs)
            torch.manual_seed(0)
            ref_opt = make_optimizer(args.optimizer, one_ref.parameters())
            ref_opt.zero_grad(set_to_none=True)
            spec.loss_fn(call_model(one_ref, inputs), targets).backward()
            ref_opt.step()
            torch.manual_seed(0)
            one_plan.train_step(inputs, targets, planned_optimizer(
                plan, args.optimizer, one_plan.parameters()), spec.loss_fn)
            for p_ref, p_plan in zip(one_ref.parameters(), one_model.parameters()):
                differences.append(float((p_ref - p_plan).abs().max()))
        say("real training steps, planned and unplanned")
        measured = measure_api(planned, inputs, targets, loss_fn=spec.loss_fn,
                               optimizer=args.optimizer, steps=args.steps,
                               optimizer_instance=planned_optimizer(
                                   plan, args.optimizer, planned.parameters()))
        baseline = measure_api(reference, inputs, targets, loss_fn=spec.loss_fn,
                                optimizer=args.optimizer, steps=args.steps)
    error = (plan.predicted_peak_bytes - measured.peak_bytes) / measured.peak_bytes
    result = {
        "model": str(spec.path), "plan": args.plan, "batch_size": batch_size,
        "budget_bytes": plan.budget_bytes, "measured_peak_bytes": measured.peak_bytes,
        "predicted_peak_bytes": plan.predicted_peak_bytes, "prediction_error": error,
        "within_budget": measured.peak_bytes <= plan.budget_bytes,
        "baseline_peak_bytes": baseline.peak_bytes,
        "step_seconds": measured.step_seconds,
        "baseline_step_seconds": baseline.step_seconds,
        "overhead": measured.step_seconds / baseline.step_seconds - 1,
        "max_grad_diff": max(differences, default=0.0),
        "compared": "gradients" if plan.step_choice.is_ordinary else
                    "parameters after one step",
        "timeline": picture,
        "step": plan.step_choice.to_json(),
    }
    if args.json:
        return result
    console.print(f"measured peak   {format_bytes(measured.peak_bytes)}  "
                  f"({measured.peak_bytes} B), budget {format_bytes(plan.budget_bytes)}: "
                  f"{'within' if result['within_budget'] else 'OVER'}")
    console.print(f"predicted peak  {format_bytes(plan.predicted_peak_bytes)}  "
                  f"(error {error:+.2%})")
    console.print(f"unplanned peak  {format_bytes(baseline.peak_bytes)}")
    console.print(f"step time       {measured.step_seconds * 1e3:.1f} ms planned, "
                  f"{baseline.step_seconds * 1e3:.1f} ms unplanned "
                  f"({result['overhead']:+.1%})")
    console.print(f"step            {plan.step_choice.describe()}")
    console.print(f"max |diff|      {result['max_grad_diff']:.3g} ({result['compared']}, "
                  f"against the unplanned model)")
    return None
