"""The memory-wall experiment: four selectors, memory independent of or correlated with data.

    python benchmarks/bench_fl.py [--rounds 30] [--jobs 2] [--out /tmp/fl_bench]

100 clients, 10 per round, mnist5k, Dirichlet alpha 0.5, budgets from the packaged device
tiers scaled so the 6GB tier gets 1.1x the keep-all peak (54 of 100 clients below
keep-all), ``examples/mnist_mbconv.py``, two local epochs, batch 16, SGD lr 0.05.
Setting ``independent``: Dirichlet label skew over all clients. Setting ``correlated``:
clients below the keep-all peak hold 95 % of classes 0-4, the others 95 % of classes 5-9.
One process per setting (``--jobs`` at most 2) builds the federation once (tracing,
measuring, one plan per budget bucket: nothing in it depends on the selector) and runs
the four selectors on it in turn, each from the same initial weights and seed. Writes
every run's result JSON, per-round CSV and plot under ``--out``, and prints a markdown
table: final and best accuracy, simulated time, the simulated time at which each
selector first reaches the best accuracy ``random`` attains (and its ratio to random's
own), participations, skipped clients, budget violations, wall and CPU seconds.
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
MODEL = str(ROOT / "examples" / "mnist_mbconv.py")
SELECTORS = ("fedhybrid", "exclude", "random", "oort")
SETTINGS = {"correlated": "correlated", "independent": "dirichlet"}  # (b) first


def run_setting(setting: str, rounds: int, out: str, seed: int) -> list[dict]:
    import dataclasses

    from fedplan.fl.report import write_outputs
    from fedplan.fl.server import Server, SimConfig, build_federation

    config = SimConfig(model=MODEL, dataset="mnist5k", num_clients=100, rounds=rounds,
                       clients_per_round=10, selector="random",
                       partition=SETTINGS[setting], alpha=0.5, seed=seed)
    wall, cpu = time.perf_counter(), time.process_time()
    federation = build_federation(config)
    setup = {"setup_wall_seconds": time.perf_counter() - wall,
             "setup_cpu_seconds": time.process_time() - cpu}
    results = []
    for selector in SELECTORS:
        wall, cpu = time.perf_counter(), time.process_time()
        fed = dataclasses.replace(
            federation, config=dataclasses.replace(config, selector=selector))
        folder = Path(out) / f"{setting}-{selector}"
        result = Server(fed, out_dir=folder).run()
        result["wall_seconds"] = time.perf_counter() - wall
        result["cpu_seconds"] = time.process_time() - cpu
        write_outputs(result, folder)
        results.append({"setting": setting, **setup, **result})
        print(f"{setting} {selector}: final {result['final_accuracy']:.3f} "
              f"wall {result['wall_seconds']:.0f} s", file=sys.stderr, flush=True)
    return results


def time_to(history: list[dict], accuracy: float) -> float:
    for m in history:
        if m["accuracy"] >= accuracy:
            return m["simulated_seconds"]
    return math.inf


def code_version() -> str:
    """The commit the run used, marked dirty if the planner's source differs from it."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "planner", "runtime",
                                "kernels", "fedplan", "fl", "examples"], cwd=ROOT, text=True,
                               capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (dirty)" if dirty else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/fl_bench")
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    version = code_version()
    with ProcessPoolExecutor(max_workers=max(1, min(args.jobs, len(SETTINGS)))) as pool:
        futures = [pool.submit(run_setting, s, args.rounds, args.out, args.seed)
                   for s in SETTINGS]
        results = [r for f in futures for r in f.result()]
    wall = time.perf_counter() - start
    print("| setting | selector | final acc | best acc | simulated s | s to random's best "
          "(x random's) | participations (below keep-all) | skipped: no plan | "
          "budget violations | wall s | CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for setting in SETTINGS:
        rows = [r for r in results if r["setting"] == setting]
        rand = next(r for r in rows if r["selector"] == "random")
        target = rand["best_accuracy"]
        t_random = time_to(rand["history"], target)
        for r in rows:
            t = time_to(r["history"], target)
            ratio = f"{t / t_random:.2f}" if math.isfinite(t) else "not reached"
            print(f"| {setting} | {r['selector']} | {r['final_accuracy']:.3f} | "
                  f"{r['best_accuracy']:.3f} | {r['simulated_seconds']:.1f} | "
                  f"{t:.1f} ({ratio}) | {r['participations']} "
                  f"({r['participations_below_keep_all']}) | "
                  f"{r['skipped_no_plan']} | {r['budget_violations']} | "
                  f"{r['wall_seconds']:.0f} | {r['cpu_seconds']:.0f} |")
    fed = results[0]["federation"]
    setups = {r["setting"]: round(r["setup_wall_seconds"]) for r in results}
    setup_cpu = {r["setting"]: r["setup_cpu_seconds"] for r in results}
    print(f"\nkeep-all peak {fed['keep_all_peak_bytes']} B; clients below keep-all "
          f"{fed['clients_below_keep_all']}; without any plan {fed['clients_without_plan']}; "
          f"tiers {fed['tiers']}; plan cache {fed['plan_cache']}; set-up wall s {setups}; "
          f"total wall {wall:.0f} s with {args.jobs} jobs; total CPU s "
          f"{sum(r['cpu_seconds'] for r in results) + sum(setup_cpu.values()):.0f}; "
          f"code {version}")
    summary = [{k: v for k, v in r.items() if k not in ("history", "events")}
               for r in results]
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
