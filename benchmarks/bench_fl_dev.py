"""How fedhybrid's round-deadline rule was chosen: variants on development seeds.

    python benchmarks/bench_fl_dev.py [--seeds 7,8,9] [--jobs 2] [--out /tmp/fl_dev]

The memory-wall federations of ``benchmarks/bench_fl.py`` (same model, data, tiers and
settings), on seeds that benchmark does not report, with the global model scored on the
pooled *training* data of all clients (4,000 samples) instead of the held-out test set:
the design choice is made without looking at the test accuracies the benchmark reports.
Per (setting, seed): ``random`` runs 30 rounds, then each fedhybrid variant runs until
its simulated clock reaches random's (at most 120 rounds). Prints, per variant, the
simulated time to random's best training-pool accuracy as a multiple of random's own
(``inf``: not reached within random's time) and the best accuracy reached by half of
random's time to its best.

Variants (all with fedhybrid's default utilities): the round deadline at the median
planned round time counting clients (``clients``, the earlier default) or counting the
samples the clients hold (``samples``), each fixed or relaxed by Oort's pacer
(window 8, step 0.05).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fl  # noqa: E402

PACER = {"pacer_window": 8, "pacer_step": 0.05}
VARIANTS = {
    "clients": {"deadline_quantile": 0.5, "deadline_weight": "clients"},
    "samples": {"deadline_quantile": 0.5, "deadline_weight": "samples"},
    "clients-pacer": {"deadline_quantile": 0.5, "deadline_weight": "clients", **PACER},
    "samples-pacer": {"deadline_quantile": 0.5, "deadline_weight": "samples", **PACER},
}


def run_task(setting: str, seed: int, rounds: int, max_rounds: int) -> dict:
    from fedplan.fl.server import Server, SimConfig, build_federation, torch_threads

    config = SimConfig(model=bench_fl.MODEL, dataset="mnist5k", num_clients=100,
                       rounds=rounds, clients_per_round=10, selector="random",
                       partition=bench_fl.SETTINGS[setting], alpha=0.5, seed=seed)
    fed = build_federation(config)
    pooled = dataclasses.replace(fed.dataset, test_x=fed.dataset.train_x,
                                 test_y=fed.dataset.train_y)
    fed = dataclasses.replace(fed, dataset=pooled)
    histories: dict[str, list[tuple[float, float]]] = {}
    budget = math.inf
    for label, options in [("random", {})] + list(VARIANTS.items()):
        selector = "random" if label == "random" else "fedhybrid"
        server = Server(dataclasses.replace(fed, config=dataclasses.replace(
            config, selector=selector, selector_options=dict(options))))
        server.run()
        if selector == "random":
            budget = server.clock
        else:
            with torch_threads(config.threads):
                while server.clock < budget and server.round < max_rounds:
                    server.config = dataclasses.replace(server.config,
                                                        rounds=server.round + 1)
                    server.run_round()
        histories[label] = [(m["simulated_seconds"], m["accuracy"]) for m in server.history]
        print(f"{setting} seed {seed} {label}: {server.round} rounds", file=sys.stderr,
              flush=True)
    return {"setting": setting, "seed": seed, "histories": histories}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=bench_fl.parse_seeds, default=[7, 8, 9])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--max-rounds", type=int, default=120)
    parser.add_argument("--out", default="/tmp/fl_dev")
    args = parser.parse_args(argv)
    tasks = [(s, seed) for seed in args.seeds for s in bench_fl.SETTINGS]
    with ProcessPoolExecutor(max_workers=max(1, min(args.jobs, len(tasks)))) as pool:
        futures = [pool.submit(run_task, s, seed, args.rounds, args.max_rounds)
                   for s, seed in tasks]
        results = [f.result() for f in futures]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "dev.json").write_text(json.dumps(results, indent=1))
    columns = [f"{r['setting']} {r['seed']}" for r in results]
    print("| variant | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for label in VARIANTS:
        cells = []
        for r in results:
            rand = r["histories"]["random"]
            best = max(a for _, a in rand)
            t_random = next(t for t, a in rand if a >= best)
            mine = r["histories"][label]
            t = next((t for t, a in mine if a >= best), math.inf)
            half = max((a for t_, a in mine if t_ <= t_random / 2), default=math.nan)
            cells.append(f"{t / t_random:.2f} ({half:.3f})")
        print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
