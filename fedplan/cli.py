"""The ``fedplan`` command line.

Every user mistake ends in one line on stderr and exit status 2; ``--json`` prints one
machine-readable object on stdout and nothing else there.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import FedplanError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 like every other bad input."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.py",
                        help="a Python file defining build_model() and example_batch(n)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="N",
                        help="batch size (default: the file's DEFAULT_BATCH_SIZE, else 8)")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                        help="optimizer whose state counts in the peak (default: sgd)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout instead of tables")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedplan", description=(
        "Plan activation memory for training: capture a model (torch.export), measure "
        "every tensor, and choose per tensor to keep, recompute or compress so one "
        "training step fits a memory budget."))
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    profile = commands.add_parser(
        "profile", help="per-tensor costs and the predicted and measured peak of a step",
        description="Trace MODEL.py, measure every tensor (output bytes, saved bytes, "
                    "forward time), and print the keep-all peak predicted by the simulator "
                    "next to the peak measured by PyTorch's profiler.")
    _add_model_args(profile)
    profile.add_argument("--repeats", type=int, default=5, metavar="K",
                         help="timing repeats per node (default: 5)")
    profile.add_argument("--steps", type=int, default=3, metavar="N",
                         help="training steps timed for the measurement (default: 3)")
    profile.set_defaults(handler=_commands().profile)

    compile_ = commands.add_parser(
        "compile", help="plan keep/recompute/compress per tensor for a memory budget",
        description="Trace and measure MODEL.py, solve for the cheapest plan whose peak "
                    "fits the budget, write it as JSON and print a summary.")
    _add_model_args(compile_)
    budget = compile_.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget", metavar="SIZE",
                        help="peak memory of one training step: 512MB, 0.5GiB, 1e9 or "
                             "bytes, or min (the smallest peak the allowed decisions reach)")
    budget.add_argument("--budget-fraction", type=float, metavar="F",
                        help="fixed costs plus F times the keep-all activation memory "
                             "(1.0 = the keep-all peak)")
    compile_.add_argument("--solver", default="ilp", metavar="NAME",
                          help="ilp (default), greedy, none, all or sqrt")
    compile_.add_argument("--decisions", default=None, metavar="LIST",
                          help="what the plan may decide, comma-separated: recompute, "
                               "compress, microbatch, optimizer-in-backward, "
                               "compress-optimizer-state, or all. Default: recompute,"
                               "microbatch,optimizer-in-backward, which change nothing a "
                               "training run computes (recompute and the step inside "
                               "backward are bit-identical, micro-batches equal up to "
                               "summation order and are left out for models with "
                               "BatchNorm); compress and compress-optimizer-state trade "
                               "a measured error for memory")
    compile_.add_argument("--no-compress", dest="compress", action="store_false",
                          help="take compress out of --decisions (gradients then match the "
                               "unplanned model bit for bit)")
    compile_.add_argument("--min-bits", type=int, default=4, choices=(2, 3, 4, 8),
                          help="lowest code width the ilp may compress to; 3 is channel-wise "
                               "mixed (default: 4)")
    compile_.add_argument("--backend", default="CBC",
                          choices=("CBC", "CP_SAT", "HIGHS", "SCIP"),
                          help="OR-Tools backend of the ilp solver (default: CBC)")
    compile_.add_argument("--time-limit", type=float, default=30.0, metavar="S",
                          help="time limit of the whole solve in seconds (default: 30)")
    compile_.add_argument("--workers", type=int, default=8, metavar="N",
                          help="solver threads for CP_SAT, HIGHS and SCIP (CBC runs one; "
                               "default: 8)")
    compile_.add_argument("--seed", type=int, default=0, help="solver seed (default: 0)")
    compile_.add_argument("--repeats", type=int, default=5, metavar="K",
                          help="timing repeats per node (default: 5)")
    compile_.add_argument("-o", "--output", metavar="PLAN.json",
                          help="where to write the plan (default: MODEL.plan.json)")
    compile_.add_argument("--timeline", metavar="FILE.png", default=None,
                          help="also draw the memory timeline of one step, keep-all beside "
                               "the plan, stacked by kind, predicted against measured")
    compile_.set_defaults(handler=_commands().compile_)

    measure = commands.add_parser(
        "measure", help="run real steps with a plan: measured peak, time, gradient error",
        description="Apply PLAN.json to MODEL.py, run real training steps, and compare "
                    "the measured peak with the plan's prediction and its budget, and the "
                    "step time and gradients with the unplanned model.")
    _add_model_args(measure)
    measure.add_argument("--plan", required=True, metavar="PLAN.json",
                         help="a plan written by `fedplan compile`")
    measure.add_argument("--steps", type=int, default=5, metavar="N",
                         help="timed training steps (default: 5)")
    measure.add_argument("--timeline", metavar="FILE.png", default=None,
                         help="also draw the memory timeline of one step (keep-all beside "
                              "the plan, predicted against measured)")
    measure.set_defaults(handler=_commands().measure)

    from .fl.cli import add_parsers as add_fl_parsers  # `fedplan fl simulate`
    add_fl_parsers(commands)
    from fedplan.bench.cli import register as register_bench  # bench, bench-solver
    register_bench(commands, _Parser)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"fedplan {version('fedplan')}"
    except PackageNotFoundError:
        return "fedplan (not installed)"


def _commands():
    from . import commands
    return commands


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        result = args.handler(args)
    except FedplanError as exc:
        print(f"fedplan: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedplan: interrupted", file=sys.stderr)
        return 130
    if args.json and result is not None:
        json.dump(result, sys.stdout, indent=2, sort_keys=False)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
