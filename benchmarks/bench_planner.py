"""Planner benchmark: every example model at fractions of its keep-all activation memory.

    python benchmarks/bench_planner.py [--models examples/a.py ...] [--fractions 0.8,0.6,0.4,0.25]
        [--solvers ilp,greedy,sqrt,all] [--steps 5] [--json OUT.json]

For each model: the keep-all step is measured first; then for each budget fraction
(and the smallest budget the ILP reaches) each solver plans, and the planned module is
measured in the same process, right after, with the same batch: measured peak (profiler
memory events), median step time over ``--steps`` steps after a warm-up, and the largest
gradient difference against keep-all. Then, for each baseline (``sqrt``, ``all``) that
fits somewhere, the ILP is given the baseline's own predicted peak as budget, so the two
compare at equal memory. Prints markdown tables. Recompute only (``compress=False``):
compression has its own benchmark, ``bench_compress.py``.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import statistics
import sys
import time

import torch

import fedplan
from fedplan.analysis import trace
from fedplan.modelfile import load_model_file
from fedplan.planner.budget import fixed_floor
from fedplan.planner.simulate import simulate


def measure_plan(spec, base, inputs, targets, plan, steps):
    model = copy.deepcopy(base)
    graph_module, _ = trace(model, inputs)
    planned = fedplan.PlannedModule(model, graph_module, plan)
    step = fedplan.measure(planned, inputs, targets, loss_fn=spec.loss_fn, steps=steps)
    return step, planned


def grad_diff(spec, reference, planned, inputs, targets):
    grads = []
    for module in (reference, planned):
        module.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        spec.loss_fn(module(*inputs), targets).backward()
        grads.append([p.grad for p in module.parameters()])
    return max(float((a - b).abs().max()) for a, b in zip(*grads) if a is not None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--fractions", default="0.8,0.6,0.4,0.25")
    parser.add_argument("--solvers", default="ilp,greedy,sqrt,all")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    paths = args.models or sorted(glob.glob("examples/*.py"))
    fractions = [float(f) for f in args.fractions.split(",")]
    solvers = args.solvers.split(",")
    rows, compare = [], []
    for path in paths:
        spec = load_model_file(path)
        base = spec.build()
        inputs, targets = spec.batch(spec.default_batch_size)
        analysis = fedplan.analyze(base, inputs, targets, loss_fn=spec.loss_fn,
                                   compress=False)
        keep_all = simulate(analysis.graph, analysis.costs).peak_bytes
        floor = fixed_floor(analysis.costs)
        keep_step = fedplan.measure(copy.deepcopy(base), inputs, targets, loss_fn=spec.loss_fn,
                                    steps=args.steps)
        budgets = [(f"{f:g}", int(floor + f * (keep_all - floor))) for f in fractions]
        try:
            fedplan.plan(base, inputs, targets, compress=False, loss_fn=spec.loss_fn,
                         budget=floor + 1, analysis=analysis)
        except fedplan.BudgetInfeasibleError as exc:
            if exc.smallest_bytes:
                smallest = int(exc.smallest_bytes * 1.011) + 65536  # room for the margin
                budgets.append(("min", smallest))
        for label, budget in budgets:
            for solver in solvers:
                row = {"model": spec.name, "fraction": label, "solver": solver,
                       "budget": budget, "keep_all_measured": keep_step.peak_bytes,
                       "keep_all_step": keep_step.step_seconds}
                start = time.perf_counter()
                try:
                    plan, _ = fedplan.plan(base, inputs, targets, compress=False,
                                           loss_fn=spec.loss_fn,
                                           budget=budget, solver=solver, analysis=analysis)
                except fedplan.FedplanError as exc:
                    row["error"] = str(exc).split(";")[0][:90]
                    rows.append(row)
                    continue
                row["solve_seconds"] = time.perf_counter() - start
                fresh = copy.deepcopy(base)
                planned = fedplan.PlannedModule(fresh, trace(fresh, inputs)[0], plan)
                difference = grad_diff(spec, copy.deepcopy(base), planned, inputs, targets)
                step, _ = measure_plan(spec, base, inputs, targets, plan, args.steps)
                row.update(predicted=plan.predicted_peak_bytes, measured=step.peak_bytes,
                           step=step.step_seconds, status=plan.status,
                           recomputed=plan.counts().get("recompute", 0),
                           grad_diff=difference)
                rows.append(row)
                print(f"{spec.name} {label} {solver} done", file=sys.stderr, flush=True)
        # equal-memory comparison: the ILP at each baseline's own peak
        for baseline in ("sqrt", "all"):
            try:
                plan_b, _ = fedplan.plan(base, inputs, targets, compress=False,
                                         loss_fn=spec.loss_fn,
                                         budget=keep_all * 2, solver=baseline,
                                         analysis=analysis)
                # the baseline's plan, however large the budget: re-solve at its peak
                plan_b, _ = fedplan.plan(base, inputs, targets, compress=False,
                                         loss_fn=spec.loss_fn,
                                         budget=plan_b.predicted_peak_bytes + 65536,
                                         solver=baseline, analysis=analysis)
            except fedplan.FedplanError as exc:
                compare.append({"model": spec.name, "baseline": baseline,
                                "error": str(exc)[:80]})
                continue
            # the budget whose target (budget less the safety margin) is the baseline's
            # own peak, so the ILP's plan peaks no higher than the baseline's
            options = fedplan.SolverOptions()
            equal = int((plan_b.predicted_peak_bytes + options.safety_bytes
                         - options.safety_fraction * floor) / (1 - options.safety_fraction))
            try:
                plan_i, _ = fedplan.plan(base, inputs, targets, compress=False,
                                         loss_fn=spec.loss_fn,
                                         budget=equal, solver="ilp", analysis=analysis)
            except fedplan.FedplanError as exc:
                compare.append({"model": spec.name, "baseline": baseline,
                                "error": "ilp: " + str(exc)[:80]})
                continue
            samples_b, samples_i = [], []
            for _ in range(3):  # alternate, so drift hits both alike
                step_b, _ = measure_plan(spec, base, inputs, targets, plan_b, args.steps)
                step_i, _ = measure_plan(spec, base, inputs, targets, plan_i, args.steps)
                samples_b.append(step_b.step_seconds)
                samples_i.append(step_i.step_seconds)
            compare.append({"model": spec.name, "baseline": baseline,
                            "baseline_peak": step_b.peak_bytes, "ilp_peak": step_i.peak_bytes,
                            "baseline_step": statistics.median(samples_b),
                            "ilp_step": statistics.median(samples_i),
                            "keep_all_step": keep_step.step_seconds})
            print(f"{spec.name} vs {baseline} done", file=sys.stderr, flush=True)
    mib = 2**20
    print("| model | budget | solver | budget MiB | predicted MiB | measured MiB | within | "
          "pred. error | step vs keep-all | recomputed | solve s | max grad diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['model']} | {row['fraction']} | {row['solver']} | "
                  f"{row['budget'] / mib:.2f} | - | - | - | - | - | - | - | "
                  f"{row['error']} |")
            continue
        within = "yes" if row["measured"] <= row["budget"] else "**NO**"
        error = (row["predicted"] - row["measured"]) / row["measured"]
        overhead = row["step"] / row["keep_all_step"] - 1
        print(f"| {row['model']} | {row['fraction']} | {row['solver']} | "
              f"{row['budget'] / mib:.2f} | {row['predicted'] / mib:.2f} | "
              f"{row['measured'] / mib:.2f} | {within} | {error:+.2%} | {overhead:+.1%} | "
              f"{row['recomputed']} | {row['solve_seconds']:.2f} | {row['grad_diff']:.1g} |")
    print()
    print("| model | baseline | baseline peak MiB | ilp peak MiB | baseline step vs keep-all "
          "| ilp step vs keep-all | ilp / baseline time |")
    print("|---|---|---|---|---|---|---|")
    for item in compare:
        if "error" in item:
            print(f"| {item['model']} | {item['baseline']} | - | - | - | - | {item['error']} |")
            continue
        print(f"| {item['model']} | {item['baseline']} | {item['baseline_peak'] / mib:.2f} | "
              f"{item['ilp_peak'] / mib:.2f} | "
              f"{item['baseline_step'] / item['keep_all_step'] - 1:+.1%} | "
              f"{item['ilp_step'] / item['keep_all_step'] - 1:+.1%} | "
              f"{item['ilp_step'] / item['baseline_step']:.3f} |")
    if args.json:
        with open(args.json, "w") as stream:
            json.dump({"rows": rows, "compare": compare}, stream, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
