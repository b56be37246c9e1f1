"""The memory-wall experiment: four selectors, memory independent of or correlated with data.

    python benchmarks/bench_fl.py [--rounds 30] [--jobs 2] [--seeds 0,1] [--out /tmp/fl_bench]
                                  [--max-rounds 120] [--fixed-rounds] [--with-pacer]
    python benchmarks/bench_fl.py --strategies [...]   # every strategy on Fashion-MNIST and
                                                       # Shakespeare: bench_fl_strategies.py

100 clients, 10 per round, mnist5k, Dirichlet alpha 0.5, budgets from the packaged device
tiers scaled so the 6GB tier gets 1.1x the keep-all peak (54 of 100 clients below
keep-all), ``examples/mnist_mbconv.py``, two local epochs, batch 16, SGD lr 0.05.
Setting ``independent``: Dirichlet label skew over all clients. Setting ``correlated``:
clients below the keep-all peak hold 95 % of classes 0-4, the others 95 % of classes 5-9.
``fedhybrid`` runs with its round deadline at the planned round time by which the
clients holding half the feasible clients' samples are done (the sample-weighted median,
``SELECTOR_OPTIONS``; chosen on development seeds, ``benchmarks/bench_fl_dev.py``); the
other selectors with their defaults. ``--with-pacer`` adds a fifth run,
``fedhybrid-pacer``: the same selector with the deadline relaxed by Oort's pacer (window
8 rounds, step 0.05 of the quantile), on the same federation. It is not the default: on
the development seeds it was sooner than the fixed deadline in (a) and later in (b)
(BENCHMARKS.md).
One process per (setting, seed) (``--jobs`` at most 2) builds the federation once
(tracing, measuring, one plan per budget bucket: nothing in it depends on the selector)
and runs the four selectors on it, each from the same initial weights and seed.

Equal simulated time: ``random`` runs ``--rounds`` rounds first; every other selector runs
at least ``--rounds`` rounds and then on until its simulated clock reaches random's
(at most ``--max-rounds``). The goal is stated in simulated time (reach random's best
accuracy in half of random's time); with a fixed round count a selector whose rounds are
short stops long before random's time has passed and cannot be measured against it.
``--fixed-rounds`` runs every selector exactly ``--rounds`` rounds instead.

Writes every run's result JSON, per-round CSV and plot under ``--out`` (one folder per
setting and selector, prefixed ``seedN-`` when more than one seed runs), and prints a
markdown table per seed: accuracy after ``--rounds`` rounds and at the end, best
accuracy, rounds and simulated time, the simulated time at which each selector first
reaches the best accuracy ``random`` attains in that seed (and its ratio to random's own),
participations, skipped clients, stragglers, budget violations, wall and CPU seconds;
then each selector's ratio per seed and its mean.
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
PACED = "fedhybrid-pacer"
"""The label of the optional run of fedhybrid whose deadline Oort's pacer relaxes."""
SETTINGS = {"correlated": "correlated", "independent": "dirichlet"}  # (b) first
SELECTOR_OPTIONS = {
    "fedhybrid": {"deadline_quantile": 0.5, "deadline_weight": "samples"},
    PACED: {"deadline_quantile": 0.5, "deadline_weight": "samples", "pacer_window": 8,
            "pacer_step": 0.05},
}
"""Per-run options (:mod:`fedplan.fl.selectors`): fedhybrid's round deadline is the
sample-weighted median planned round time (the quantile of its pacer, 0.5, counting
samples, not clients: chosen against the client-count median on development seeds 7-9
judged on training-pool accuracy, ``benchmarks/bench_fl_dev.py``). ``fedhybrid-pacer``
starts there and Oort's pacer relaxes it by Oort's step (5 percentile points) with
Oort's window of 20 rounds scaled by the exploration schedule's time constant,
``20 x (1 - 0.98) / (1 - 0.95) = 8`` (Oort's exploration decay 0.98, ours 0.95). All
chosen before any run, not on the accuracies below."""


