"""Every round policy on both workloads beyond MNIST, at equal simulated time.

    python benchmarks/bench_fl_strategies.py [--seeds 0,1,2] [--jobs 2] [--rounds 15]
                                             [--out /tmp/fl_strategies]
    python benchmarks/bench_fl_strategies.py --dev [--seeds 7] ...   # choose the lr

(also ``python benchmarks/bench_fl.py --strategies ...``, which hands its arguments here).

Workloads: ``fashion-mnist`` (the packaged MobileNet-style CNN, batch 32) and
``shakespeare`` (the packaged transformer decoder, batch 16, one client per speaking
role); 40 clients, 8 per round, Dirichlet alpha 0.5 for Fashion-MNIST, at most
``MAX_SAMPLES`` samples per client, one local epoch, budgets from the packaged device tiers
(the 6GB tier at 1.1x the full model's keep-all peak: the 2GB, 3GB and 4GB tiers, 54 % of
devices, below it), plan solves limited to 5 s. Strategies: ``exclude`` (only clients that
hold the whole model keep-all), ``random``, ``fedhybrid`` (its default selection, no
deadline), ``profl``, ``neulite``, ``heterofl``, ``smartsplit`` (their defaults:
fedplan/fl/strategies/). Every strategy of a (workload, seed) runs on the same federation
from the same initial weights.

Equal simulated time: ``random`` runs ``--rounds`` rounds; every other strategy runs until
its simulated clock reaches random's (at least one round, at most ``--max-rounds``). The
block-wise strategies pace their stages by ``--rounds`` (rounds / blocks per stage).

Scored on a fixed seeded sample of ``TEST_SAMPLES`` windows/images of the test set after
every round (evaluation on all 10,000 Fashion-MNIST images costs more than a round).
``--dev`` instead runs ``random`` with each learning rate of ``LR_GRID`` on development
seeds (default 7) and scores the pooled *training* data of the clients (a sample of
``TEST_SAMPLES``), printing the best: that is how ``LR`` below was chosen; the test set is
not looked at.

Prints one markdown table per workload (mean and per-seed values): final and best
accuracy, simulated time to ``random``'s best accuracy as a multiple of random's time to it,
the share of clients that ever trained, bytes sent, the largest measured peak over budget,
budget violations; and the per-tier largest measured peak of ``profl`` and ``neulite``
clients. Writes ``results.json`` and one accuracy-against-simulated-time plot per
workload under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

WORKLOADS = ("fashion-mnist", "shakespeare")
STRATEGIES = ("exclude", "random", "fedhybrid", "profl", "neulite", "heterofl",
              "smartsplit")
MAX_SAMPLES = {"fashion-mnist": 200, "shakespeare": 64}
TEST_SAMPLES = 2000
LR_GRID = (0.05, 0.1, 0.2)
LR = {"fashion-mnist": 0.2, "shakespeare": 0.2}
"""Chosen with ``--dev --seeds 7 --rounds 15`` (training-pool accuracy of random after 15
rounds: Fashion-MNIST 0.495 / 0.537 / 0.555 at lr 0.05 / 0.1 / 0.2, Shakespeare
0.215 / 0.235 / 0.241): 0.2 for both, the edge of the grid (BENCHMARKS.md)."""


def config_for(workload: str, seed: int, rounds: int, lr: float, strategy: str = ""):
    from fedplan.fl.server import SimConfig
    selector = strategy if strategy in ("exclude", "random", "fedhybrid") else "random"
    return SimConfig(dataset=workload, num_clients=40, rounds=rounds, clients_per_round=8,
                     selector=selector,
                     strategy="" if strategy in ("exclude", "random", "fedhybrid")
                     else strategy, epochs=1, lr=lr, seed=seed,
                     max_client_samples=MAX_SAMPLES[workload], plan_time_limit=5.0)


def _scored(fed, seed: int, train: bool):
    """The federation scored on a fixed sample: of the test set, or (dev) of the pooled
    training data of the clients."""
    import torch
    gen = torch.Generator().manual_seed(1000 + seed)
    if train:
        pool = torch.cat(fed.partitions)
        pick = pool[torch.randperm(len(pool), generator=gen)[:TEST_SAMPLES]]
        x, y = fed.dataset.train_x[pick], fed.dataset.train_y[pick]
    else:
        pick = torch.randperm(len(fed.dataset.test_y), generator=gen)[:TEST_SAMPLES]
        x, y = fed.dataset.test_x[pick], fed.dataset.test_y[pick]
    return dataclasses.replace(fed, dataset=dataclasses.replace(fed.dataset, test_x=x,
                                                                test_y=y))


def run_to_time(fed, strategy: str, rounds: int, until: float | None, max_rounds: int):
    from fedplan.fl.server import Server
    server = Server(dataclasses.replace(fed, config=dataclasses.replace(
        fed.config, **{k: v for k, v in dataclasses.asdict(config_for(
            fed.config.dataset, fed.config.seed, rounds, fed.config.lr, strategy)).items()
            if k in ("selector", "strategy")})))
    cpu = time.process_time()
    while True:
        server.run_round()
        if until is None:
            if server.round >= rounds:
                break
        elif server.clock >= until or server.round >= max_rounds:
            break
        if server.history[-1]["participants"] == 0 and server.round >= 3 and all(
                m["participants"] == 0 for m in server.history[-3:]):
            break  # nobody can train: no time passes
    result = server.result()
    result["cpu_seconds"] = time.process_time() - cpu
    tiers = {cid: d.tier for cid, d in enumerate(fed.devices)}
    per_tier: dict[str, int] = {}
    for m in result["history"]:
        for cid, peak, _budget in m["peaks"]:
            per_tier[tiers[cid]] = max(per_tier.get(tiers[cid], 0), peak)
    budgets = {d.tier: d.budget_bytes for d in fed.devices}
    result["tier_peaks"] = {t: {"peak": per_tier.get(t), "budget": budgets[t]}
                            for t in sorted(budgets)}
    return result


def run_workload(workload: str, seeds: list[int], rounds: int, max_rounds: int,
                 dev: bool) -> dict:
    import torch

    from fedplan.fl.server import build_federation
    torch.set_num_threads(1)
    out: dict = {}
    cache = None
    grid = LR_GRID if dev else (LR[workload],)
    for lr in grid:  # one plan cache for every lr: SGD's lr changes no tensor's size
        for seed in seeds:
            fed = build_federation(config_for(workload, seed, rounds, lr), cache=cache)
            cache = fed.cache
            fed = _scored(fed, seed, train=dev)
            key = f"lr{lr:g}-seed{seed}" if dev else f"seed{seed}"
            runs = {}
            names = ("random",) if dev else STRATEGIES
            base = run_to_time(fed, "random", rounds, None, max_rounds)
            runs["random"] = base
            for name in names:
                if name == "random":
                    continue
                runs[name] = run_to_time(fed, name, rounds, base["simulated_seconds"],
                                         max_rounds)
            out[key] = {name: _slim(r) for name, r in runs.items()}
            print(f"{workload} {key}: " + ", ".join(
                f"{n} {r['final_accuracy']:.3f}" for n, r in runs.items()), flush=True)
    return out


def _slim(result: dict) -> dict:
    keep = ("final_accuracy", "best_accuracy", "rounds", "simulated_seconds",
            "budget_violations", "clients_trained", "clients_trained_share", "bytes_sent",
            "max_peak_over_budget", "participations", "skipped_no_plan", "rejected",
            "cpu_seconds", "tier_peaks")
    out = {k: result[k] for k in keep}
    out["curve"] = [[m["simulated_seconds"], m["accuracy"]] for m in result["history"]]
    out["keep_all_peak_bytes"] = result["federation"]["keep_all_peak_bytes"]
    return out


def time_to(curve: list, accuracy: float) -> float:
    return next((t for t, a in curve if a >= accuracy), math.inf)


def _mean(values):
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def report(results: dict, out: Path) -> str:
    lines = []
    for workload, per_seed in results.items():
        lines.append(f"\n### {workload}\n")
        lines.append("| strategy | final acc (mean) | per seed | best acc | time to random's "
                     "best (x random's) | clients trained | MB sent | max peak/budget | "
                     "violations | rounds |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for name in STRATEGIES:
            rows = [runs[name] for runs in per_seed.values() if name in runs]
            if not rows:
                continue
            ratios = []
            for runs in per_seed.values():
                target = runs["random"]["best_accuracy"]
                base = time_to(runs["random"]["curve"], target)
                ratios.append(time_to(runs[name]["curve"], target) / base if base > 0
                              else math.nan)
            lines.append(
                f"| {name} | {_mean([r['final_accuracy'] for r in rows]):.3f} | "
                + "/".join(f"{r['final_accuracy']:.3f}" for r in rows) + " | "
                + f"{_mean([r['best_accuracy'] for r in rows]):.3f} | "
                + "/".join("inf" if not math.isfinite(x) else f"{x:.2f}" for x in ratios)
                + f" | {_mean([r['clients_trained_share'] for r in rows]):.2f} | "
                + f"{_mean([r['bytes_sent'] for r in rows]) / 1e6:.1f} | "
                + f"{max((r['max_peak_over_budget'] or 0) for r in rows):.3f} | "
                + f"{sum(r['budget_violations'] for r in rows)} | "
                + "/".join(str(r["rounds"]) for r in rows) + " |")
        for name in ("profl", "neulite"):
            first = next(iter(per_seed.values())).get(name)
            if first:
                tiers = first["tier_peaks"]
                lines.append(f"\n{name} per-tier largest measured peak / budget (MB, first "
                             "seed): " + ", ".join(
                                 f"{t} {v['peak'] / 1e6:.2f}/{v['budget'] / 1e6:.2f}"
                                 if v["peak"] else f"{t} -/{v['budget'] / 1e6:.2f}"
                                 for t, v in tiers.items())
                             + f"; full model keep-all {first['keep_all_peak_bytes'] / 1e6:.2f}")
        _plot(workload, per_seed, out)
    return "\n".join(lines)


def _plot(workload: str, per_seed: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = next(iter(per_seed.values()))
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in runs.items():
        xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot(xs, ys, label=name)
    ax.set_xlabel("simulated seconds")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{workload}, {next(iter(per_seed))}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"accuracy-{workload}.png", dpi=100)
    plt.close(fig)


def dev_report(results: dict) -> str:
    lines = ["| workload | lr | training-pool accuracy of random (per dev seed) |",
             "|---|---|---|"]
    for workload, per in results.items():
        for lr in LR_GRID:
            accs = [runs["random"]["final_accuracy"] for key, runs in per.items()
                    if key.startswith(f"lr{lr:g}-")]
            lines.append(f"| {workload} | {lr:g} | "
                         + "/".join(f"{a:.3f}" for a in accs) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default=None)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--max-rounds", type=int, default=60)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--dev", action="store_true")
    parser.add_argument("--out", default="/tmp/fl_strategies")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in (args.seeds or ("7" if args.dev else "0,1,2")).split(",")]
    workloads = args.workloads.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with ProcessPoolExecutor(max_workers=min(args.jobs, len(workloads))) as pool:
        futures = {w: pool.submit(run_workload, w, seeds, args.rounds, args.max_rounds,
                                  args.dev) for w in workloads}
        results = {w: f.result() for w, f in futures.items()}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    text = dev_report(results) if args.dev else report(results, out)
    print(text)
    print(f"\nwall {time.time() - start:.0f} s; command: python "
          f"benchmarks/bench_fl_strategies.py {' '.join(argv or sys.argv[1:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
