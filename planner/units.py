"""Sizes in integer bytes everywhere; parsing and printing live here."""

from __future__ import annotations

import math
import re

from .errors import BadInputError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int | float, *, what: str = "size") -> int:
    """Parse ``512MB``, ``0.5GiB``, ``1e9`` or plain bytes into integer bytes.

    Decimal units (kB, MB, GB) are powers of 1000, binary units (KiB, MiB, GiB) powers
    of 1024; ``K``/``M``/``G`` alone are binary, as in ``ulimit``.
    """
    if isinstance(text, bool):
        raise BadInputError(f"expected a {what} such as 512MB, 0.5GiB or 1e9; found {text!r}")
    if isinstance(text, int):
        value, unit = float(text), ""
    elif isinstance(text, float):
        value, unit = text, ""
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise BadInputError(
                f"expected a {what} such as 512MB, 0.5GiB, 1e9 or a plain number of bytes; "
                f"found {text!r}")
        value, unit = float(match.group(1)), match.group(2).lower()
    if unit not in _UNITS:
        raise BadInputError(
            f"expected a {what} unit among B, kB, MB, GB, KiB, MiB, GiB; found {unit!r} "
            f"in {text!r}")
    size = value * _UNITS[unit]
    if not math.isfinite(size) or size <= 0:
        raise BadInputError(f"expected a positive {what}; found {text!r}")
    return int(round(size))


def format_bytes(num_bytes: int | float) -> str:
    """Human-readable binary size: ``1.50 MiB``."""
    value = float(num_bytes)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{sign}{value:.0f} {unit}" if unit == "B" else f"{sign}{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
