"""Implementations of the CLI commands: load, run, print a table or return JSON."""

from __future__ import annotations

import argparse
import copy
import warnings
from typing import Any

from rich.console import Console
from rich.table import Table

from .analysis import analyze
from .api import measure
from .errors import BadInputError
from .modelfile import ModelSpec, load_model_file
from .planner.simulate import CATEGORIES, simulate
from .progress import status
from .units import format_bytes

console = Console()


def _load(args: argparse.Namespace) -> tuple[ModelSpec, int]:
    spec = load_model_file(args.model)
    batch_size = args.batch_size if args.batch_size is not None else spec.default_batch_size
    if batch_size <= 0:
        raise BadInputError(f"expected a positive --batch-size; found {batch_size}")
    return spec, batch_size


def _breakdown_table(title: str, breakdown: dict[str, int], total: int) -> Table:
    table = Table(title=title, show_edge=False)
    table.add_column("part")
    table.add_column("bytes", justify="right")
    table.add_column("size", justify="right")
    for key in CATEGORIES:
        table.add_row(key.replace("_", " "), str(breakdown.get(key, 0)),
                      format_bytes(breakdown.get(key, 0)))
    table.add_row("[bold]peak[/bold]", str(total), format_bytes(total))
    return table


def profile(args: argparse.Namespace) -> dict[str, Any] | None:
    spec, batch_size = _load(args)
    quiet = args.json
    with status(f"profiling {spec.name} (batch {batch_size})", quiet=quiet) as say:
        model = spec.build()
        inputs, targets = spec.batch(batch_size)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            analysis = analyze(model, inputs, targets, loss_fn=spec.loss_fn,
                               optimizer=args.optimizer, leaf_modules=args.leaf + list(
                                   spec.leaf_modules), repeats=args.repeats, progress=say)
        timeline = simulate(analysis.graph, analysis.costs)
        say("measuring real training steps")
        measured = measure(copy.deepcopy(model), inputs, targets, loss_fn=spec.loss_fn,
                           optimizer=args.optimizer, steps=args.steps)
    costs = analysis.costs
    rows = []
    for node in analysis.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        cost = costs.node[node.name]
        rows.append({"node": node.name, "op": node.module_type or node.target.split(".")[-1],
                     "output_bytes": node.output_bytes,
                     "saved_bytes": costs.saved_bytes(node.name),
                     "forward_seconds": cost.forward_seconds})
    error = (timeline.peak_bytes - measured.peak_bytes) / measured.peak_bytes
    result = {
        "model": str(spec.path), "batch_size": batch_size, "optimizer": args.optimizer,
        "nodes": len(analysis.graph), "fingerprint": analysis.graph.fingerprint,
        "predicted_peak_bytes": timeline.peak_bytes,
        "measured_peak_bytes": measured.peak_bytes,
        "prediction_error": error,
        "peak_at": {"phase": timeline.peak_phase, "node": timeline.peak_node},
        "breakdown": timeline.breakdown,
        "fixed": {"parameters": costs.param_bytes, "buffers": costs.buffer_bytes,
                  "gradients": costs.grad_bytes,
                  "optimizer_state": costs.optimizer_state_bytes,
                  "inputs": costs.input_bytes},
        "step_seconds": measured.step_seconds,
        "notes": [str(w.message) for w in caught],
        "tensors": rows,
    }
    if args.json:
        return result
    table = Table(title=f"{spec.name}: per-tensor costs (batch {batch_size})", show_edge=False)
    for column, justify in (("node", "left"), ("op", "left"), ("output", "right"),
                            ("saved", "right"), ("forward ms", "right")):
        table.add_column(column, justify=justify)
    for row in rows:
        table.add_row(row["node"], row["op"], format_bytes(row["output_bytes"]),
                      format_bytes(row["saved_bytes"]) if row["saved_bytes"] else "-",
                      f"{row['forward_seconds'] * 1e3:.3f}")
    console.print(table)
    console.print(_breakdown_table(
        f"predicted peak ({timeline.peak_phase} at {timeline.peak_node})",
        timeline.breakdown, timeline.peak_bytes))
    console.print(f"predicted peak  {format_bytes(timeline.peak_bytes)}  "
                  f"({timeline.peak_bytes} B)")
    console.print(f"measured peak   {format_bytes(measured.peak_bytes)}  "
                  f"({measured.peak_bytes} B)   prediction error {error:+.2%}")
    console.print(f"step time       {measured.step_seconds * 1e3:.1f} ms")
    for note in result["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")
    return None
