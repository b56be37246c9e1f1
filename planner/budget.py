"""Budget: the peak memory one training step may use, in bytes or as a fraction.

A fraction ``f`` means: the fixed costs of a step (parameters, buffers, gradients,
optimizer state and the batch) plus ``f`` times the rest of the keep-all peak (what the
activations, their gradients and the temporaries take). So ``f = 1`` is the keep-all
peak and ``f = 0`` the fixed costs alone, which no plan reaches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .costmodel import CostModel
from .errors import BadInputError
from .units import parse_size


@dataclass(frozen=True, kw_only=True)
class Budget:
    """Exactly one of ``bytes``, ``fraction`` or ``minimum``."""

    bytes: int | None = None
    """An absolute peak in bytes."""
    fraction: float | None = None
    """A share of the keep-all activation memory on top of the fixed costs."""
    minimum: bool = False
    """The smallest peak the allowed decisions reach (``budget="min"``)."""

    def __post_init__(self):
        if (self.bytes is not None) + (self.fraction is not None) + self.minimum != 1:
            raise BadInputError("expected a budget in bytes, as a fraction or min; found "
                                "none or several")
        if self.bytes is not None and self.bytes <= 0:
            raise BadInputError(f"expected a positive budget; found {self.bytes} B")
        if self.fraction is not None and not (math.isfinite(self.fraction)
                                              and 0 < self.fraction <= 1.5):
            raise BadInputError(f"expected a budget fraction in (0, 1.5]; found "
                                f"{self.fraction}")

    @classmethod
    def of(cls, value) -> Budget:
        """From a Budget, bytes (int), or a size string such as ``512MB``."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, str) and value.strip().lower() == "min":
            return cls(minimum=True)
        return cls(bytes=parse_size(value, what="budget"))

    def resolve(self, costs: CostModel, keep_all_peak_bytes: int) -> int:
        if self.minimum:
            raise BadInputError("a minimum budget is resolved by the planner's least-peak "
                                "search, not from the costs; this is a bug in fedplan")
        if self.bytes is not None:
            return int(self.bytes)
        floor = fixed_floor(costs)
        return int(floor + self.fraction * max(0, keep_all_peak_bytes - floor))


def fixed_floor(costs: CostModel) -> int:
    """Parameters, buffers, gradients, optimizer state and the batch."""
    return costs.fixed_bytes + costs.grad_bytes
