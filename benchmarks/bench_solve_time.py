"""ILP solve time against graph size: ViT-tiny made deeper until the graph has ~1,000 nodes.

    python benchmarks/bench_solve_time.py [--depths 6,12,24,38] [--fraction 0.6]
        [--time-limit 5] [--backends CBC,CP_SAT] [--reference-limit 60]

For each depth: nodes in the traced graph, then ``ilp`` with each OR-Tools backend
(greedy warm start; the time limit covers the whole solve: warm start, model build,
search and the simulator's refine) and ``greedy`` at the same budget: wall and CPU time
of ``planner.solvers.solve`` (solvers imported beforehand; CPU time counts every thread,
so CP-SAT's 8 workers add up), status, the predicted recompute
overhead of the plan and the ILP's lower bound. With ``--reference-limit`` the first
backend also runs with that longer limit, to show how far the time-limited plans are from
the best plan found with more time.
"""

from __future__ import annotations

import argparse
import sys
import time

import fedplan
from fedplan.modelfile import load_model_file
from fedplan.planner.budget import fixed_floor
from fedplan.planner.simulate import simulate
from fedplan.planner.solvers import SolverOptions, get_solver, solve


def _row(depth, nodes, label, graph, costs, budget, solver, options) -> None:
    start, cpu = time.perf_counter(), time.process_time()
    try:
        plan = solve(graph, costs, budget, solver=solver, options=options)
    except fedplan.FedplanError as exc:
        print(f"| {depth} | {nodes} | {label} | {exc} | - | - | - | - |", flush=True)
        return
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    bound = "-" if plan.bound is None else f"{plan.bound * 1e3:.2f}"
    print(f"| {depth} | {nodes} | {label} | {plan.status} | {seconds:.2f} | {cpu:.2f} | "
          f"{plan.predicted_overhead_seconds * 1e3:.2f} | {bound} |", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="6,12,24,38")
    parser.add_argument("--fraction", type=float, default=0.6)
    parser.add_argument("--time-limit", type=float, default=5.0)
    parser.add_argument("--backends", default="CBC,CP_SAT")
    parser.add_argument("--reference-limit", type=float, default=0.0,
                        help="also run the first backend with this limit (0: off)")
    args = parser.parse_args(argv)
    spec = load_model_file("examples/vit_tiny.py")
    module = sys.modules[spec.build_model.__module__]
    get_solver("ilp")  # import the solvers (and OR-Tools) before timing anything
    backends = args.backends.split(",")
    print("| depth | nodes | solver | status | wall s | CPU s | predicted overhead ms | "
          "bound ms |")
    print("|---|---|---|---|---|---|---|---|")
    for depth in (int(d) for d in args.depths.split(",")):
        module.DEPTH = depth
        model = spec.build()
        inputs, targets = spec.batch(4)
        analysis = fedplan.analyze(model, inputs, targets, repeats=1, compress=False)
        graph, costs = analysis.graph, analysis.costs
        keep_all = simulate(graph, costs).peak_bytes
        floor = fixed_floor(costs)
        budget = int(floor + args.fraction * (keep_all - floor))
        for backend in backends:
            options = SolverOptions(time_limit_seconds=args.time_limit, backend=backend)
            _row(depth, len(graph), f"ilp {backend} {args.time_limit:g} s", graph, costs,
                 budget, "ilp", options)
        if args.reference_limit:
            options = SolverOptions(time_limit_seconds=args.reference_limit,
                                    backend=backends[0])
            _row(depth, len(graph), f"ilp {backends[0]} {args.reference_limit:g} s", graph,
                 costs, budget, "ilp", options)
        _row(depth, len(graph), "greedy", graph, costs, budget, "greedy", SolverOptions())
    return 0


if __name__ == "__main__":
    sys.exit(main())
