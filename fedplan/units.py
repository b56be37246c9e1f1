"""Sizes in integer bytes (defined in ``fedplan.planner.units``)."""

from fedplan.planner.units import format_bytes, parse_size

__all__ = ["format_bytes", "parse_size"]
