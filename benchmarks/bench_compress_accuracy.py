"""Accuracy with compressed activations: train on real digits, compare test accuracy.

    python benchmarks/bench_compress_accuracy.py [--models examples/mnist_cnn.py ...]
        [--dataset mnist5k] [--epochs 5] [--batch-size 32] [--lr 0.05] [--seed 0]

For each model, the same initial weights, the same batches in the same order and the
same dropout draws train it under each plan; only the plan differs:

* ``keep``: keep-all (no plan);
* ``8``, ``4``, ``2``, ``mixed4``, ``mixed3``: every compressible activation compressed
  with that option (uniform per-group codes, or channel-wise mixed widths);
* ``planner``: ``fedplan.plan`` with its defaults (compression on, ``min_bits`` 4) at the
  smallest budget it reaches plus its safety margin; below the recompute-only minimum, so
  it must compress if it can.

Reports final test accuracy (held-out split of the dataset, ``fl.data.load_dataset``),
the relative gradient error of one batch against keep-all, and the predicted peak.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace

import torch

import fedplan
from fedplan.analysis import trace
from fedplan.fl.data import load_dataset
from fedplan.modelfile import load_model_file
from fedplan.planner.compression import eligible
from fedplan.planner.simulate import simulate
from fedplan.planner.solvers import SolverOptions, minimum_peak

FORCED = ("8", "4", "2", "mixed4", "mixed3")


def forced_plan(base_plan, analysis, option):
    names = list(eligible(analysis.graph, analysis.costs))
    decisions = dict(base_plan.decisions)
    for name in names:
        decisions[name] = f"compress:{option}"
    peak = simulate(analysis.graph, analysis.costs, decisions).peak_bytes
    return replace(base_plan, decisions=tuple(decisions.items()), predicted_peak_bytes=peak,
                   solver=f"all-{option}")


def train(spec, base, plan, data, args):
    model = copy.deepcopy(base)
    module = model if plan is None else fedplan.PlannedModule(
        model, trace(model, (data.train_x[:args.batch_size],))[0], plan)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    n = len(data.train_y)
    module.train()
    for _ in range(args.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - args.batch_size + 1, args.batch_size):
            index = order[start:start + args.batch_size]
            optimizer.zero_grad(set_to_none=True)
            spec.loss_fn(module(data.train_x[index]), data.train_y[index]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        predictions = model(data.test_x).argmax(1)
    return float((predictions == data.test_y).float().mean())


def grad_error(spec, base, plan, inputs, targets):
    grads = []
    for use_plan in (False, True):
        model = copy.deepcopy(base)
        module = fedplan.PlannedModule(model, trace(model, inputs)[0], plan) if use_plan \
            else model
        torch.manual_seed(0)
        spec.loss_fn(module(*inputs), targets).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return float((grads[0] - grads[1]).norm() / grads[0].norm())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*",
                        default=["examples/mnist_cnn.py", "examples/mnist_mbconv.py"])
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plans", default="keep,8,4,2,mixed4,mixed3,planner",
                        help="comma-separated subset of keep, 8, 4, 2, mixed4, mixed3, planner")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    data = load_dataset(args.dataset)
    rows = []
    for path in args.models:
        spec = load_model_file(path)
        torch.manual_seed(args.seed)
        base = spec.build()
        inputs = (data.train_x[:args.batch_size],)
        targets = data.train_y[:args.batch_size]
        analysis = fedplan.analyze(base, inputs, targets, loss_fn=spec.loss_fn)
        keep_plan, _ = fedplan.plan(base, inputs, targets, budget=10**12, solver="none",
                                    loss_fn=spec.loss_fn, analysis=analysis, verify=False)
        plans = {"keep": None}
        for option in FORCED:
            plans[option] = forced_plan(keep_plan, analysis, option)
        recompute_min, _ = minimum_peak(analysis.graph, analysis.costs,
                                        SolverOptions(compress=False))
        compress_min, _ = minimum_peak(analysis.graph, analysis.costs,
                                       SolverOptions(compress=True))
        budget = int(compress_min * 1.011) + 65536
        note = ""
        try:
            plans["planner"], _ = fedplan.plan(base, inputs, targets, budget=budget,
                                               loss_fn=spec.loss_fn, analysis=analysis)
            counts = plans["planner"].counts()
            note = ", ".join(f"{n} {d}" for d, n in sorted(counts.items()) if d != "keep")
        except fedplan.FedplanError as exc:
            note = "error: " + str(exc).split(";")[0][:100]
        keep_peak = simulate(analysis.graph, analysis.costs).peak_bytes
        wanted = args.plans.split(",")
        for name, plan in plans.items():
            if name not in wanted:
                continue
            start = time.perf_counter()
            accuracy = train(spec, base, plan, data, args)
            row = {"model": spec.name, "plan": name, "accuracy": accuracy,
                   "seconds": time.perf_counter() - start,
                   "predicted_peak": plan.predicted_peak_bytes if plan else keep_peak,
                   "keep_all_peak": keep_peak,
                   "grad_rel_error": grad_error(spec, base, plan, inputs, targets)
                   if plan else 0.0,
                   "budget": budget if name == "planner" else None,
                   "recompute_min": recompute_min, "compress_min": compress_min,
                   "note": note if name == "planner" else ""}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    print(f"Dataset {args.dataset} ({len(data.train_y)} train / {len(data.test_y)} test), "
          f"{args.epochs} epochs, batch {args.batch_size}, SGD lr {args.lr} momentum 0.9, "
          f"seed {args.seed}.\n")
    print("| model | plan | test accuracy | Δ vs keep-all (points) | grad. rel. error "
          "(one batch) | predicted peak / keep-all | notes |")
    print("|---|---|---|---|---|---|---|")
    keep = {r["model"]: r["accuracy"] for r in rows if r["plan"] == "keep"}
    for r in rows:
        delta = (f"{100 * (r['accuracy'] - keep[r['model']]):+.2f}" if r["model"] in keep
                 else "-")
        print(f"| {r['model']} | {r['plan']} | {100 * r['accuracy']:.2f}% | "
              f"{delta} | {r['grad_rel_error']:.3g} | "
              f"{r['predicted_peak'] / r['keep_all_peak']:.3f} | {r['note']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
