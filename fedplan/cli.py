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
    parser.add_argument("--leaf", action="append", default=[], metavar="MODULE",
                        help="qualified name of a submodule to keep whole when tracing "
                             "(repeatable)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout instead of tables")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedplan", description=(
        "Plan activation memory for training: trace a model, measure every tensor, and "
        "choose per tensor to keep, recompute or compress so one training step fits a "
        "memory budget."))
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
