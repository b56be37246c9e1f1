"""The memory-wall experiment: four selectors, memory independent of or correlated with data.

    python benchmarks/bench_fl.py [--rounds 20] [--jobs 2] [--out /tmp/fl_bench]

100 clients, 10 per round, mnist5k, Dirichlet alpha 0.5, budgets from the packaged device
tiers scaled so the 6GB tier gets 1.1x the keep-all peak (54 of 100 clients below
keep-all), ``fl/models/mnist_mbconv.py``, two local epochs, batch 16, SGD lr 0.05.
Setting ``independent``: Dirichlet label skew over all clients. Setting ``correlated``:
clients below the keep-all peak hold 95 % of classes 0-4, the others 95 % of classes 5-9.
Runs the eight (setting, selector) pairs in ``--jobs`` processes, writes every run's
result JSON, per-round CSV and plot under ``--out``, and prints a markdown table:
final and best accuracy, simulated time, the simulated time at which each selector first
reaches the best accuracy ``random`` attains, and the budget violations.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "fl" / "models" / "mnist_mbconv.py")
SELECTORS = ("fedhybrid", "exclude", "random", "oort")
SETTINGS = {"correlated": "correlated", "independent": "dirichlet"}  # (b) first


def run_one(setting: str, selector: str, rounds: int, out: str, seed: int) -> dict:
    from fedplan.fl.report import write_outputs
    from fedplan.fl.server import SimConfig, run_simulation

    config = SimConfig(model=MODEL, dataset="mnist5k", num_clients=100, rounds=rounds,
                       clients_per_round=10, selector=selector,
                       partition=SETTINGS[setting], alpha=0.5, seed=seed)
    folder = Path(out) / f"{setting}-{selector}"
    result = run_simulation(config, out_dir=folder)
    write_outputs(result, folder)
    return {"setting": setting, "selector": selector, **result}


def time_to(history: list[dict], accuracy: float) -> float:
    for m in history:
        if m["accuracy"] >= accuracy:
            return m["simulated_seconds"]
    return math.inf


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/fl_bench")
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    jobs = [(s, sel) for s in SETTINGS for sel in SELECTORS]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, s, sel, args.rounds, args.out, args.seed)
                   for s, sel in jobs]
        results = [f.result() for f in futures]
    wall = time.perf_counter() - start
    print("| setting | selector | final acc | best acc | simulated s | s to random's best "
          "| participations (below keep-all) | skipped: no plan | budget violations | "
          "wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for setting in SETTINGS:
        rows = [r for r in results if r["setting"] == setting]
        target = next(r for r in rows if r["selector"] == "random")["best_accuracy"]
        for r in rows:
            t = time_to(r["history"], target)
            print(f"| {setting} | {r['selector']} | {r['final_accuracy']:.3f} | "
                  f"{r['best_accuracy']:.3f} | {r['simulated_seconds']:.1f} | "
                  f"{t:.1f} | {r['participations']} ({r['participations_below_keep_all']}) | "
                  f"{r['skipped_no_plan']} | {r['budget_violations']} | "
                  f"{r['wall_seconds']:.0f} |")
    fed = results[0]["federation"]
    print(f"\nkeep-all peak {fed['keep_all_peak_bytes']} B; clients below keep-all "
          f"{fed['clients_below_keep_all']}; without any plan {fed['clients_without_plan']}; "
          f"tiers {fed['tiers']}; total wall {wall:.0f} s with {args.jobs} jobs")
    summary = [{k: v for k, v in r.items() if k not in ("history", "events")}
               for r in results]
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
