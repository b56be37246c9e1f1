"""``fedplan fl simulate``: the embedded federation from the command line.

:func:`add_parsers` registers the ``fl`` command group on ``fedplan``'s subcommands;
:func:`simulate` is the handler (``fedplan.cli.main`` turns a ``FedplanError`` into one
line and exit status 2, and prints what a ``--json`` handler returns). Heavy imports
(torch, the server) happen inside the handler so ``fedplan --help`` stays fast.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

__all__ = ["add_parsers", "simulate"]


def add_parsers(subcommands: argparse._SubParsersAction) -> None:
    """Add ``fl`` (with ``simulate``) to ``fedplan``'s subcommands."""
    fl = subcommands.add_parser(
        "fl", help="federated learning: simulate a memory-limited federation",
        description="Federated learning with a memory plan per client.")
    fl.set_defaults(handler=_usage(fl), json=False)
    commands = fl.add_subparsers(dest="fl_command", metavar="COMMAND",
                                 parser_class=type(fl))
    sim = commands.add_parser(
        "simulate", help="run an embedded federation and report accuracy against time",
        description="Simulate N clients with device memory budgets and non-IID data on "
                    "this machine: per round a selector picks clients, each gets a plan "
                    "that fits its budget and trains its local epochs, FedAvg aggregates, "
                    "and the test set scores the global model against simulated time.")
    sim.add_argument("--model", default=None, metavar="MODEL.py",
                     help="model file for the dataset's inputs (default: the dataset's "
                          "packaged model: a CNN for mnist5k, a MobileNet-style CNN for "
                          "fashion-mnist, a transformer decoder for shakespeare)")
    sim.add_argument("--dataset", default="mnist5k", metavar="NAME|DATA.py",
                     help="mnist5k (default), fashion-mnist, digits, shakespeare (split by "
                          "speaking role), or a dataset file defining load_clients(num_clients, "
                          "seed) (README)")
    sim.add_argument("--clients", type=int, default=100, metavar="N",
                     help="number of clients (default: 100)")
    sim.add_argument("--rounds", type=int, default=30, metavar="R",
                     help="rounds (default: 30; with --resume, the total to reach)")
    sim.add_argument("--per-round", type=int, default=10, metavar="K",
                     help="clients selected per round (default: 10)")
    sim.add_argument("--selector", default="fedhybrid",
                     help="fedhybrid (default), oort, random or exclude")
    sim.add_argument("--strategy", default=None, metavar="NAME",
                     help="round policy: a selector's name (as --selector), or profl "
                          "(progressive block training), neulite (block-wise with curriculum "
                          "loss and co-adaptation), smartsplit (split training with an edge "
                          "server), heterofl (width-scaled nested sub-models)")
    sim.add_argument("--edge-memory", default=None, metavar="SIZE",
                     help="smartsplit: the edge server's memory (default 4GB)")
    sim.add_argument("--edge-speed", type=float, default=None, metavar="X",
                     help="smartsplit: the edge server's speed relative to 1.0 (default 8)")
    sim.add_argument("--bandwidth", default=None, metavar="SIZE",
                     help="smartsplit: bytes per second between a device and the edge "
                          "(default 2.5MB, 20 Mbit/s)")
    sim.add_argument("--edge-fail-round", type=int, default=None, metavar="R",
                     help="smartsplit, fault injection: the edge server fails in the middle "
                          "of round R (1-based)")
    sim.add_argument("--shrink-rounds", type=int, default=None, metavar="N",
                     help="profl: rounds per block of the shrinking stage, which trains the "
                          "blocks back to front before the growing stage (default 0: none)")
    sim.add_argument("--hsic-compression", type=float, default=None, metavar="MU",
                     help="neulite: weight of the HSIC term between a block's input and its "
                          "output in the stage loss (default 0: off)")
    sim.add_argument("--masked-loss", action="store_true",
                     help="heterofl: set the outputs of classes a client's data does not "
                          "hold to 0 before its loss (HeteroFL's masking)")
    sim.add_argument("--partition", default="dirichlet",
                     help="dirichlet (default), iid, shards or correlated (clients below "
                          "the keep-all peak hold classes 0-4, the rest 5-9)")
    sim.add_argument("--alpha", type=float, default=0.5, metavar="A",
                     help="Dirichlet concentration (default: 0.5)")
    sim.add_argument("--tiers", default="default", metavar="FILE|FRACTIONS",
                     help="device tiers: 'default' (packaged table), a CSV, or fractions of "
                          "the keep-all peak like 0.3,0.6,1.2")
    sim.add_argument("--tier-anchor", default="6GB", metavar="TIER",
                     help="tier mapped onto 1.1x the keep-all peak (default: 6GB)")
    sim.add_argument("--epochs", type=int, default=2, metavar="E",
                     help="local epochs (default: 2)")
    sim.add_argument("--batch-size", type=int, default=None, metavar="B",
                     help="batch size (default: the model file's DEFAULT_BATCH_SIZE)")
    sim.add_argument("--max-client-samples", type=int, default=None, metavar="N",
                     help="keep at most N samples per client (default: all)")
    sim.add_argument("--plan-time-limit", type=float, default=20.0, metavar="S",
                     help="seconds each plan solve may take (default: 20)")
    sim.add_argument("--lr", type=float, default=0.05, help="client SGD learning rate")
    sim.add_argument("--deadline", type=float, default=None, metavar="S",
                     help="simulated seconds a client may take per round; slower ones are "
                          "dropped as stragglers")
    sim.add_argument("--deadline-quantile", type=float, default=None, metavar="Q",
                     help="fedhybrid only: select only clients whose planned round time is "
                          "at most the Q-quantile of all feasible clients' (0 < Q <= 1; "
                          "default: no deadline; the memory-wall benchmark uses 0.5)")
    sim.add_argument("--deadline-weight", choices=("clients", "samples"), default=None,
                     help="with --deadline-quantile: what the quantile counts: 'clients' "
                          "(the Q-quantile of their planned round times; the default) or "
                          "'samples' (the smallest planned time by which clients holding a "
                          "share Q of the feasible clients' samples are done; the "
                          "memory-wall benchmark uses this)")
    sim.add_argument("--pacer-window", type=int, default=None, metavar="W",
                     help="fedhybrid with --deadline-quantile only: Oort's pacer relaxes the "
                          "deadline (and the compute pacer) by --pacer-step of the quantile "
                          "every W rounds in which the exploited clients' statistical "
                          "utility summed over the last W rounds fell below the W before "
                          "(default: never relaxes; the memory-wall benchmark's --with-pacer run "
                          "uses 8)")
    sim.add_argument("--pacer-step", type=float, default=None, metavar="D",
                     help="with --pacer-window: the quantile step (0 < D <= 1; default 0.05, "
                          "Oort's 5 percentile points)")
    sim.add_argument("--seed", type=int, default=0, help="seed of everything (default: 0)")
    sim.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    sim.add_argument("--out", default=None, metavar="DIR",
                     help="write state.npz (every round), metrics.csv, result.json and "
                          "accuracy.png here")
    sim.add_argument("--resume", default=None, metavar="DIR",
                     help="continue the run whose --out was DIR (same options)")
    sim.add_argument("--json", action="store_true",
                     help="print one JSON object on stdout instead of tables")
    sim.set_defaults(handler=simulate)


