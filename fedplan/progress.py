"""Progress on stderr for long work; silent when stderr is not a terminal or in --json."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from rich.console import Console

_console = Console(stderr=True)


@contextlib.contextmanager
def status(message: str, *, quiet: bool = False) -> Iterator[Callable[[str], None]]:
    """A spinner with a message that the work can update: ``with status(...) as say``."""
    if quiet or not sys.stderr.isatty():
        if not quiet:
            print(f"fedplan: {message}", file=sys.stderr, flush=True)

        def say_plain(text: str) -> None:
            if not quiet:
                print(f"fedplan: {text}", file=sys.stderr, flush=True)

        yield say_plain
        return
    with _console.status(message) as spinner:
        def say(text: str) -> None:
            spinner.update(f"{message}: {text}")

        yield say
