"""Results as files (JSON, CSV, markdown) and the goal ratios, all from one run's points."""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path
from typing import Any

from fedplan.planner.plan import write_atomic, write_json_atomic

MIB = 2**20
CSV_FIELDS = ("model", "planner", "budget", "budget_fraction", "budget_bytes", "status",
              "measured_peak_bytes", "predicted_peak_bytes", "step_seconds",
              "keep_all_step_seconds", "overhead", "max_grad_diff", "solve_seconds",
              "solver_status", "graph_nodes", "block", "error")


def write_text_atomic(path: Path, text: str) -> Path:
    return write_atomic(path, lambda stream: stream.write(text))


def to_csv(points: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for point in points:
        writer.writerow({k: point.get(k) for k in CSV_FIELDS})
    return buffer.getvalue()


def _curve(points: list[dict], model: str, planner: str | tuple[str, ...]
           ) -> list[tuple[float, float]]:
    """(measured peak, step time / keep-all step time) of one planner (or the union of
    several), sorted by peak."""
    names = (planner,) if isinstance(planner, str) else planner
    curve = sorted((p["measured_peak_bytes"], 1 + p["overhead"]) for p in points
                   if p["model"] == model and p["planner"] in names and p["status"] == "ok"
                   and p["overhead"] is not None)
    return curve


# fedplan's curves held against torch.compile's: its recompute-only ILP plans (the goal's
# figure, gradients exact), and every plan fedplan returns (with compression, and the
# keep-all plan it returns for a budget at or above the keep-all peak)
FEDPLAN_CURVES = {"ilp": ("ilp",), "fedplan_any": ("ilp", "ilp+compress", "none")}


def _versus_compile(points: list[dict], model: str, planners: tuple[str, ...]) -> dict:
    fed = _curve(points, model, planners)
    compile_points = [(p["budget"], p["measured_peak_bytes"], 1 + p["overhead"])
                      for p in points if p["model"] == model
                      and p["planner"] == "torch.compile" and p["status"] == "ok"
                      and p["overhead"] is not None]  # in the run's budget order
    ratios, budgets, unmatched = [], [], []
    for budget, peak, seconds in compile_points:
        ours = interpolate(fed, peak)
        if ours is None:
            unmatched.append(peak)
        else:
            ratios.append(ours / seconds)
            budgets.append(budget)
    entry: dict[str, Any] = {"ratios": ratios, "compile_budgets": budgets,
                             "compile_points": len(compile_points),
                             "compile_peaks_below_fedplan_range": len(unmatched)}
    if ratios:
        entry["geomean_ratio"] = math.exp(statistics.fmean(math.log(r) for r in ratios))
        entry["met"] = entry["geomean_ratio"] <= 0.9 and not unmatched
    return entry


def interpolate(curve: list[tuple[float, float]], peak: float) -> float | None:
    """The planner's time at ``peak`` along its curve: the best point at or below ``peak``
    if ``peak`` is beyond its range, linear between the neighbours inside it; None below
    its smallest peak (it cannot reach that memory)."""
    if not curve or peak < curve[0][0]:
        return None
    # a planner that reaches less memory can always be used at more: take the cheapest
    # point at or below the peak, and interpolate towards the next point above it
    below = [(p, t) for p, t in curve if p <= peak]
    best_below = min(t for _, t in below)
    above = [(p, t) for p, t in curve if p > peak]
    if not above:
        return best_below
    (p0, t0), (p1, t1) = below[-1], above[0]
    linear = t0 + (t1 - t0) * (peak - p0) / (p1 - p0) if p1 > p0 else t0
    return min(best_below, linear)


def goals(points: list[dict], gaps: list[dict]) -> dict[str, Any]:
    """The issue's goals, each as measured in this run."""
    models = list(dict.fromkeys(p["model"] for p in points))
    result: dict[str, Any] = {"equal_peak_vs_compile": {}, "smallest_peak": {},
                              "prediction_error": {}, "ilp_gap": {}}
    wins = 0
    compared = 0
    for model in models:
        entry = _versus_compile(points, model, FEDPLAN_CURVES["ilp"])
        if "met" in entry:
            compared += 1
            wins += bool(entry["met"])
        result["equal_peak_vs_compile"][model] = entry
        result.setdefault("equal_peak_vs_compile_any_plan", {})[model] = _versus_compile(
            points, model, FEDPLAN_CURVES["fedplan_any"])
        smallest = {}
        for point in points:
            if point["model"] == model and point["status"] == "ok":
                current = smallest.get(point["planner"])
                if current is None or point["measured_peak_bytes"] < current:
                    smallest[point["planner"]] = point["measured_peak_bytes"]
        result["smallest_peak"][model] = smallest
        recompute_only = [v for k, v in smallest.items()
                          if k in ("all", "sqrt", "sac", "torch.compile")]
        fed_min = min((v for k, v in smallest.items() if k in ("ilp", "greedy")), default=None)
        result.setdefault("fedplan_below_every_recompute_peer", {})[model] = (
            fed_min is not None and bool(recompute_only) and fed_min < min(recompute_only))
        result.setdefault("smallest_peak_ratio", {})[model] = (
            fed_min / min(recompute_only) if fed_min is not None and recompute_only
            else None)
        fed_any = min((v for k, v in smallest.items() if k in ("ilp", "greedy",
                                                                "ilp+compress")), default=None)
        result.setdefault("smallest_peak_ratio_with_compress", {})[model] = (
            fed_any / min(recompute_only) if fed_any is not None and recompute_only
            else None)
        errors = [(p["predicted_peak_bytes"] - p["measured_peak_bytes"])
                  / p["measured_peak_bytes"] for p in points
                  if p["model"] == model and p["status"] == "ok"
                  and p["predicted_peak_bytes"] and p["measured_peak_bytes"]]
        if errors:
            worst = max(errors, key=abs)
            result["prediction_error"][model] = {"worst": worst, "points": len(errors),
                                                 "met": abs(worst) <= 0.05}
    result["equal_peak_vs_compile_models_met"] = wins
    result["equal_peak_vs_compile_models_compared"] = compared
    known = [g for g in gaps if g.get("gap") is not None]
    result["ilp_gap"] = {"graphs": len(gaps), "known": len(known),
                         "worst": max((g["gap"] for g in known), default=None),
                         "met": all(g["gap"] < 0.01 for g in known) if known else None}
    return result


def _mib(value) -> str:
    return "-" if value is None else f"{value / MIB:.2f}"


def markdown(points: list[dict], gaps: list[dict], solver_runs: list[dict],
             goal: dict[str, Any]) -> str:
    lines = ["| model | planner | budget | measured MiB | predicted MiB | pred. error | "
             "step ms | keep-all ms | overhead | max grad diff | solve s | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        if p["status"] != "ok":
            lines.append(f"| {p['model']} | {p['planner']} | {p['budget']} | - | - | - | - "
                         f"| - | - | - | - | failed: {(p['error'] or '')[:110]} |")
            continue
        measured, predicted = p["measured_peak_bytes"], p["predicted_peak_bytes"]
        error = "-" if not predicted else f"{(predicted - measured) / measured:+.2%}"
        solve = "-" if p["solve_seconds"] is None else f"{p['solve_seconds']:.2f}"
        lines.append(
            f"| {p['model']} | {p['planner']} | {p['budget']} | "
            f"{_mib(p['measured_peak_bytes'])} | {_mib(p['predicted_peak_bytes'])} | {error} | "
            f"{p['step_seconds'] * 1e3:.1f} | {p['keep_all_step_seconds'] * 1e3:.1f} | "
            f"{p['overhead']:+.1%} | {p['max_grad_diff']:.2g} | {solve} | "
            f"{p['solver_status'] or ''} |")
    def ratio(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines += ["", "| model | smallest measured peak MiB per planner | fedplan ilp/greedy "
              "÷ best recompute-only peer | with ilp+compress |", "|---|---|---|---|"]
    for model, smallest in goal["smallest_peak"].items():
        parts = ", ".join(f"{k} {_mib(v)}" for k, v in sorted(
            ((k, v) for k, v in smallest.items() if isinstance(v, int)), key=lambda kv: kv[1]))
        lines.append(f"| {model} | {parts} | "
                     f"{ratio(goal.get('smallest_peak_ratio', {}).get(model))} | "
                     f"{ratio(goal.get('smallest_peak_ratio_with_compress', {}).get(model))} |")
    lines += ["", "| model | fedplan ilp / torch.compile step time at equal measured peak "
              "(per compile budget, in the run's order) | geomean | "
              "compile points below ilp's range | "
              "any fedplan plan (ilp, ilp+compress, keep-all) / torch.compile | geomean | "
              "below its range |",
              "|---|---|---|---|---|---|---|"]
    for model, entry in goal["equal_peak_vs_compile"].items():
        ratios = ", ".join(f"{r:.3f}" for r in entry["ratios"]) or "-"
        mean = f"{entry['geomean_ratio']:.3f}" if "geomean_ratio" in entry else "-"
        other = goal.get("equal_peak_vs_compile_any_plan", {}).get(model, {})
        other_ratios = ", ".join(f"{r:.3f}" for r in other.get("ratios", [])) or "-"
        other_mean = f"{other['geomean_ratio']:.3f}" if "geomean_ratio" in other else "-"
        lines.append(f"| {model} | {ratios} | {mean} | "
                     f"{entry['compile_peaks_below_fedplan_range']} | {other_ratios} | "
                     f"{other_mean} | {other.get('compile_peaks_below_fedplan_range', '-')} |")
    if goal.get("prediction_error"):
        lines += ["", "| model | worst (predicted - measured) / measured | points | "
                  "within 5% |", "|---|---|---|---|"]
        for model, entry in goal["prediction_error"].items():
            lines.append(f"| {model} | {entry['worst']:+.2%} | {entry['points']} | "
                         f"{'yes' if entry['met'] else 'no'} |")
    if gaps:
        lines += ["", "| graph | nodes | budget | ilp status | ilp recompute | exact status | "
                  "exact recompute | gap | exact evaluations | exact s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for g in gaps:
            gap = "-" if g["gap"] is None else f"{g['gap']:.2%}"
            lines.append(f"| {g['graph']} | {g['nodes']} | {g['budget_fraction']:g} | "
                         f"{g['ilp_status']} | {g['ilp_recompute']} | {g['exact_status']} | "
                         f"{g['exact_recompute']} | {gap} | {g['exact_evaluations']} | "
                         f"{g['exact_seconds']:.1f} |")
    if solver_runs:
        lines += ["", "| graph | nodes | solver | budget | status | objective | bound | "
                  "solve s |", "|---|---|---|---|---|---|---|---|"]
        for r in solver_runs:
            objective = "-" if r["objective"] is None else f"{r['objective']:g}"
            bound = "-" if r["bound"] is None else f"{r['bound']:g}"
            lines.append(f"| {r['graph']} | {r['nodes']} | {r['solver']} | "
                         f"{r['budget_fraction']:g} | {r['status']} | {objective} | {bound} | "
                         f"{r['solve_seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, payload: dict[str, Any]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [write_json_atomic(out / "results.json", payload),
               write_text_atomic(out / "results.csv", to_csv(payload["points"])),
               write_text_atomic(out / "summary.md", markdown(
                   payload["points"], payload["gaps"], payload["solver_runs"],
                   payload["goals"]))]
    return written