def run_setting(setting: str, rounds: int, out: str, seed: int, prefix: str = "",
                max_rounds: int | None = None, with_pacer: bool = False) -> list[dict]:
    """The four selectors on one federation (five runs with ``with_pacer``); with
    ``max_rounds``, each but ``random`` runs on past ``rounds`` until its clock reaches
    random's (at most ``max_rounds`` rounds)."""
    import dataclasses

    from fedplan.fl.report import write_outputs
    from fedplan.fl.server import Server, SimConfig, build_federation, torch_threads

    config = SimConfig(model=MODEL, dataset="mnist5k", num_clients=100, rounds=rounds,
                       clients_per_round=10, selector="random",
                       partition=SETTINGS[setting], alpha=0.5, seed=seed)
    wall, cpu = time.perf_counter(), time.process_time()
    federation = build_federation(config)
    setup = {"setup_wall_seconds": time.perf_counter() - wall,
             "setup_cpu_seconds": time.process_time() - cpu}
    results = []
    budget = math.inf  # random's simulated seconds, once it has run
    labels = SELECTORS + ((PACED,) if with_pacer else ())
    for label in sorted(labels, key=lambda name: name != "random"):  # random first
        selector = "fedhybrid" if label == PACED else label
        wall, cpu = time.perf_counter(), time.process_time()
        fed = dataclasses.replace(federation, config=dataclasses.replace(
            config, selector=selector,
            selector_options=dict(SELECTOR_OPTIONS.get(label, {}))))
        folder = Path(out) / f"{prefix}{setting}-{label}"
        server = Server(fed, out_dir=folder)
        server.run()
        if max_rounds is not None and selector != "random":
            with torch_threads(config.threads):
                while server.clock < budget and server.round < max_rounds:
                    server.config = dataclasses.replace(server.config,
                                                        rounds=server.round + 1)
                    server.run_round()
        result = server.result()
        result["selector"] = label
        if selector == "fedhybrid":
            pacer = server.selector
            k = config.clients_per_round
            deadline = pacer.round_deadline(fed.candidates, k)
            result["pacer"] = {
                "relaxations": pacer.relaxations,
                "deadline_quantile": pacer.current_deadline_quantile(),
                "deadline_seconds": deadline,
                "samples_within": sum(c.num_samples for c in fed.candidates
                                      if c.feasible and c.round_seconds <= deadline)}
        if selector == "random":
            budget = result["simulated_seconds"]
        result["accuracy_at_min_rounds"] = result["history"][rounds - 1]["accuracy"]
        result["wall_seconds"] = time.perf_counter() - wall
        result["cpu_seconds"] = time.process_time() - cpu
        write_outputs(result, folder)
        results.append({"setting": setting, "seed": seed, **setup, **result})
        print(f"seed {seed} {setting} {label}: final {result['final_accuracy']:.3f} "
              f"wall {result['wall_seconds']:.0f} s", file=sys.stderr, flush=True)
    order = {name: j for j, name in enumerate(SELECTORS + (PACED,))}
    return sorted(results, key=lambda r: order[r["selector"]])


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


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers; got {text!r}") from exc
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds; got {text!r}")
    return seeds


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--strategies" in argv:  # every round policy on Fashion-MNIST and Shakespeare
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_fl_strategies
        return bench_fl_strategies.main([a for a in argv if a != "--strategies"])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=None,
                        help="one seed (default 0); same as --seeds N")
    parser.add_argument("--seeds", type=parse_seeds, default=None,
                        help="comma-separated seeds, e.g. 0,1: the whole experiment once per "
                             "seed (seed of partitions, tiers, weights and selection)")
    parser.add_argument("--out", default="/tmp/fl_bench")
    parser.add_argument("--max-rounds", type=int, default=120,
                        help="at most this many rounds for a selector still short of "
                             "random's simulated time after --rounds (default 120)")
    parser.add_argument("--with-pacer", action="store_true",
                        help="also run fedhybrid with its deadline relaxed by Oort's pacer "
                             "(window 8 rounds, step 0.05), as 'fedhybrid-pacer'")
    parser.add_argument("--fixed-rounds", action="store_true",
                        help="every selector runs exactly --rounds rounds (no equal "
                             "simulated time)")
    args = parser.parse_args(argv)
    if args.seed is not None and args.seeds is not None:
        parser.error("give --seed or --seeds, not both")
    seeds = args.seeds or [args.seed if args.seed is not None else 0]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    version = code_version()
    tasks = [(s, seed) for seed in seeds for s in SETTINGS]
    with ProcessPoolExecutor(max_workers=max(1, min(args.jobs, len(tasks)))) as pool:
        futures = [pool.submit(run_setting, s, args.rounds, args.out, seed,
                               f"seed{seed}-" if len(seeds) > 1 else "",
                               None if args.fixed_rounds else args.max_rounds,
                               args.with_pacer)
                   for s, seed in tasks]
        results = [r for f in futures for r in f.result()]
    wall = time.perf_counter() - start
    ratios: dict[tuple[str, str], list[float]] = {}
    for seed in seeds:
        print(f"\nseed {seed}\n")
        print(f"| setting | selector | acc after {args.rounds} rounds | final acc | best acc | "
              "rounds | simulated s | s to random's best (x random's) | participations "
              "(below keep-all) | skipped: no plan | stragglers | budget violations | "
              "wall s | CPU s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for setting in SETTINGS:
            rows = [r for r in results if r["setting"] == setting and r["seed"] == seed]
            rand = next(r for r in rows if r["selector"] == "random")
            target = rand["best_accuracy"]
            t_random = time_to(rand["history"], target)
            for r in rows:
                t = time_to(r["history"], target)
                ratios.setdefault((setting, r["selector"]), []).append(t / t_random)
                reached = f"{t:.1f} ({t / t_random:.2f})" if math.isfinite(t) else \
                    "not reached"
                print(f"| {setting} | {r['selector']} | {r['accuracy_at_min_rounds']:.3f} | "
                      f"{r['final_accuracy']:.3f} | {r['best_accuracy']:.3f} | "
                      f"{r['rounds']} | {r['simulated_seconds']:.1f} | "
                      f"{reached} | {r['participations']} "
                      f"({r['participations_below_keep_all']}) | "
                      f"{r['skipped_no_plan']} | {r['stragglers']} | "
                      f"{r['budget_violations']} | "
                      f"{r['wall_seconds']:.0f} | {r['cpu_seconds']:.0f} |")
    print("\n| setting | selector | " + " | ".join(f"x random's, seed {s}" for s in seeds)
          + " | mean |")
    print("|---|---|" + "---|" * (len(seeds) + 1))
    for (setting, selector), values in ratios.items():
        cells = [f"{v:.2f}" if math.isfinite(v) else "not reached" for v in values]
        mean = sum(values) / len(values)
        shown = f"{mean:.2f}" if math.isfinite(mean) else "not reached"
        print(f"| {setting} | {selector} | " + " | ".join(cells) + f" | {shown} |")
    for seed in seeds:
        mine = [r for r in results if r["seed"] == seed]
        fed = mine[0]["federation"]
        setups = {r["setting"]: round(r["setup_wall_seconds"]) for r in mine}
        for r in mine:
            if "pacer" in r:
                p = r["pacer"]
                print(f"\nseed {seed} {r['setting']} {r['selector']}: deadline relaxed "
                      f"{p['relaxations']} times, to quantile {p['deadline_quantile']:.2f} "
                      f"= {p['deadline_seconds']:.4f} s, {p['samples_within']} samples "
                      f"within it")
        peaks = [m["max_peak_over_budget"] for r in mine for m in r["history"]
                 if math.isfinite(m["max_peak_over_budget"])]
        print(f"\nseed {seed}: keep-all peak {fed['keep_all_peak_bytes']} B; clients below "
              f"keep-all {fed['clients_below_keep_all']}; without any plan "
              f"{fed['clients_without_plan']}; tiers {fed['tiers']}; plan cache "
              f"{fed['plan_cache']}; set-up wall s {setups}; largest measured peak / budget "
              f"{max(peaks, default=math.nan):.3f}")
    setup_cpu = {(r["setting"], r["seed"]): r["setup_cpu_seconds"] for r in results}
    print(f"\ntotal wall {wall:.0f} s with {args.jobs} jobs; total CPU s "
          f"{sum(r['cpu_seconds'] for r in results) + sum(setup_cpu.values()):.0f}; "
          f"code {version}")
    summary = [{k: v for k, v in r.items() if k not in ("history", "events")}
               for r in results]
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
