"""Solve time at ATen scale: a 24-layer GPT-2 captured from a Hugging Face config.

    python benchmarks/bench_solve_gpt2.py [--layers 24] [--time-limit 10]

Captures ``GPT2LMHeadModel`` (n_embd 128, 4 heads, vocabulary 1,000, sequence 64, batch
8; no download), measures it once and plans it recompute-only at 0.8 and 0.5 of its
keep-all peak with the default solver (ilp, CBC) and the given time limit; prints per
budget the status, the predicted peak, wall and CPU seconds and the solver's last notes.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--time-limit", type=float, default=10.0)
    args = parser.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    from fedplan.analysis import analyze
    from fedplan.planner.simulate import simulate
    from fedplan.planner.solvers import SolverOptions, solve

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_positions=64, n_embd=128,
                                       n_layer=args.layers, n_head=4, use_cache=False,
                                       bos_token_id=0, eos_token_id=0))
    tokens = torch.randint(0, 1000, (8, 65))

    def loss_fn(outputs, targets):
        logits = outputs.logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    analysis = analyze(model, {"input_ids": tokens[:, :-1]}, tokens[:, 1:], loss_fn=loss_fn,
                       repeats=1, compress=False)
    keep_all = simulate(analysis.graph, analysis.costs).peak_bytes
    print(f"{len(analysis.graph.nodes)} nodes, keep-all {keep_all} B")
    for fraction in (0.8, 0.5):
        wall, cpu = time.perf_counter(), time.process_time()
        plan = solve(analysis.graph, analysis.costs, int(fraction * keep_all),
                     options=SolverOptions(time_limit_seconds=args.time_limit))
        print(f"{fraction}: {plan.status}, predicted {plan.predicted_peak_bytes} B, "
              f"{time.perf_counter() - wall:.1f} s wall, {time.process_time() - cpu:.1f} s "
              f"CPU; {'; '.join(plan.notes[-2:])}")


if __name__ == "__main__":
    main()
