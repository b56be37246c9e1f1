"""Predicted against measured keep-all peak for every example model at two batch sizes.

    python benchmarks/bench_peak.py [--models examples/a.py ...] [--optimizer sgd]
        [--markdown]

Prints a table (markdown with --markdown, for BENCHMARKS.md). The predicted peak is the
simulator's (planner/simulate.py) over the measured cost model; the measured peak is
``fedplan.measure``'s (profiler memory events, see the README's definition).
"""

from __future__ import annotations

import argparse
import copy
import glob
import sys
import time

import fedplan
from fedplan.modelfile import load_model_file
from fedplan.planner.simulate import simulate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    paths = args.models or sorted(glob.glob("examples/*.py"))
    rows = []
    for path in paths:
        spec = load_model_file(path)
        for batch_size in (spec.default_batch_size, 2 * spec.default_batch_size):
            model = spec.build()
            inputs, targets = spec.batch(batch_size)
            start = time.perf_counter()
            analysis = fedplan.analyze(model, inputs, targets, loss_fn=spec.loss_fn,
                                       optimizer=args.optimizer, repeats=1)
            seconds = time.perf_counter() - start
            predicted = simulate(analysis.graph, analysis.costs).peak_bytes
            measured = fedplan.measure(copy.deepcopy(model), inputs, targets,
                                       loss_fn=spec.loss_fn, optimizer=args.optimizer).peak_bytes
            rows.append((spec.name, batch_size, len(analysis.graph), predicted, measured,
                         (predicted - measured) / measured, seconds))
            print(f"{spec.name} {batch_size} done", file=sys.stderr)
    header = ("model", "batch", "nodes", "predicted MiB", "measured MiB", "error",
              "profile s")
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for name, batch, nodes, pred, meas, err, secs in rows:
            print(f"| {name} | {batch} | {nodes} | {pred / 2**20:.2f} | {meas / 2**20:.2f} | "
                  f"{err:+.2%} | {secs:.1f} |")
    else:
        for row in rows:
            print(*row)
    worst = max(abs(row[5]) for row in rows)
    print(f"worst prediction error: {worst:.2%}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
