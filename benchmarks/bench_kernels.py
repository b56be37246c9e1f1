"""Throughput of the activation-quantization kernels vs. the machine's copy bandwidth.

    python benchmarks/bench_kernels.py [--mb 64] [--repeats 10] [--json]
        [--impls reference,cpu] [--modes group,mixed] [--bits 8,4,2] [--stochastic]
        [--threads N]

Measures, in one run and on the same float32 input of ``--mb`` MB:

* ``copy``: ``dst.copy_(src)`` into a preallocated buffer (the bandwidth yardstick);
* for every implementation, mode and bit width: ``quantize`` and ``dequantize`` (into a
  preallocated ``out=`` buffer, as a training runtime would reuse one), in GB/s of float32
  input (``numel * 4 / seconds``), and the ratio to the copy bandwidth.

Each number is the median of ``--repeats`` timed calls after two warm-up calls.  Because the
bandwidth of a shared machine drifts, the copy is re-measured next to every row and the ratio
uses the copy median of that row ("copy GB/s" column).  The input has shape
(32, 128, numel / 4096) with per-channel scales spread over four decades, so that mode "mixed"
(target = ``bits``) really assigns different widths.  The one-off build of the CPU kernels
happens before timing starts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from fedplan.kernels import available_impls, dequantize, quantize


def _median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def make_input(mb: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = int(mb * 2**20) // 4
    inner = max(1, n // (32 * 128))
    x = torch.randn(32, 128, inner, generator=g)
    ch_scale = torch.logspace(-2, 2, 128)[torch.randperm(128, generator=g)]
    return x * ch_scale[None, :, None]


def run(args) -> dict:
    x = make_input(args.mb)
    nbytes = x.numel() * 4
    dst = torch.empty_like(x)
    out = torch.empty_like(x)
    impls = [i for i in args.impls.split(",") if i]
    missing = [i for i in impls if i not in available_impls()]
    if missing:
        print(f"skipping unavailable implementations: {missing}", file=sys.stderr)
        impls = [i for i in impls if i not in missing]
    if "cpu" in impls:
        quantize(x[:1], 8, impl="cpu")  # one-off build / load, outside the timings

    def copy_gbs() -> float:
        return nbytes / _median_time(lambda: dst.copy_(x), args.repeats) / 1e9

    result = {
        "mb": nbytes / 2**20,
        "shape": list(x.shape),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "copy_gbs": copy_gbs(),
        "rows": [],
    }
    for impl in impls:
        reps = args.repeats if impl != "reference" else max(3, min(args.repeats, 5))
        for mode in args.modes.split(","):
            for bits in [int(b) for b in args.bits.split(",")]:
                kw = dict(mode=mode, impl=impl, stochastic=args.stochastic, seed=1)
                if mode == "mixed":
                    kw["target_bits"] = bits
                copy_now = copy_gbs()
                tq = _median_time(lambda kw=kw, bits=bits: quantize(x, bits, **kw), reps)
                p = quantize(x, bits, **kw)
                td = _median_time(lambda p=p, i=impl: dequantize(p, impl=i, out=out), reps)
                row = {
                    "impl": impl,
                    "mode": mode,
                    "bits": bits,
                    "avg_bits": p.avg_bits(),
                    "packed_mb": p.nbytes() / 2**20,
                    "copy_gbs": copy_now,
                    "quantize_gbs": nbytes / tq / 1e9,
                    "dequantize_gbs": nbytes / td / 1e9,
                }
                row["quantize_ratio"] = row["quantize_gbs"] / copy_now
                row["dequantize_ratio"] = row["dequantize_gbs"] / copy_now
                result["rows"].append(row)
                if not args.json:
                    print(
                        f"  {impl:9s} {mode:7s} {bits} bits: q {row['quantize_gbs']:.2f} GB/s, "
                        f"dq {row['dequantize_gbs']:.2f} GB/s (copy {copy_now:.2f})",
                        file=sys.stderr,
                        flush=True,
                    )
    return result


def print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=(
            f"fedplan.kernels on {res['mb']:.0f} MB float32 {tuple(res['shape'])}, "
            f"{res['threads']} threads, median of {res['repeats']} "
            f"(copy_ into preallocated buffer: {res['copy_gbs']:.2f} GB/s)"
        )
    )
    for col in ("impl", "mode", "bits", "avg bits", "packed MB", "copy GB/s"):
        t.add_column(col, justify="right" if col != "impl" else "left")
    for col in ("quantize GB/s", "q / copy", "dequantize GB/s", "dq / copy"):
        t.add_column(col, justify="right")
    for r in res["rows"]:
        ok_q = "green" if r["quantize_ratio"] >= 0.5 else "red"
        ok_d = "green" if r["dequantize_ratio"] >= 0.5 else "red"
        t.add_row(
            r["impl"],
            r["mode"],
            str(r["bits"]),
            f"{r['avg_bits']:.2f}",
            f"{r['packed_mb']:.2f}",
            f"{r['copy_gbs']:.2f}",
            f"{r['quantize_gbs']:.2f}",
            f"[{ok_q}]{r['quantize_ratio']:.2f}[/{ok_q}]",
            f"{r['dequantize_gbs']:.2f}",
            f"[{ok_d}]{r['dequantize_ratio']:.2f}[/{ok_d}]",
        )
    console = Console()
    if console.width < 130:  # pipes default to 80 columns, which would truncate the table
        console = Console(width=130)
    console.print(t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=64.0, help="input size in MB (float32)")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per measurement")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--impls", default="reference,cpu", help="comma-separated implementations")
    ap.add_argument("--modes", default="group,mixed", help="comma-separated modes")
    ap.add_argument("--bits", default="8,4,2", help="comma-separated bit widths")
    ap.add_argument("--stochastic", action="store_true", help="stochastic rounding")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
