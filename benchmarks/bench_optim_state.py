"""Step-level decisions measured: 8-bit optimizer state accuracy, and whole-step peaks.

    python benchmarks/bench_optim_state.py accuracy [--dataset fashion-mnist] [--epochs 3]
        [--seeds 0,1,2] [--batch-size 64] [--optimizers sgd,adam] [--json FILE]
    python benchmarks/bench_optim_state.py peaks [--repeats 5] [--json FILE]

``accuracy``: a small CNN (two convolutions, two linear layers; 207,018 parameters, 99.3 %
of them in tensors of >= 4,096 elements, hence in 8-bit state) trained from the same
initial weights on the same batches in the same order with 32-bit state
(``torch.optim.SGD`` with momentum 0.9 / ``torch.optim.Adam``) and with 8-bit block-wise
state (``runtime.optim_state``, block 256), one run per seed; reports test accuracy of each
and the difference per seed, plus the spread between seeds of the 32-bit runs (the noise
floor the difference is held against). The 8-bit runs go through ``train_step`` with the
optimizer step inside backward, which is bit-identical to the ordinary step (tested), so
they exercise both decisions.

``peaks``: measured whole-step peaks (``runtime.step_measure.measure_train_step``: bytes
held at the start plus the profiler's allocation peak, never RSS) of
* a parameter-heavy MLP with BatchNorm at batch 512 and 64 (784-2048-2048-2048-10), SGD
  with momentum and Adam: ordinary, optimizer step inside backward, 8-bit state, both;
* an activation-heavy CNN at batch 64 (3x64x64 input, four 3x3 convolutions of 32
  channels), SGD with momentum: micro-batches k = 1, 2, 4, 8;
with the median step time of ``--repeats`` interleaved rounds (wall and process CPU time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch import nn

from fedplan.fl.data import load_dataset
from fedplan.runtime.optim_state import (
    QuantizedAdam,
    QuantizedSGD,
    StateQuantization,
    state_bytes,
)
from fedplan.runtime.step import StepOptions, gradient_bytes, train_step
from fedplan.runtime.step_measure import measure_train_step

MIB = 2**20


# ----------------------------------------------------------------------------- accuracy


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


def make_optimizer(name: str, bits: int, params):
    if bits == 32:
        return torch.optim.SGD(params, lr=0.05, momentum=0.9) if name == "sgd" \
            else torch.optim.Adam(params, lr=1e-3)
    quantization = StateQuantization(bits=8, block_size=256)
    return QuantizedSGD(params, lr=0.05, momentum=0.9, quantization=quantization) \
        if name == "sgd" else QuantizedAdam(params, lr=1e-3, quantization=quantization)


def train_and_test(data, optimizer_name: str, bits: int, seed: int, args) -> dict:
    torch.manual_seed(seed)
    model = small_cnn()
    optimizer = make_optimizer(optimizer_name, bits, model.parameters())
    options = StepOptions(optimizer_in_backward=bits == 8)
    generator = torch.Generator().manual_seed(seed)
    n = len(data.train_y)
    start = time.perf_counter()
    model.train()
    for _ in range(args.epochs):
        order = torch.randperm(n, generator=generator)
        for first in range(0, n - args.batch_size + 1, args.batch_size):
            index = order[first:first + args.batch_size]
            train_step(model, data.train_x[index], data.train_y[index],
                       nn.functional.cross_entropy, optimizer, options=options)
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(data.test_x[i:i + 1000]).argmax(1)
                           == data.test_y[i:i + 1000]).sum())
                      for i in range(0, len(data.test_y), 1000))
    return {"optimizer": optimizer_name, "bits": bits, "seed": seed,
            "accuracy": correct / len(data.test_y), "correct": correct,
            "state_bytes": state_bytes(optimizer), "train_seconds": seconds}


def accuracy(args) -> list[dict]:
    data = load_dataset(args.dataset)
    rows = []
    for name in args.optimizers.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            for bits in (32, 8):
                row = train_and_test(data, name, bits, seed, args)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"\n{args.dataset}, {args.epochs} epochs, batch {args.batch_size}, "
          f"test set {len(data.test_y)}\n")
    print("| optimizer | seed | 32-bit state acc. | 8-bit state acc. | 8-bit - 32-bit (points) "
          "| state bytes 32-bit | state bytes 8-bit |")
    print("|---|---|---|---|---|---|---|")
    for name in args.optimizers.split(","):
        mine = [r for r in rows if r["optimizer"] == name]
        diffs = []
        for seed in sorted({r["seed"] for r in mine}):
            full = next(r for r in mine if r["seed"] == seed and r["bits"] == 32)
            small = next(r for r in mine if r["seed"] == seed and r["bits"] == 8)
            diff = 100 * (small["accuracy"] - full["accuracy"])
            diffs.append(diff)
            print(f"| {name} | {seed} | {100 * full['accuracy']:.2f} % | "
                  f"{100 * small['accuracy']:.2f} % | {diff:+.2f} | {full['state_bytes']:,} | "
                  f"{small['state_bytes']:,} |")
        full_acc = [100 * r["accuracy"] for r in mine if r["bits"] == 32]
        small_acc = [100 * r["accuracy"] for r in mine if r["bits"] == 8]
        spread = max(full_acc) - min(full_acc)
        print(f"| {name} | mean | {statistics.mean(full_acc):.2f} % | "
              f"{statistics.mean(small_acc):.2f} % | {statistics.mean(diffs):+.2f} "
              f"(32-bit seed spread {spread:.2f}) | | |")
    return rows


# ----------------------------------------------------------------------------- peaks


def mlp_bn() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    width = 784
    for _ in range(3):
        layers += [nn.Linear(width, 2048), nn.BatchNorm1d(2048), nn.ReLU()]
        width = 2048
    return nn.Sequential(*layers, nn.Linear(width, 10))


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    channels = 3
    for _ in range(4):
        layers += [nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU()]
        channels = 32
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def peaks(args) -> list[dict]:
    cases = []
    g = torch.Generator().manual_seed(0)
    for batch in (512, 64):
        mlp_batch = (torch.randn(batch, 784, generator=g),
                     torch.randint(0, 10, (batch,), generator=g))
        for name in ("sgd", "adam"):
            for label, bits, fused in (("ordinary", 32, False), ("in backward", 32, True),
                                       ("8-bit state", 8, False),
                                       ("8-bit state + in backward", 8, True)):
                cases.append((f"MLP+BN b{batch}", name, label, mlp_bn, mlp_batch, bits,
                              StepOptions(optimizer_in_backward=fused)))
    cnn_batch = (torch.randn(64, 3, 64, 64, generator=g), torch.randint(0, 10, (64,), generator=g))
    for k in (1, 2, 4, 8):
        cases.append(("CNN b64", "sgd", f"k={k}", conv_net, cnn_batch, 32,
                      StepOptions(microbatches=k)))
    results = {i: {"peak": None, "wall": [], "cpu": []} for i in range(len(cases))}
    states = {}
    for i, (_, name, _, build, _batch, bits, _) in enumerate(cases):
        model = build()
        states[i] = (model, make_optimizer(name, bits, model.parameters()))
    for round_index in range(args.repeats):  # interleaved: each round runs every case
        for i, (_, _, _, _, (x, y), _, options) in enumerate(cases):
            model, optimizer = states[i]
            if round_index == 0:
                m = measure_train_step(model, x, y, nn.functional.cross_entropy, optimizer,
                                       options=options, steps=1)
                results[i]["peak"] = m
            wall, cpu = time.perf_counter(), time.process_time()
            train_step(model, x, y, nn.functional.cross_entropy, optimizer, options=options)
            results[i]["wall"].append(time.perf_counter() - wall)
            results[i]["cpu"].append(time.process_time() - cpu)
    rows = []
    print("\n| model | optimizer | step | peak (MiB) | peak (bytes) | held at start (bytes) "
          "| gradients (bytes) | state (bytes) | step wall ms (median) | step CPU ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, (model_name, name, label, *_rest) in enumerate(cases):
        m = results[i]["peak"]
        model, optimizer = states[i]
        row = {"model": model_name, "optimizer": name, "step": label,
               "peak_bytes": m.peak_bytes, "start_bytes": m.start_bytes,
               "gradient_bytes": gradient_bytes(optimizer),
               "state_bytes": state_bytes(optimizer),
               "wall_ms": 1e3 * statistics.median(results[i]["wall"]),
               "cpu_ms": 1e3 * statistics.median(results[i]["cpu"]),
               "wall_ms_range": [1e3 * min(results[i]["wall"]), 1e3 * max(results[i]["wall"])]}
        rows.append(row)
        print(f"| {model_name} | {name} | {label} | {m.peak_bytes / MIB:.2f} | "
              f"{m.peak_bytes:,} | {m.start_bytes:,} | {row['gradient_bytes']:,} | "
              f"{row['state_bytes']:,} | {row['wall_ms']:.1f} "
              f"({row['wall_ms_range'][0]:.1f}-{row['wall_ms_range'][1]:.1f}) | "
              f"{row['cpu_ms']:.1f} |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("accuracy", "peaks"))
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--optimizers", default="sgd,adam")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: the shared 2-core box stalls in thread "
                             "contention with more; see kernels/blockwise.py)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = accuracy(args) if args.what == "accuracy" else peaks(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
