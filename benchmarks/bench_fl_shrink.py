"""ProFL with and without its shrinking stage, at an equal number of rounds.

    python benchmarks/bench_fl_shrink.py [--seeds 0,1,2] [--rounds 12] [--shrink 2]
                                         [--dataset fashion-mnist] [--extra]
                                         [--out results.json]

Each seed builds one federation (the dataset's packaged model, 20 clients, 5 per round,
Dirichlet alpha 0.5, at most 128 samples per client, one local epoch, lr 0.2 as chosen for
``random`` in bench_fl_strategies.py, budgets at 0.4 and 1.2 of the full model's keep-all
peak) and runs ``profl`` twice on it from the same initial weights: the growing stage alone
(``shrink_rounds=0``, the default), and with ``--shrink`` rounds per block of shrinking
stage first (fedplan/fl/strategies/profl.py). Both have ``--rounds`` rounds; the growing
stage paces what the shrinking stage leaves. With ``--extra`` the shrinking run gets its
shrinking rounds on top (``--rounds`` plus ``(blocks - 1) * --shrink``) and the same
growing rounds per block as the run without it: the initialisation's effect alone, at a
higher cost. Prints a markdown table: final accuracy (the
whole model after the last round, scored on a fixed seeded sample of 2,000 test images),
the stage of every round, simulated seconds, participations and budget violations.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--shrink", type=int, default=2)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--extra", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import torch

    from fedplan.fl.server import Server, SimConfig, build_federation

    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for seed in seeds:
        base = SimConfig(dataset=args.dataset, num_clients=20, rounds=args.rounds,
                         clients_per_round=5, strategy="profl", partition="dirichlet",
                         tiers="0.4,1.2", epochs=1, lr=0.2, seed=seed,
                         max_client_samples=128, plan_time_limit=5.0)
        fed = build_federation(base)
        test = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(fed.dataset.test_y), generator=test)[:2000]
        fed = dataclasses.replace(fed, dataset=dataclasses.replace(
            fed.dataset, test_x=fed.dataset.test_x[pick], test_y=fed.dataset.test_y[pick]))
        blocks = 3  # the packaged models' (fedplan/fl/models)
        for shrink in (0, args.shrink):
            options = {"shrink_rounds": shrink}
            rounds = args.rounds
            if args.extra and shrink:
                rounds += (blocks - 1) * shrink
                options["max_stage_rounds"] = max(1, args.rounds // blocks)
            config = dataclasses.replace(base, rounds=rounds, strategy_options=options)
            start = time.perf_counter()
            result = Server(dataclasses.replace(fed, config=config)).run()
            rows.append({"seed": seed, "shrink_rounds": shrink,
                         "final_accuracy": result["final_accuracy"],
                         "stages": [m["stage"] for m in result["history"]],
                         "simulated_seconds": result["simulated_seconds"],
                         "participations": result["participations"],
                         "budget_violations": result["budget_violations"],
                         "wall_seconds": time.perf_counter() - start})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.dataset}, {args.rounds} rounds, seeds {args.seeds}\n")
    print("| shrink rounds per block | final accuracy (mean) | per seed | stages (seed "
          f"{seeds[0]}) | simulated s (mean) | participations | violations |")
    print("|---|---|---|---|---|---|---|")
    for shrink in (0, args.shrink):
        mine = [r for r in rows if r["shrink_rounds"] == shrink]
        print(f"| {shrink} | {statistics.mean(r['final_accuracy'] for r in mine):.3f} | "
              + ", ".join(f"{r['final_accuracy']:.3f}" for r in mine)
              + f" | {mine[0]['stages']} | "
              f"{statistics.mean(r['simulated_seconds'] for r in mine):.1f} | "
              f"{sum(r['participations'] for r in mine)} | "
              f"{sum(r['budget_violations'] for r in mine)} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
