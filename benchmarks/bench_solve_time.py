"""ILP solve time against graph size: ViT-tiny made deeper until the graph has ~1,000 nodes.

    python benchmarks/bench_solve_time.py [--depths 6,12,24,38] [--fraction 0.6]
        [--time-limit 30]

For each depth: nodes in the traced graph, then ``ilp`` (CP-SAT, greedy warm start) and
``greedy`` at the same budget: wall time, status, and the predicted recompute overhead.
"""

from __future__ import annotations

import argparse
import sys
import time

import fedplan
from fedplan.modelfile import load_model_file
from fedplan.planner.budget import fixed_floor
from fedplan.planner.simulate import simulate
from fedplan.planner.solvers import SolverOptions, solve


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="6,12,24,38")
    parser.add_argument("--fraction", type=float, default=0.6)
    parser.add_argument("--time-limit", type=float, default=30.0)
    args = parser.parse_args(argv)
    spec = load_model_file("examples/vit_tiny.py")
    module = sys.modules[spec.build_model.__module__]
    print("| depth | nodes | solver | status | wall s | predicted overhead ms |")
    print("|---|---|---|---|---|---|")
    for depth in (int(d) for d in args.depths.split(",")):
        module.DEPTH = depth
        model = spec.build()
        inputs, targets = spec.batch(4)
        analysis = fedplan.analyze(model, inputs, targets, repeats=1)
        keep_all = simulate(analysis.graph, analysis.costs).peak_bytes
        floor = fixed_floor(analysis.costs)
        budget = int(floor + args.fraction * (keep_all - floor))
        for solver in ("ilp", "greedy"):
            start = time.perf_counter()
            try:
                plan = solve(analysis.graph, analysis.costs, budget, solver=solver,
                             options=SolverOptions(time_limit_seconds=args.time_limit))
            except fedplan.FedplanError as exc:
                print(f"| {depth} | {len(analysis.graph)} | {solver} | {exc} | - | - |")
                continue
            seconds = time.perf_counter() - start
            print(f"| {depth} | {len(analysis.graph)} | {solver} | {plan.status} | "
                  f"{seconds:.2f} | {plan.predicted_overhead_seconds * 1e3:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
