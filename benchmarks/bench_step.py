"""Whole-step plans on the example models: smallest peak, and speed at half the keep-all peak.

    python benchmarks/bench_step.py [MODEL[:BATCH] ...] [--repeats 7] [--plan-repeats 1]
        [--time-limit 20] [--threads 1] [--explicit-microbatch] [--json FILE]
    python benchmarks/bench_step.py --from-json FILE   (the tables of a saved run)

MODEL is a name in examples/ (``unet``) or a model file's path; BATCH overrides the file's
``DEFAULT_BATCH_SIZE``. Default: unet:16 densenet_concat resnet_inplace two_input gpt mlp_bn.
For each model:

(a) keep-all: the measured peak of one ordinary step (``fedplan.measure``).
(b) smallest peak: ``fedplan.plan(budget="min", decisions="all", min_bits=2)``, planned
    twice (``--no-repeat``: once) to check that it repeats (same budget, same decisions); the step
    decisions and per-activation counts it chose, its predicted peak, the measured peak of
    the planned module with the plan's optimizer (8-bit state when chosen), the measured
    fraction of keep-all and the prediction error. When the planner's own check refuses
    its plan (the real step measured above the budget it set itself), the error is kept
    and the plan is made again with ``verify=False`` so that its peak can still be shown.
    ``--explicit-microbatch`` adds the same with the decisions named one by one (since
    ``"all"`` allows micro-batches on BatchNorm models too, the two should agree).
(c) half budget: ``budget = int(0.5 * keep-all measured peak)``; the whole-step plan with
    the default decisions (``decisions="default"``: recompute, micro-batches where no
    BatchNorm, the optimizer step inside backward) and the best recompute-only plan
    (``decisions="recompute"``); an infeasible plan is recorded with the smallest peak its
    error states.

Step times: every variant (keep-all, each plan) gets its own copy of the model and its own
optimizer; one round runs one step of each, in a rotating order, and ``--repeats`` rounds
follow one warm-up round. Each plan's overhead is its step time over keep-all's in the
same round (a paired ratio, so load that drifts between rounds cancels); reported as the
median and the interquartile range over rounds, for process CPU time and wall time.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import fedplan
from fedplan.modelfile import load_model_file
from fedplan.planner.optimizers import make_optimizer
from fedplan.runtime.step import train_step
from fedplan.stepplan import planned_optimizer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEFAULT_MODELS = ("unet:16", "densenet_concat", "resnet_inplace", "two_input", "gpt", "mlp_bn")
ALL_NAMED = ("recompute,compress,microbatch,optimizer-in-backward,"
             "compress-optimizer-state")
MIB = 2**20


def load(model_arg: str):
    name, _, batch = model_arg.partition(":")
    path = Path(name) if name.endswith(".py") else EXAMPLES / f"{name}.py"
    spec = load_model_file(path)
    return spec, int(batch) if batch else spec.default_batch_size


def quartiles(values: list[float]) -> dict:
    """Median and interquartile range (inclusive method; needs at least 2 values)."""
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3, "iqr": q3 - q1}


def make_plan(spec, model, inputs, targets, *, budget, decisions, args, say) -> dict:
    """One plan; the result as a dict (with the Plan under "plan", or the error)."""
    options = fedplan.SolverOptions(time_limit_seconds=args.time_limit)
    common = dict(budget=budget, decisions=decisions, min_bits=2, loss_fn=spec.loss_fn,
                  repeats=args.plan_repeats, options=options)
    started = time.perf_counter()
    row: dict = {"decisions": decisions, "budget": budget}
    try:
        plan, _ = fedplan.plan(model, inputs, targets, **common)
    except fedplan.BudgetInfeasibleError as exc:
        row.update(error=str(exc), smallest_bytes=exc.smallest_bytes)
        if "in a real step" not in str(exc):
            row["plan_seconds"] = time.perf_counter() - started
            return row
        # The planner refused its own plan after measuring it over the budget: plan again
        # without that check, so the table can show what it predicts and what it measures.
        row["refused_after_measuring"] = True
        say("  the plan failed the planner's own measured check; planning again, verify=False")
        try:
            plan, _ = fedplan.plan(model, inputs, targets, verify=False, **common)
        except fedplan.BudgetInfeasibleError as again:
            row["retry_error"] = str(again)
            row["plan_seconds"] = time.perf_counter() - started
            return row
        row["unverified"] = True
    row["plan_seconds"] = time.perf_counter() - started
    row.update(plan=plan, step=plan.step_choice.describe(), counts=plan.counts(),
               predicted_bytes=plan.predicted_peak_bytes, budget_bytes=plan.budget_bytes,
               planner_keep_all_bytes=plan.keep_all_peak_bytes)
    return row


def planned_variant(model, plan, inputs):
    planned = fedplan.apply(copy.deepcopy(model), plan, inputs)
    return planned, planned_optimizer(plan, "sgd", planned.parameters())


def measure_planned(spec, model, row, inputs, targets, keep_all_bytes) -> None:
    planned, optimizer = planned_variant(model, row["plan"], inputs)
    step = fedplan.measure(planned, inputs, targets, loss_fn=spec.loss_fn,
                           optimizer_instance=optimizer, steps=1)
    row["measured_bytes"] = step.peak_bytes
    row["of_keep_all"] = step.peak_bytes / keep_all_bytes
    row["prediction_error"] = row["predicted_bytes"] / step.peak_bytes - 1
    row["within_budget"] = step.peak_bytes <= row["budget_bytes"]


def time_variants(spec, model, inputs, targets, plans: dict, repeats: int) -> dict:
    """Interleaved step times: {variant: {"cpu": [...], "wall": [...]}} plus overheads."""
    variants = {}
    keep_all = copy.deepcopy(model)
    keep_all_optimizer = make_optimizer("sgd", keep_all.parameters())
    variants["keep-all"] = (lambda m=keep_all, o=keep_all_optimizer:
                            train_step(m, inputs, targets, spec.loss_fn, o))
    for label, plan in plans.items():
        planned, optimizer = planned_variant(model, plan, inputs)
        variants[label] = (lambda m=planned, o=optimizer: m.train_step(
            inputs, targets, o, spec.loss_fn))
    labels = list(variants)
    times = {label: {"cpu": [], "wall": []} for label in labels}
    for round_index in range(repeats + 1):  # round 0 warms up (and creates optimizer state)
        shift = round_index % len(labels)
        for label in labels[shift:] + labels[:shift]:  # rotate who runs first
            cpu, wall = time.process_time(), time.perf_counter()
            variants[label]()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            if round_index:
                times[label]["cpu"].append(cpu)
                times[label]["wall"].append(wall)
    result = {}
    for label in labels:
        entry = {kind: quartiles(times[label][kind]) for kind in ("cpu", "wall")}
        if label != "keep-all":
            for kind in ("cpu", "wall"):
                ratios = [t / k - 1 for t, k in zip(times[label][kind],
                                                    times["keep-all"][kind])]
                entry[f"{kind}_overhead"] = quartiles(ratios)
        entry["raw"] = times[label]
        result[label] = entry
    return result


def run_model(model_arg: str, args, say) -> dict:
    spec, batch = load(model_arg)
    model = spec.build()
    inputs, targets = spec.batch(batch)
    out: dict = {"model": spec.name, "batch": batch}
    say(f"{spec.name} (batch {batch}): keep-all")
    keep = fedplan.measure(copy.deepcopy(model), inputs, targets, loss_fn=spec.loss_fn,
                           steps=1)
    out["keep_all_bytes"] = keep.peak_bytes
    rows = {}
    say(f"{spec.name}: budget=min, decisions=all")
    rows["min"] = make_plan(spec, model, inputs, targets, budget="min", decisions="all",
                            args=args, say=say)
    if "plan" in rows["min"] and not args.no_repeat:
        say(f"{spec.name}: budget=min again (is it repeatable?)")
        again = make_plan(spec, model, inputs, targets, budget="min", decisions="all",
                          args=args, say=say)
        first = rows["min"]["plan"]
        rows["min"]["repeat"] = {
            "plan_seconds": again["plan_seconds"],
            "budget_bytes": again.get("budget_bytes"),
            "predicted_bytes": again.get("predicted_bytes"),
            "step": again.get("step"),
            "same_budget": again.get("budget_bytes") == first.budget_bytes,
            "same_decisions": "plan" in again
            and again["plan"].decisions == first.decisions and again["plan"].step == first.step}
    if args.explicit_microbatch:
        say(f"{spec.name}: budget=min, decisions named one by one (micro-batches allowed)")
        rows["min-named"] = make_plan(spec, model, inputs, targets, budget="min",
                                      decisions=ALL_NAMED, args=args, say=say)
    half = int(0.5 * keep.peak_bytes)
    out["half_budget_bytes"] = half
    for label, decisions in (("half-default", "default"), ("half-recompute", "recompute")):
        say(f"{spec.name}: budget {half} B, decisions={decisions}")
        rows[label] = make_plan(spec, model, inputs, targets, budget=half,
                                decisions=decisions, args=args, say=say)
    plans = {}
    for label, row in rows.items():
        if "plan" in row:
            say(f"{spec.name}: measuring the {label} plan")
            measure_planned(spec, model, row, inputs, targets, keep.peak_bytes)
            plans[label] = row["plan"]
    say(f"{spec.name}: timing {1 + len(plans)} variants, {args.repeats} interleaved rounds")
    out["times"] = time_variants(spec, model, inputs, targets, plans, args.repeats)
    out["plans"] = {label: {key: value for key, value in row.items() if key != "plan"}
                    for label, row in rows.items()}
    return out


# ----------------------------------------------------------------------------- report


def pct(value: float) -> str:
    return f"{100 * value:+.1f} %"


def spread(entry: dict, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    return (fmt.format(entry["median"] * scale) + " (IQR " + fmt.format(entry["q1"] * scale)
            + " to " + fmt.format(entry["q3"] * scale) + ")")


def overhead(entry: dict) -> str:
    return (f"{pct(entry['median'])} (IQR {pct(entry['q1'])} to {pct(entry['q3'])})")


def report(result: dict) -> str:
    name, keep_all = result["model"], result["keep_all_bytes"]
    times = result["times"]
    lines = [f"### {name} (batch {result['batch']})", "",
             f"keep-all measured peak {keep_all / MIB:.2f} MiB ({keep_all:,} B); step CPU "
             f"{spread(times['keep-all']['cpu'], 1e3)} ms, wall "
             f"{spread(times['keep-all']['wall'], 1e3)} ms", "",
             "| plan | step decisions | activations | predicted peak | measured peak | "
             "of keep-all | prediction error | step CPU vs keep-all | step wall vs keep-all |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, row in result["plans"].items():
        budget = "min" if row["budget"] == "min" else f"{row['budget'] / MIB:.2f} MiB"
        title = f"{label} (budget {budget}, decisions={row['decisions']})"
        if label == "min-named":
            title = f"{label} (budget min, every decision named)"
        if "predicted_bytes" not in row and row.get("refused_after_measuring"):
            lines.append(f"| {title} | refused: its plan measured "
                         f"{row['smallest_bytes'] / MIB:.2f} MiB, over its budget; planned "
                         "again without that check: failed (below) | | | | | | | |")
            continue
        if "predicted_bytes" not in row and row.get("smallest_bytes") is None:
            lines.append(f"| {title} | infeasible: below the fixed costs (below) "
                         "| | | | | | | |")
            continue
        if "predicted_bytes" not in row:
            lines.append(f"| {title} | infeasible: smallest "
                         f"{row['smallest_bytes'] / MIB:.2f} MiB "
                         f"({row['smallest_bytes'] / keep_all:.2f} of keep-all) | | | "
                         "| | | | |")
            continue
        counts = ", ".join(f"{key} {value}" for key, value in sorted(row["counts"].items()))
        note = (" (refused by the planner's own check: it measured over the budget)"
                if row.get("unverified") else "")
        timing = times.get(label, {})
        lines.append(
            f"| {title}{note} | {row['step']} | {counts or 'all kept'} | "
            f"{row['predicted_bytes'] / MIB:.2f} MiB | {row['measured_bytes'] / MIB:.2f} MiB | "
            f"{row['of_keep_all']:.3f} | {pct(row['prediction_error'])} | "
            f"{overhead(timing['cpu_overhead']) if timing else ''} | "
            f"{overhead(timing['wall_overhead']) if timing else ''} |")
    for label, row in result["plans"].items():
        if "plan_seconds" in row:
            lines += ["", f"{label}: planned in {row['plan_seconds']:.0f} s"]
        repeat = row.get("repeat")
        if repeat:
            same = "the same" if repeat["same_budget"] else "different"
            decided = "the same" if repeat["same_decisions"] else "other"
            lines[-1] += (f"; planned again in {repeat['plan_seconds']:.0f} s: budget "
                          f"{repeat['budget_bytes']} B ({same}), {decided} decisions")
        if "error" in row:
            lines += ["", f"{label}: `{row['error']}`"]
        if "retry_error" in row:
            lines += ["", f"{label}, planned again with verify=False: `{row['retry_error']}`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(DEFAULT_MODELS))
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (>= 4)")
    parser.add_argument("--plan-repeats", type=int, default=1,
                        help="the cost model's timing repeats (fedplan.plan(repeats=))")
    parser.add_argument("--time-limit", type=float, default=20.0,
                        help="the ILP's time limit per solve, seconds")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: the 2-core box is shared; see STEP_DECISIONS.md)")
    parser.add_argument("--explicit-microbatch", action="store_true",
                        help="also plan budget=min with every decision named (micro-batches "
                             "allowed on models with BatchNorm)")
    parser.add_argument("--no-repeat", action="store_true",
                        help="plan budget=min once (by default twice, to check it repeats)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--from-json", help="print the tables of a saved --json run and exit")
    args = parser.parse_args(argv)
    if args.from_json:
        for result in json.loads(Path(args.from_json).read_text()):
            print((report(result) if "failed" not in result
                   else f"### {result['model']}\n\nfailed: `{result['failed']}`") + "\n")
        return 0
    if args.repeats < 4:
        parser.error("--repeats must be at least 4 to report an interquartile range")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr,
              flush=True)

    results = []
    for model_arg in args.models:
        try:
            result = run_model(model_arg, args, say)
        except Exception as exc:  # a benchmark records the failure and goes on
            say(f"{model_arg} failed: {type(exc).__name__}: {exc}")
            results.append({"model": model_arg, "failed": f"{type(exc).__name__}: {exc}"})
            continue
        results.append(result)
        print(report(result) + "\n", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