def _usage(parser: argparse.ArgumentParser):
    def handler(args: argparse.Namespace) -> None:
        from fedplan.errors import BadInputError
        parser.print_usage(sys.stderr)
        raise BadInputError("expected a subcommand: simulate")
    return handler


def _config(args: argparse.Namespace):
    from fedplan.errors import BadInputError
    from fedplan.units import parse_size

    from .selectors import SELECTORS
    from .server import SimConfig
    strategy = args.strategy or ""
    from .strategies import strategy_names
    if strategy and strategy not in strategy_names():
        raise BadInputError(f"unknown strategy {strategy!r}; valid names: "
                            f"{', '.join(strategy_names())}")
    if strategy in SELECTORS:
        args.selector, strategy = strategy, ""
    options = {}
    if args.deadline_quantile is not None:
        if args.selector != "fedhybrid":
            raise BadInputError(f"--deadline-quantile applies to --selector fedhybrid; found "
                                f"--selector {args.selector}; drop the option or use fedhybrid")
        if not 0.0 < args.deadline_quantile <= 1.0:
            raise BadInputError(f"expected --deadline-quantile in (0, 1]; found "
                                f"{args.deadline_quantile}")
        options["deadline_quantile"] = args.deadline_quantile
    if args.deadline_weight is not None:
        if "deadline_quantile" not in options:
            raise BadInputError(f"--deadline-weight applies with --deadline-quantile; found "
                                f"--deadline-weight {args.deadline_weight} alone; add e.g. "
                                f"--deadline-quantile 0.5 or drop it")
        options["deadline_weight"] = args.deadline_weight
    if args.pacer_step is not None and args.pacer_window is None:
        raise BadInputError(f"--pacer-step applies with --pacer-window; found --pacer-step "
                            f"{args.pacer_step} alone; add --pacer-window W or drop it")
    if args.pacer_window is not None:
        if "deadline_quantile" not in options:
            raise BadInputError("--pacer-window relaxes fedhybrid's deadline; found no "
                                "--deadline-quantile; add e.g. --deadline-quantile 0.5")
        if args.pacer_window < 1:
            raise BadInputError(f"expected --pacer-window of at least 1 round; found "
                                f"{args.pacer_window}")
        options["pacer_window"] = args.pacer_window
        if args.pacer_step is not None:
            if not 0.0 < args.pacer_step <= 1.0:
                raise BadInputError(f"expected --pacer-step in (0, 1]; found "
                                    f"{args.pacer_step}")
            options["pacer_step"] = args.pacer_step
    strategy_options: dict[str, Any] = {}
    for flag, key in (("edge_memory", "edge_memory_bytes"), ("edge_speed", "edge_speed"),
                      ("bandwidth", "bandwidth_bytes_per_second"),
                      ("edge_fail_round", "edge_fail_round")):
        value = getattr(args, flag)
        if value is None:
            continue
        if strategy != "smartsplit":
            raise BadInputError(f"--{flag.replace('_', '-')} applies to --strategy smartsplit;"
                                f" found --strategy {strategy or args.selector}")
        if key.endswith("bytes") or key.endswith("second"):
            try:
                value = parse_size(value)
            except ValueError as exc:
                raise BadInputError(f"--{flag.replace('_', '-')}: {exc}") from exc
        strategy_options[key] = value
    if args.shrink_rounds is not None:
        if strategy != "profl":
            raise BadInputError(f"--shrink-rounds applies to --strategy profl; found "
                                f"--strategy {strategy or args.selector}")
        if args.shrink_rounds < 0:
            raise BadInputError(f"expected --shrink-rounds >= 0; found {args.shrink_rounds}")
        strategy_options["shrink_rounds"] = args.shrink_rounds
    if args.hsic_compression is not None:
        if strategy != "neulite":
            raise BadInputError(f"--hsic-compression applies to --strategy neulite; found "
                                f"--strategy {strategy or args.selector}")
        if not args.hsic_compression >= 0:
            raise BadInputError(f"expected --hsic-compression >= 0; found "
                                f"{args.hsic_compression}")
        strategy_options["compression_weight"] = args.hsic_compression
    if args.masked_loss:
        if strategy != "heterofl":
            raise BadInputError(f"--masked-loss applies to --strategy heterofl; found "
                                f"--strategy {strategy or args.selector}")
        strategy_options["masked_loss"] = True
    return SimConfig(model=args.model or "", dataset=args.dataset, strategy=strategy,
                     strategy_options=strategy_options,
                     num_clients=args.clients, rounds=args.rounds,
                     clients_per_round=args.per_round, selector=args.selector,
                     partition=args.partition, alpha=args.alpha, tiers=args.tiers,
                     tier_anchor=args.tier_anchor, epochs=args.epochs,
                     batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                     deadline_seconds=args.deadline, threads=args.threads,
                     max_client_samples=args.max_client_samples,
                     plan_time_limit=args.plan_time_limit,
                     selector_options=options)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def simulate(args: argparse.Namespace) -> dict[str, Any] | None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from fedplan.progress import status

    from .report import write_outputs
    from .server import Server, build_federation

    started = time.perf_counter()
    config = _config(args)
    err = Console(stderr=True)
    with status("setting up the federation", quiet=args.json) as say:
        federation = build_federation(config, say)
    server = Server(federation, out_dir=args.out or args.resume)
    if args.resume:
        server.load_state(*Server.read_state(args.resume))
    progress = Progress(TextColumn("round"), MofNCompleteColumn(), BarColumn(),
                        TextColumn("{task.description}"), console=err,
                        disable=args.json or not sys.stderr.isatty())
    with progress:
        task = progress.add_task("", total=config.rounds, completed=server.round)

        def on_round(m: dict[str, Any]) -> None:
            text = (f"acc {m['accuracy']:.3f}  t {m['simulated_seconds']:.1f}s  "
                    f"{m['participants']}/{m['selected']} trained")
            progress.update(task, advance=1, description=text)
            if not args.json and not sys.stderr.isatty():
                print(f"fedplan: round {m['round']}: {text}", file=sys.stderr, flush=True)

        result = server.run(on_round)
    result["wall_seconds"] = time.perf_counter() - started
    if args.out or args.resume:
        result["files"] = write_outputs(result, args.out or args.resume)
    if args.json:
        return _finite({k: v for k, v in result.items() if k != "events"}
                       | {"events": result["events"]})
    table = Table(title=f"fedplan fl simulate: {config.strategy or config.selector} on "
                        f"{config.dataset}",
                  show_edge=False)
    for column in ("round", "sim s", "accuracy", "trained", "below keep-all", "skipped",
                   "rejected"):
        table.add_column(column, justify="right")
    for m in result["history"]:
        table.add_row(str(m["round"]), f"{m['simulated_seconds']:.1f}",
                      f"{m['accuracy']:.3f}", f"{m['participants']}/{m['selected']}",
                      str(m["below_keep_all"]), str(m["skipped"]),
                      str(m["rejected"] + m["stragglers"]))
    out = Console()
    out.print(table)
    fed = result["federation"]
    out.print(f"final accuracy {result['final_accuracy']:.3f} after {result['rounds']} rounds, "
              f"{result['simulated_seconds']:.1f} simulated s; keep-all peak "
              f"{fed['keep_all_peak_bytes']} B, {fed['clients_below_keep_all']} of "
              f"{fed['clients']} clients below it, {fed['clients_without_plan']} without any "
              f"plan; budget violations {result['budget_violations']}")
    return None
