"""Arguments and handlers of ``fedplan bench`` and ``fedplan bench-solver``.

``fedplan/cli.py`` only calls ``register``; everything else about the two commands
lives here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from fedplan.errors import BadInputError

from . import report
from .run import BUDGET_PLANNERS, PLANNERS, BenchConfig, machine, model_paths, run_bench

MIB = 2**20
# (layers, width, seed) of the random layered graphs: solve time against size ...
GRAPH_SIZES = ((10, 2, 0), (20, 3, 0), (40, 4, 0), (80, 5, 0), (160, 6, 0))
QUICK_GRAPH_SIZES = ((6, 2, 0), (12, 3, 0))
# ... and the small ones the exact reference settles (see exact.py for its cost)
GAP_GRAPHS = tuple((layers, 2, seed) for layers in (6, 8) for seed in range(4))
QUICK_GAP_GRAPHS = ((6, 2, 1), (6, 2, 2))
GAP_FRACTIONS = (0.9, 0.8)
GAP_CAP = 20_000  # simulations the exact reference may run per point


def _fractions(text: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise BadInputError(f"expected {flag} as comma-separated fractions such as "
                            f"0.8,0.6,0.4,0.25; found {text!r}") from None
    if not values:
        raise BadInputError(f"expected at least one fraction in {flag}; found {text!r}")
    return values


def _planners(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in PLANNERS]
    if unknown or not names:
        raise BadInputError(f"unknown planner {unknown[0] if unknown else text!r} in "
                            f"--planners; valid planners: {', '.join(PLANNERS)}")
    return names


def register(commands, parser_class) -> None:
    """Add ``bench`` and ``bench-solver`` to the ``fedplan`` subcommands."""
    bench = commands.add_parser(
        "bench", help="benchmark fedplan's planners against PyTorch's, side by side",
        description="For every model and budget run every planner (fedplan's ilp, greedy, "
                    "ilp+compress; torch.compile's memory-budget partitioner, selective "
                    "activation checkpointing, all/sqrt checkpointing, ActNN-style 2-bit "
                    "compression, keep-all), measure peak, step time and gradient error "
                    "side by side, and write JSON, CSV, a markdown summary and PNG plots.")
    bench.add_argument("--models", nargs="+", metavar="FILE",
                       help="model files (default: the six example models; --quick: "
                            "examples/mnist_cnn.py)")
    bench.add_argument("--budgets", default=None, metavar="F,F,...",
                       help="fractions of the keep-all activation memory on top of the fixed "
                            "costs (default: 0.8,0.6,0.4,0.25; --quick: 0.8,0.4)")
    bench.add_argument("--planners", default=None, metavar="NAMES",
                       help=f"comma-separated, from {','.join(PLANNERS)} (default: all; "
                            f"--quick: all but torch.compile)")
    bench.add_argument("--batch-size", type=int, default=None, metavar="N",
                       help="batch size for every model (default: each file's own)")
    bench.add_argument("--repeats", type=int, default=None, metavar="K",
                       help="timed steps per point, interleaved (default: 5; --quick: 2)")
    bench.add_argument("--time-limit", type=float, default=30.0, metavar="S",
                       help="ILP time limit per solve (default: 30)")
    bench.add_argument("--out", default="bench-results", metavar="DIR",
                       help="output folder (default: bench-results)")
    bench.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    bench.add_argument("--no-solver", action="store_true",
                       help="skip the random-graph solver sweep and the exact reference")
    bench.add_argument("--quick", action="store_true",
                       help="a small run for tests: mnist_cnn, two budgets, no torch.compile")
    bench.add_argument("--solver-only", action="store_true",
                       help="run only the random-graph solver sweep and the exact reference "
                            "(no model is measured)")
    bench.add_argument("--gap-graphs", default=None, metavar="LxW,...",
                       help="shapes of the random layered graphs held against the exact "
                            "reference (default: 6x2,8x2)")
    bench.add_argument("--gap-seeds", type=int, default=None, metavar="N",
                       help="seeds 0..N-1 of every gap graph shape (default: 4)")
    bench.add_argument("--gap-fractions", default=None, metavar="F,F,...",
                       help="budgets of the gap points, fractions of the no-recompute peak "
                            "(default: 0.9,0.8)")
    bench.add_argument("--merge", nargs="+", metavar="RESULTS",
                       help="measure nothing: combine the results.json files (or folders "
                            "holding one) of several runs into one report in --out, goals "
                            "recomputed over all their points")
    bench.add_argument("--json", action="store_true",
                       help="print the goals and file paths as one JSON object on stdout")
    bench.set_defaults(handler=bench_command)

    solver = commands.add_parser(
        "bench-solver", help="solve a framework-free graph (networkx node-link JSON)",
        description="Read GRAPH.json (networkx node-link; nodes with cost_cpu, cost_ram, "
                    "backward: the Checkmate/Moccasin format), map it onto fedplan's plan "
                    "space and solve at a fraction of its no-recompute peak over node "
                    "outputs in topological order (Moccasin's protocol). Prints status, "
                    "objective (total compute cost), bound and wall time, in the graph's "
                    "own units.")
    solver.add_argument("graph", metavar="GRAPH.json", help="networkx node-link JSON")
    solver.add_argument("--budget-fraction", type=float, required=True, metavar="F",
                        help="budget as a fraction of the no-recompute peak")
    solver.add_argument("--solver", default="ilp", metavar="NAME",
                        help="ilp (default), greedy, none, all or sqrt")
    solver.add_argument("--time-limit", type=float, default=30.0, metavar="S",
                        help="solver time limit in seconds (default: 30)")
    solver.add_argument("--workers", type=int, default=8, metavar="N",
                        help="solver threads (default: 8)")
    solver.add_argument("--backend", default="CBC", choices=("CBC", "CP_SAT", "HIGHS", "SCIP"),
                        help="OR-Tools backend of the ilp solver (default: CBC)")
    solver.add_argument("--exact", type=int, default=0, metavar="N",
                        help="also run the exact reference with at most N simulations "
                             "and report the gap (default: off)")
    solver.add_argument("--generate", metavar="LAYERSxWIDTH",
                        help="first write a random layered graph of this shape to GRAPH.json")
    solver.add_argument("--seed", type=int, default=0, help="seed for --generate (default: 0)")
    solver.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout instead of a table")
    solver.set_defaults(handler=bench_solver_command)


# ---- fedplan bench-solver -----------------------------------------------------------------
def _generate(path: Path, shape: str, seed: int) -> None:
    from fedplan.planner.graphs import random_layered_graph

    try:
        layers, width = (int(part) for part in shape.lower().split("x"))
    except ValueError:
        raise BadInputError(f"expected --generate as LAYERSxWIDTH such as 12x3; found "
                            f"{shape!r}") from None
    report.write_json_atomic(path, random_layered_graph(layers, width, seed=seed))


def bench_solver_command(args: argparse.Namespace) -> dict[str, Any] | None:
    from fedplan.planner.graphs import read_node_link, to_problem

    from .solver_bench import check_fraction, gap_to_exact, run_solver

    check_fraction(args.budget_fraction)
    path = Path(args.graph)
    if args.generate:
        _generate(path, args.generate, args.seed)
    problem = to_problem(read_node_link(path))
    run = run_solver(problem, args.budget_fraction, solver=args.solver,
                     time_limit=args.time_limit, workers=args.workers,
                     backend=args.backend)
    result = run.to_json()
    if args.exact:
        result["exact"] = gap_to_exact(problem, args.budget_fraction,
                                       max_evaluations=args.exact,
                                       time_limit=args.time_limit).to_json()
    if args.json:
        return result
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{run.graph}: {run.nodes} nodes ({run.forward_nodes} forward), "
                        f"solver {run.solver}", show_edge=False)
    table.add_column("field")
    table.add_column("value", justify="right")
    for key in ("status", "objective", "bound", "recompute_cost", "solve_seconds", "budget",
                "no_recompute_peak", "keep_all_peak", "peak"):
        value = result[key]
        table.add_row(key.replace("_", " "), "-" if value is None else
                      f"{value:.4g}" if isinstance(value, float) else str(value))
    if "exact" in result:
        exact = result["exact"]
        table.add_row("exact status", exact["exact_status"])
        table.add_row("gap to exact", "-" if exact["gap"] is None else f"{exact['gap']:.2%}")
    console = Console()
    console.print(table)
    for note in run.notes:
        console.print(f"note: {note}")
    return None


# ---- fedplan bench ----------------------------------------------------------------------
def config_from_args(args: argparse.Namespace, root: Path) -> BenchConfig:
    quick = args.quick
    models = args.models or ((str(root / "examples" / "mnist_cnn.py"),) if quick else None)
    budgets = _fractions(args.budgets, "--budgets") if args.budgets else (
        (0.8, 0.4) if quick else (0.8, 0.6, 0.4, 0.25))
    planners = _planners(args.planners) if args.planners else tuple(
        p for p in PLANNERS if not (quick and p == "torch.compile"))
    repeats = args.repeats if args.repeats is not None else (2 if quick else 5)
    # --solver-only runs no model: it must not need the example files (any directory)
    paths = () if getattr(args, "solver_only", False) else model_paths(
        tuple(models) if models else None, root)
    return BenchConfig(models=paths,
                       budgets=budgets, planners=planners, batch_size=args.batch_size,
                       repeats=repeats, time_limit=args.time_limit)


def _gap_graphs(args: argparse.Namespace) -> tuple[tuple[int, int, int], ...]:
    """(layers, width, seed) of the exact-reference points, from the --gap-* flags."""
    if args.gap_graphs is None and args.gap_seeds is None:
        return QUICK_GAP_GRAPHS if args.quick else GAP_GRAPHS
    shapes = []
    for part in (args.gap_graphs or "6x2,8x2").split(","):
        try:
            layers, width = (int(x) for x in part.strip().lower().split("x"))
        except ValueError:
            raise BadInputError(f"expected --gap-graphs as LAYERSxWIDTH,... such as "
                                f"6x2,8x2; found {args.gap_graphs!r}") from None
        shapes.append((layers, width))
    seeds = 4 if args.gap_seeds is None else args.gap_seeds
    if seeds < 1:
        raise BadInputError(f"expected --gap-seeds >= 1; found {seeds}")
    return tuple((layers, width, seed) for layers, width in shapes for seed in range(seeds))


def solver_section(quick: bool, time_limit: float, advance, *,
                   gap_graphs: tuple[tuple[int, int, int], ...] | None = None,
                   gap_fractions: tuple[float, ...] = GAP_FRACTIONS) -> tuple[list, list]:
    from .solver_bench import gap_to_exact, layered_problem, run_solver

    runs, gaps = [], []
    for layers, width, seed in (QUICK_GRAPH_SIZES if quick else GRAPH_SIZES):
        problem = layered_problem(layers, width, seed)
        for solver in ("ilp", "greedy"):
            runs.append(run_solver(problem, 0.8, solver=solver,
                                   time_limit=time_limit).to_json())
        advance()
    if gap_graphs is None:
        gap_graphs = QUICK_GAP_GRAPHS if quick else GAP_GRAPHS
    for layers, width, seed in gap_graphs:
        problem = layered_problem(layers, width, seed)
        for fraction in gap_fractions:
            gaps.append(gap_to_exact(problem, fraction, max_evaluations=GAP_CAP,
                                     time_limit=time_limit).to_json())
        advance()
    return runs, gaps


def _load_results(paths: list[str]) -> list[tuple[Path, dict]]:
    import json

    loaded = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            path = path / "results.json"
        try:
            loaded.append((path, json.loads(path.read_text())))
        except (OSError, ValueError) as exc:
            raise BadInputError(f"cannot read results {str(path)!r} ({exc}); pass the "
                                f"results.json of a finished fedplan bench run") from None
    return loaded


def merge_payload(sources: list[tuple[Path, dict]], command: str) -> dict[str, Any]:
    """One report over several runs' points (each run's own command and wall time kept)."""
    points, runs, gaps = [], [], []
    for _, data in sources:
        points += data.get("points", [])
        runs += data.get("solver_runs", [])
        gaps += data.get("gaps", [])
    return {"command": command, "machine": sources[0][1].get("machine") if sources else None,
            "merged_from": [{"path": str(path), "command": data.get("command"),
                             "wall_seconds": data.get("wall_seconds"),
                             "config": data.get("config"), "machine": data.get("machine"),
                             "host": data.get("host")}
                            for path, data in sources],
            "wall_seconds": sum(data.get("wall_seconds") or 0.0 for _, data in sources),
            "points": points, "solver_runs": runs, "gaps": gaps,
            "goals": report.goals(points, gaps)}


def _host() -> dict[str, Any]:
    """Load average and this process's CPU seconds: wall time alone means little on a
    shared machine."""
    import os
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {"loadavg_1_5_15": load,
            "cpu_seconds": usage.ru_utime + usage.ru_stime
            + children.ru_utime + children.ru_stime}


def bench_command(args: argparse.Namespace) -> dict[str, Any] | None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .run import steps_per_model

    root = Path.cwd()
    out = Path(args.out)
    if args.merge:
        payload = merge_payload(_load_results(args.merge),
                                "fedplan " + " ".join(sys.argv[1:]))
        _make_folder(out)
        return _finish(args, out, payload)
    config = config_from_args(args, root)
    gap_graphs = _gap_graphs(args)
    gap_fractions = (_fractions(args.gap_fractions, "--gap-fractions")
                     if args.gap_fractions else GAP_FRACTIONS)
    if args.solver_only and args.no_solver:
        raise BadInputError("--solver-only and --no-solver leave nothing to run; drop one")
    if args.solver_only:
        config = BenchConfig(models=(), budgets=config.budgets, planners=config.planners,
                             repeats=config.repeats, time_limit=config.time_limit)
    _make_folder(out)
    for path in config.models:  # fail on a bad file before an hour of measuring
        from fedplan.modelfile import load_model_file
        load_model_file(path)
    graphs = 0 if args.no_solver else len(
        QUICK_GRAPH_SIZES if args.quick else GRAPH_SIZES) + len(gap_graphs)
    total = len(config.models) * steps_per_model(config) + graphs
    started = time.perf_counter()
    stderr = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total}"), TimeElapsedColumn(), console=stderr,
                  disable=args.json or not sys.stderr.isatty()) as progress:
        task = progress.add_task("fedplan bench", total=total)

        def say(text: str) -> None:
            progress.update(task, description=text[:60])
            if not args.json and not sys.stderr.isatty():  # no bar: one line per stage
                print(f"fedplan: {text}", file=sys.stderr, flush=True)

        def advance() -> None:
            progress.advance(task)

        def checkpoint(done) -> None:  # partial results, replaced by the final ones
            report.write_json_atomic(out / "results.partial.json",
                                     {"points": [p.to_json() for p in done]})

        points = [p.to_json() for p in run_bench(config, say=say, advance=advance,
                                                 checkpoint=checkpoint)]
        runs, gaps = ([], []) if args.no_solver else solver_section(
            args.quick, config.time_limit, advance, gap_graphs=gap_graphs,
            gap_fractions=gap_fractions)
    goal = report.goals(points, gaps)
    payload = {"command": "fedplan " + " ".join(sys.argv[1:]) if sys.argv else "fedplan bench",
               "machine": machine(), "config": {
                   "models": list(config.models), "budgets": list(config.budgets),
                   "planners": list(config.planners), "batch_size": config.batch_size,
                   "repeats": config.repeats, "time_limit": config.time_limit},
               "wall_seconds": time.perf_counter() - started, "host": _host(),
               "points": points, "solver_runs": runs, "gaps": gaps, "goals": goal}
    (out / "results.partial.json").unlink(missing_ok=True)
    return _finish(args, out, payload)


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"cannot create the output folder {str(out)!r} ({exc}); "
                            f"pass --out DIR with a writable folder") from None


def _finish(args: argparse.Namespace, out: Path, payload: dict[str, Any]) -> dict | None:
    points, goal = payload["points"], payload["goals"]
    files = report.write_results(out, payload)
    if not args.no_plots:
        from .plots import write_plots
        files += write_plots(out, payload)
    summary = {"out": str(out), "files": [str(f) for f in files],
               "wall_seconds": payload["wall_seconds"], "goals": goal,
               "points": len(points),
               "failed": sum(1 for p in points if p["status"] != "ok")}
    if args.json:
        return summary
    _print_summary(points, goal, files, payload["wall_seconds"])
    return None


def _print_summary(points, goal, files, seconds) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="fedplan bench: measured side by side", show_edge=False)
    for column in ("model", "planner", "budget", "peak MiB", "pred. MiB", "overhead",
                   "grad diff", "note"):
        table.add_column(column, justify="right" if column not in ("model", "planner",
                                                                     "note") else "left")
    for p in points:
        if p["status"] != "ok":
            table.add_row(p["model"], p["planner"], p["budget"], "-", "-", "-", "-",
                          f"failed: {(p['error'] or '')[:60]}")
            continue
        predicted = "-" if not p["predicted_peak_bytes"] else \
            f"{p['predicted_peak_bytes'] / MIB:.2f}"
        table.add_row(p["model"], p["planner"], p["budget"],
                      f"{p['measured_peak_bytes'] / MIB:.2f}", predicted,
                      f"{p['overhead']:+.1%}", f"{p['max_grad_diff']:.2g}", "")
    console.print(table)
    met = goal["equal_peak_vs_compile_models_met"]
    compared = goal["equal_peak_vs_compile_models_compared"]
    console.print(f"fedplan >=10% faster than torch.compile at equal peak: {met} of "
                  f"{compared} models compared")
    gap = goal["ilp_gap"]
    if gap["known"]:
        console.print(f"ILP gap to the exact reference: worst {gap['worst']:.2%} over "
                      f"{gap['known']} of {gap['graphs']} settled points")
    console.print(f"{len(points)} points in {seconds:.0f} s; wrote "
                  f"{', '.join(str(f) for f in files)}")


__all__ = ["BUDGET_PLANNERS", "register"]
