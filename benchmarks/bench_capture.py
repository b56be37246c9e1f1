"""Capture and plan models that torch.fx could not trace (issue: torch.export capture).

For each model file: capture with torch.export, predict the keep-all peak and measure
it; plan recompute-only at budget fractions 0.8 and 0.5 and at the smallest reachable
peak; measure each planned step against its budget; compare loss and gradients after one
step with the unplanned captured module (bit for bit) and with eager PyTorch (largest
difference relative to the largest gradient).

    python benchmarks/bench_capture.py examples/bert_tiny.py examples/llama_lora.py ...
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time

import torch

import fedplan
from fedplan.modelfile import call_model, load_model_file
from fedplan.planner.capture import capture
from fedplan.planner.simulate import simulate
from fedplan.runtime.rewrite import PlannedModule


def one_step(module, spec, inputs, targets):
    torch.manual_seed(1234)
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss = spec.loss_fn(call_model(module, inputs), targets)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


def largest_difference(grads_a, grads_b) -> float:
    scale = max(float(g.abs().max()) for g in grads_a) or 1.0
    return max(float((a - b).abs().max()) for a, b in zip(grads_a, grads_b)) / scale


def run(path: str, fractions: list[float], repeats: int) -> dict:
    spec = load_model_file(path)
    model = spec.build()
    inputs, targets = spec.batch(spec.default_batch_size)
    start = time.perf_counter()
    analysis = fedplan.analyze(model, inputs, targets, loss_fn=spec.loss_fn, compress=False,
                               repeats=repeats)
    analyze_seconds = time.perf_counter() - start
    predicted = simulate(analysis.graph, analysis.costs).peak_bytes
    measured = fedplan.measure(copy.deepcopy(model), inputs, targets, loss_fn=spec.loss_fn,
                               steps=1).peak_bytes
    row = {"model": spec.name, "nodes": len(analysis.graph),
           "trainable_parameters": sum(p.numel() for p in model.parameters()
                                       if p.requires_grad),
           "frozen_parameters": sum(p.numel() for p in model.parameters()
                                    if not p.requires_grad),
           "gradient_bytes": analysis.costs.grad_bytes,
           "optimizer_state_bytes": analysis.costs.optimizer_state_bytes,
           "analyze_seconds": round(analyze_seconds, 2),
           "keep_all_predicted": predicted, "keep_all_measured": measured,
           "keep_all_error": (predicted - measured) / measured, "plans": []}
    eager_loss, eager_grads = one_step(copy.deepcopy(model), spec, inputs, targets)
    shadow = copy.deepcopy(model)
    captured_module = PlannedModule(shadow, capture(shadow, inputs), fedplan.Plan(
        fingerprint="", model_name="", batch_size=0, budget_bytes=0, optimizer="sgd",
        decisions=(), predicted_peak_bytes=0, predicted_overhead_seconds=0.0,
        keep_all_peak_bytes=0, solver="none", status="baseline", objective=0.0, bound=None,
        solve_seconds=0.0))
    captured_loss, captured_grads = one_step(captured_module, spec, inputs, targets)
    row["eager_loss_equal"] = bool(torch.equal(eager_loss, captured_loss))
    row["eager_grad_difference"] = largest_difference(eager_grads, captured_grads)
    budgets = [("fraction", f) for f in fractions] + [("min", None)]
    for kind, fraction in budgets:
        if kind == "fraction":
            budget = fedplan.Budget(fraction=fraction)
        else:
            # the smallest peak the recompute-only plan space reaches, from the error,
            # plus the safety margin plans keep (the budget the error advises)
            costs = analysis.costs
            floor = costs.fixed_bytes + costs.grad_bytes
            try:
                fedplan.plan(model, inputs, targets, budget=floor + 1, loss_fn=spec.loss_fn,
                             compress=False, analysis=analysis, verify=False)
            except fedplan.BudgetInfeasibleError as exc:
                options = fedplan.SolverOptions()
                budget = math.ceil((exc.smallest_bytes + options.safety_bytes
                                    - options.safety_fraction * floor)
                                   / (1 - options.safety_fraction))
        start = time.perf_counter()
        plan, _ = fedplan.plan(model, inputs, targets, budget=budget, loss_fn=spec.loss_fn,
                               compress=False, analysis=analysis)
        plan_seconds = time.perf_counter() - start
        planned_model = copy.deepcopy(model)
        planned = PlannedModule(planned_model, capture(planned_model, inputs), plan)
        step = fedplan.measure(planned, inputs, targets, loss_fn=spec.loss_fn, steps=1)
        other = copy.deepcopy(model)
        planned_once = PlannedModule(other, capture(other, inputs), plan)
        loss, grads = one_step(planned_once, spec, inputs, targets)
        row["plans"].append({
            "budget": kind if fraction is None else fraction,
            "budget_bytes": plan.budget_bytes, "predicted": plan.predicted_peak_bytes,
            "measured": step.peak_bytes, "held": step.peak_bytes <= plan.budget_bytes,
            "prediction_error": (plan.predicted_peak_bytes - step.peak_bytes) / step.peak_bytes,
            "recomputed": len(plan.recomputed), "status": plan.status,
            "solve_seconds": round(plan.solve_seconds, 2),
            "plan_seconds": round(plan_seconds, 2),
            "loss_equal_captured": bool(torch.equal(loss, captured_loss)),
            "grads_equal_captured": all(torch.equal(a, b)
                                        for a, b in zip(grads, captured_grads))})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--fractions", default="0.8,0.5")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    rows = []
    for path in args.models:
        row = run(path, fractions, args.repeats)
        rows.append(row)
        if args.json:
            continue
        print(f"{row['model']}: {row['nodes']} nodes, keep-all predicted "
              f"{row['keep_all_predicted']} measured {row['keep_all_measured']} "
              f"({row['keep_all_error']:+.3%}); eager loss equal {row['eager_loss_equal']}, "
              f"eager grad diff {row['eager_grad_difference']:.2e}; trainable "
              f"{row['trainable_parameters']} frozen {row['frozen_parameters']}, grads "
              f"{row['gradient_bytes']} B, optimizer state {row['optimizer_state_bytes']} B",
              flush=True)
        for plan in row["plans"]:
            print(f"   budget {plan['budget']}: {plan['budget_bytes']} B, predicted "
                  f"{plan['predicted']}, measured {plan['measured']} "
                  f"({plan['prediction_error']:+.3%}), held {plan['held']}, recomputed "
                  f"{plan['recomputed']}, {plan['status']}, solve {plan['solve_seconds']} s, "
                  f"bit-identical to captured: loss {plan['loss_equal_captured']} grads "
                  f"{plan['grads_equal_captured']}", flush=True)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)


if __name__ == "__main__":
    main()
