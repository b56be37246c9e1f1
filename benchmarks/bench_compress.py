"""Compression benchmark: the smallest budget each example model reaches, with and without.

    python benchmarks/bench_compress.py [--models examples/a.py ...] [--min-bits 2]
        [--steps 3] [--json OUT.json]

For each model (default batch size): trace and measure once, then

* the smallest peak of the recompute-only plan space and of the plan space with
  compression down to ``--min-bits`` (``minimum_peak``: ILP in min-peak mode and the
  greedy's segment plans, judged by the simulator), each as a fraction of the keep-all
  activation memory on top of the fixed costs (parameters, gradients, optimizer state,
  buffers, batch);
* a plan with compression at the 1/8 budget (the issue's goal) when it is reachable,
  else at the smallest budget (in steps of 1% of the activation memory above the smallest
  reachable peak plus the planner's safety margin) where the ILP finds a plan; the plan is
  applied and measured (profiler memory events): measured peak, prediction error, step
  time against keep-all, relative gradient error against keep-all.

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import sys

import torch

import fedplan
from fedplan.analysis import trace
from fedplan.modelfile import load_model_file
from fedplan.planner.budget import fixed_floor
from fedplan.planner.simulate import simulate
from fedplan.planner.solvers import SolverOptions, minimum_peak


def grad_error(spec, base, plan, inputs, targets) -> float:
    """Relative error of one step's parameter gradients against keep-all, same weights."""
    reference, model = copy.deepcopy(base), copy.deepcopy(base)
    planned = fedplan.PlannedModule(model, trace(model, inputs)[0], plan)
    grads = []
    for module in (reference, planned):
        module.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        spec.loss_fn(module(*inputs), targets).backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.parameters()
                                if p.grad is not None]))
    return float((grads[0] - grads[1]).norm() / grads[0].norm())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--min-bits", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = []
    for path in args.models or sorted(glob.glob("examples/*.py")):
        spec = load_model_file(path)
        inputs, targets = spec.batch(spec.default_batch_size)
        torch.manual_seed(0)
        base = spec.build()
        analysis = fedplan.analyze(base, inputs, targets, loss_fn=spec.loss_fn)
        graph, costs = analysis.graph, analysis.costs
        keep_all = simulate(graph, costs).peak_bytes
        floor = fixed_floor(costs)
        activation = keep_all - floor

        def fraction(peak, floor=floor, activation=activation):
            return (peak - floor) / activation

        recompute_min, _ = minimum_peak(graph, costs, SolverOptions(compress=False))
        compress_min, _ = minimum_peak(graph, costs, SolverOptions(
            compress=True, min_bits=args.min_bits))
        row = {"model": spec.name, "batch": spec.default_batch_size,
               "nodes": len(graph), "compressible": len(costs.compress),
               "keep_all": keep_all, "fixed": floor,
               "recompute_min": recompute_min, "compress_min": compress_min,
               "recompute_min_fraction": fraction(recompute_min),
               "compress_min_fraction": fraction(compress_min)}
        eighth = int(floor + activation / 8)
        options = SolverOptions(compress=True, min_bits=args.min_bits)
        # the 1/8 budget if the plan space reaches it; else the smallest reachable peak
        # plus the planner's safety margin, raised 1% of the activation memory at a time
        # while the ILP (whose memory model is an upper bound) finds no plan there
        start = max(eighth, int(compress_min * 1.011) + 65536)
        budgets = [eighth] if compress_min < eighth * 0.985 else [
            int(start + k * 0.01 * activation) for k in range(8)]
        plan = None
        for budget in budgets:
            row["budget"] = budget
            row["budget_fraction"] = fraction(budget)
            try:
                plan, _ = fedplan.plan(base, inputs, targets, loss_fn=spec.loss_fn,
                                       budget=budget, analysis=analysis, options=options,
                                       min_bits=args.min_bits)
                row.pop("error", None)
                break
            except fedplan.FedplanError as exc:
                row["error"] = str(exc).split(";")[0][:120]
        if plan is not None:
            model = copy.deepcopy(base)
            planned = fedplan.PlannedModule(model, trace(model, inputs)[0], plan)
            step = fedplan.measure(planned, inputs, targets, loss_fn=spec.loss_fn,
                                   steps=args.steps)
            keep = fedplan.measure(copy.deepcopy(base), inputs, targets, loss_fn=spec.loss_fn,
                                   steps=args.steps)
            counts = plan.counts()
            row.update({
                "measured": step.peak_bytes, "predicted": plan.predicted_peak_bytes,
                "error_pct": 100 * (plan.predicted_peak_bytes - step.peak_bytes)
                / step.peak_bytes,
                "within_budget": step.peak_bytes <= plan.budget_bytes,
                "step_ratio": step.step_seconds / keep.step_seconds,
                "grad_rel_error": grad_error(spec, base, plan, inputs, targets),
                "recomputed": counts.get("recompute", 0),
                "compressed": {d.split(":")[1]: n for d, n in counts.items()
                               if d.startswith("compress:")},
                "status": plan.status, "solve_seconds": plan.solve_seconds})
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    print("| model | batch | keep-all peak | fixed costs | smallest, recompute only | "
          "smallest, with compression | budget planned | measured peak | pred. error | "
          "step time / keep-all | grad. rel. error | plan |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    mb = 2 ** 20
    for r in rows:
        plan = ("error: " + r["error"]) if "error" in r else (
            f"{r['recomputed']} recompute, "
            + ", ".join(f"{n}×{o}" for o, n in sorted(r["compressed"].items())))
        measured = (f"{r['measured'] / mb:.2f} MiB" + ("" if r["within_budget"] else " OVER")
                    if "measured" in r else "-")
        print(f"| {r['model']} | {r['batch']} | {r['keep_all'] / mb:.2f} MiB | "
              f"{r['fixed'] / mb:.2f} MiB | {r['recompute_min'] / mb:.2f} MiB "
              f"({r['recompute_min_fraction']:.3f}) | {r['compress_min'] / mb:.2f} MiB "
              f"({r['compress_min_fraction']:.3f}) | {r['budget'] / mb:.2f} MiB "
              f"({r['budget_fraction']:.3f}) | {measured} | "
              + (f"{r['error_pct']:+.2f}% | {r['step_ratio']:.2f} | "
                 f"{r['grad_rel_error']:.3g} | " if "measured" in r else "- | - | - | ")
              + f"{plan} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
