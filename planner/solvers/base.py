"""What every solver shares: options, the result type, the registry, and two plain facts
of a plan (its added seconds and the last forward readers of its compressed storages).

Solvers import this module and nothing of the package's ``__init__``, so the package
(which imports every solver to register it) and the solvers form no import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..costmodel import CostModel
from ..errors import BadInputError
from ..ir import PlanGraph
from ..packing import compress_seconds


class NoPlanFound(Exception):  # noqa: N818 - a signal between a solver and solve(), not an error
    """A solver found no plan (its reason in the message); ``solve`` then searches from the
    plan of least peak, or reports the budget infeasible with the smallest peak."""


@dataclass(frozen=True, kw_only=True)
class SolverOptions:
    """Knobs shared by the solvers; each ignores what it does not use."""

    time_limit_seconds: float = 30.0
    """Wall-clock limit for an exact solver; the best plan found by then is returned."""
    workers: int = 8
    """Threads for CP-SAT (it needs about 8 on 2 cores to prove optimality) and the
    multi-threaded MIP backends; CBC here is single-threaded."""
    seed: int = 0
    """Random seed passed to the backend, so runs repeat."""
    backend: str = "CBC"
    """OR-Tools backend for ``ilp``: CBC (default), CP_SAT, HIGHS or SCIP. Measured in
    BENCHMARKS.md ("ILP solve time"): CBC's cuts and feasibility pump reach plans within
    0.1-2% of optimal on 1,000-node graphs in a few seconds, where CP-SAT's search was
    still 80% above; on the example models CBC proved optimality as fast or faster. Its
    time limit counts CPU seconds (one thread)."""
    work_limit: float | None = None
    """CP-SAT only: stop on CP-SAT's deterministic work (its own units, about a second of
    one core each) instead of the clock, with one worker, so the answer is the same on an
    idle and on a loaded machine (``time_limit_seconds`` then only caps the wall time).
    The least-peak search always runs this way."""
    warm_start: bool = True
    """Hint the ILP with the greedy plan."""
    safety_fraction: float = 0.01
    """Plans aim below the budget by this share of (budget - fixed costs), plus
    ``safety_bytes``: room for what checkpointing itself allocates (saved RNG states,
    BatchNorm statistics kept across a replay) that the simulator does not model. A plan
    that recomputes nothing needs no margin."""
    safety_bytes: int = 64 * 1024
    compress: bool = False
    """Let ``ilp`` compress activations (``planner.compression``) as well as recompute
    them. The cost model must carry compression costs (``analyze(compress=True)``)."""
    min_bits: int = 4
    """The lowest (mean) code width ``ilp`` may choose: 8, 4, 3 (channel-wise mixed) or 2."""
    error_weight: float = 1.0
    """Weight of the compression error in the ILP's objective: a compressed tensor adds
    ``error_weight * forward seconds of the model * its relative error`` to the added
    seconds (see ``planner.compression``)."""

    def __post_init__(self):
        if self.min_bits not in (2, 3, 4, 8):
            raise BadInputError(f"expected min_bits of 2, 3, 4 or 8; found {self.min_bits}")
        if self.error_weight < 0:
            raise BadInputError(f"expected error_weight >= 0; found {self.error_weight}")
        if self.time_limit_seconds <= 0:
            raise BadInputError(f"expected a positive time limit; found "
                                f"{self.time_limit_seconds}")
        if self.workers < 1:
            raise BadInputError(f"expected workers >= 1; found {self.workers}")


@dataclass(frozen=True)
class SolveResult:
    decisions: dict[str, str]
    status: str                # optimal | feasible | heuristic | baseline
    objective: float           # added seconds of recomputation (the solver's objective)
    bound: float | None = None
    notes: tuple[str, ...] = field(default=())


Solver = Callable[[PlanGraph, CostModel, int, SolverOptions], SolveResult]
_REGISTRY: dict[str, Solver] = {}
BASELINES = ("none", "all", "sqrt")  # fixed schemes: no safety margin, no adaptation


def register(name: str) -> Callable[[Solver], Solver]:
    def decorate(function: Solver) -> Solver:
        _REGISTRY[name] = function
        return function
    return decorate


def solver_names() -> list[str]:
    return sorted(_REGISTRY)


def get_solver(name: str) -> Solver:
    if name not in _REGISTRY:
        raise BadInputError(f"unknown solver {name!r}; valid solvers: "
                            f"{', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def overhead_seconds(costs: CostModel, decisions: dict[str, str]) -> float:
    """Added seconds: forward work recomputed plus packing and unpacking compressed ones."""
    return sum(costs.node[name].forward_seconds
               for name, decision in decisions.items()
               if decision == "recompute") + compress_seconds(costs, decisions)
