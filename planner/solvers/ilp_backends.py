"""The OR-Tools backends of the ILP: thin adapters under the one model of ``ilp_model``.

The model is written once, in linear constraints over booleans and bounded non-negative
quantities. An adapter maps it onto one OR-Tools API and owns only what differs:

* :class:`MipBackend` (``pywraplp``: CBC, HiGHS, SCIP): quantities are continuous, sizes
  stay fractional KiB, a conditional constraint is a big-M term, and when minimising the
  peak a tiny secondary term prefers the cheaper of equal peaks.
* :class:`CpSatBackend` (CP-SAT): quantities are integers, so every size is rounded *up*
  to whole KiB and the budget *down* (the integer model stays an upper bound of the
  bytes); a conditional constraint is an enforcement literal (``OnlyEnforceIf``), which
  CP-SAT propagates far better than a MIP's LP relaxation handles big-M; and a hint can
  be completed by a short solve (see :meth:`CpSatBackend.hint`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ortools.linear_solver import pywraplp
from ortools.sat.python import cp_model

from ..errors import SolverError

KIB = 1024
# Above this many decision units CP-SAT's presolve skips probing (BENCHMARKS.md, "ILP
# solve time": probing cost 1.1 s of a 5 s budget on a 962-unit model, bought nothing)
PROBING_UNITS = 400


class MipBackend:
    integral = False

    def __init__(self, backend: str, options):
        solver = pywraplp.Solver.CreateSolver(backend)
        if solver is None:
            raise SolverError(f"OR-Tools backend {backend!r} is not available; use HIGHS, "
                              f"SCIP, CBC or CP_SAT")
        solver.SuppressOutput()
        self.solver = solver
        self.backend = backend
        self.options = options

    # ---- building ----------------------------------------------------------------------
    def size(self, kib: float) -> float:
        return kib

    def budget(self, budget_bytes: int) -> float:
        return budget_bytes / KIB

    def cost(self, micros: float) -> float:
        return micros

    def zero_unless(self, var, literal) -> None:
        """Nothing: the MIP leaves an unused quantity to the objective-free bound."""

    def boolean(self, name: str):
        return self.solver.BoolVar(name)

    def indicator(self, name: str):
        """A 0/1 quantity the objective never rewards: continuous is enough for a MIP."""
        return self.solver.NumVar(0, 1, name)

    def quantity(self, upper: float, name: str):
        return self.solver.NumVar(0, self.solver.infinity(), name)

    def total(self, terms: Sequence):
        constant = sum(t for t in terms if isinstance(t, (int, float)))
        variables = [t for t in terms if not isinstance(t, (int, float))]
        return constant + self.solver.Sum(variables) if variables else constant

    def add(self, constraint) -> None:
        self.solver.Add(constraint)

    def add_if(self, low, high, literal, big_m: float) -> None:
        """``low >= high`` where ``literal`` is 1."""
        self.solver.Add(low >= high - big_m * (1 - literal))

    def minimize(self, peak, micros, *, peak_first: bool) -> None:
        if peak_first:
            self.solver.Minimize(peak + 1e-9 * micros)
        else:
            self.solver.Minimize(micros * 1e-3)  # milliseconds: better scaled for the LP

    def configure(self, units: int) -> None:
        options = self.options
        self.set_time_limit(options.time_limit_seconds, units)
        if self.backend != "CBC":  # CBC here is single-threaded; it prints an error
            self.solver.SetNumThreads(options.workers)
        # HiGHS prints a banner on stdout (which would corrupt --json) unless output_flag
        # is off; pywraplp reports False for these HiGHS strings but applies them.
        seeds = {"HIGHS": f"output_flag = false\nrandom_seed = {options.seed}",
                 "SCIP": f"randomization/randomseedshift = {options.seed}"}
        if self.backend in seeds:
            self.solver.SetSolverSpecificParametersAsString(seeds[self.backend])

    # ---- solving -----------------------------------------------------------------------
    def set_time_limit(self, seconds: float, units: int) -> None:
        if self.backend == "CBC":
            # CBC checks its (CPU-time) limit between phases of its root search: on a
            # 962-unit ViT it stopped 0.9 s late, whatever the limit; about 1 ms a unit
            seconds = max(seconds / 2, seconds - 1e-3 * units)
        self.solver.SetTimeLimit(int(seconds * 1000))

    def hint(self, values: list[tuple[object, int]], complete_seconds: float) -> None:
        """Hint the decisions; the MIP completes a partial hint itself (None: nothing to
        report)."""
        if self.backend == "HIGHS":
            # pywraplp's SetHint crashes the HiGHS backend (segfault in Solve, OR-Tools
            # 9.15.6755, reproduced on a 5-variable model); HiGHS runs without a hint.
            return None
        self.solver.SetHint([var for var, _ in values], [float(v) for _, v in values])
        return None

    def solve(self) -> str:
        status = self.solver.Solve()
        return {pywraplp.Solver.OPTIMAL: "optimal", pywraplp.Solver.FEASIBLE: "feasible",
                pywraplp.Solver.INFEASIBLE: "infeasible",
                pywraplp.Solver.MODEL_INVALID: "model_invalid"}.get(status, "unknown")

    def value(self, var) -> float:
        return var.solution_value()

    def objective(self, *, peak_first: bool) -> tuple[float, float]:
        """(objective, bound) in the objective's own unit (ms, or KiB for the peak)."""
        objective = self.solver.Objective()
        return objective.Value(), objective.BestBound()

    def objective_seconds(self, value: float) -> float:
        return value / 1e3


class CpSatBackend:
    integral = True

    def __init__(self, backend: str, options):
        self.model = cp_model.CpModel()
        self.solver = cp_model.CpSolver()
        self.backend = backend
        self.options = options

    def size(self, kib: float) -> int:
        return int(math.ceil(kib - 1e-9))

    def budget(self, budget_bytes: int) -> int:
        return budget_bytes // KIB  # rounded down: the integer model fits inside

    def cost(self, micros: float) -> int:
        return int(round(micros))

    def zero_unless(self, var, literal) -> None:
        """``var`` is 0 where ``literal`` is 0 (a tightening CP-SAT propagates)."""
        self.model.Add(var == 0).OnlyEnforceIf(literal.Not())

    def boolean(self, name: str):
        return self.model.NewBoolVar(name)

    indicator = boolean

    def quantity(self, upper: float, name: str):
        return self.model.NewIntVar(0, int(math.ceil(upper)), name)

    def total(self, terms: Sequence):
        return sum(terms)

    def add(self, constraint) -> None:
        self.model.Add(constraint)

    def add_if(self, low, high, literal, big_m: float) -> None:
        self.model.Add(low >= high).OnlyEnforceIf(literal)

    def minimize(self, peak, micros, *, peak_first: bool) -> None:
        if peak_first:
            self.model.Minimize(peak)
        else:
            self.model.Minimize(micros)

    def configure(self, units: int) -> None:
        parameters = self.solver.parameters
        parameters.max_time_in_seconds = self.options.time_limit_seconds
        parameters.num_workers = self.options.workers
        parameters.random_seed = self.options.seed
        if self.options.work_limit is not None:
            # repeatable: one worker stopped by deterministic work, not by the clock
            parameters.num_workers = 1
            parameters.max_deterministic_time = self.options.work_limit
        if units > PROBING_UNITS:
            parameters.cp_model_probing_level = 0

    def set_time_limit(self, seconds: float, units: int) -> None:
        if self.options.work_limit is None:
            self.solver.parameters.max_time_in_seconds = seconds

    def hint(self, values: list[tuple[object, int]], complete_seconds: float) -> bool:
        """Hint the decisions; with ``complete_seconds`` > 0, complete the hint.

        A hint of the decisions alone leaves CP-SAT to find the thousands of auxiliary
        values (retention, prefix sums, region chains) itself: on a 962-unit model it took
        5-8 s to turn the greedy hint into a first solution. Completing it is one short
        solve of a copy of the model with the decisions fixed (0.3 s there); CP-SAT then
        starts from a complete, feasible hint. Returns whether the hint was completed
        (False also when the decisions do not fit the model's conservative memory bound).
        """
        if complete_seconds > 0:
            copy = self.model.Clone()
            for var, value in values:
                copy.Add(copy.GetBoolVarFromProtoIndex(var.Index()) == value)
            solver = cp_model.CpSolver()
            solver.parameters.num_workers = 1
            if self.options.work_limit is not None:  # repeatable, as the search itself
                solver.parameters.max_deterministic_time = complete_seconds
                solver.parameters.max_time_in_seconds = 60 * complete_seconds
            else:
                solver.parameters.max_time_in_seconds = complete_seconds
            solver.parameters.stop_after_first_solution = True
            solver.parameters.random_seed = self.solver.parameters.random_seed
            if solver.Solve(copy) in (cp_model.OPTIMAL, cp_model.FEASIBLE):
                solution = solver.ResponseProto().solution
                for index in range(len(self.model.Proto().variables)):
                    self.model.AddHint(self.model.GetIntVarFromProtoIndex(index),
                                       solution[index])
                return True
        for var, value in values:
            self.model.AddHint(var, value)
        return False

    def solve(self) -> str:
        status = self.solver.Solve(self.model)
        return {cp_model.OPTIMAL: "optimal", cp_model.FEASIBLE: "feasible",
                cp_model.INFEASIBLE: "infeasible",
                cp_model.MODEL_INVALID: "model_invalid"}.get(status, "unknown")

    def value(self, var) -> float:
        return self.solver.Value(var)

    def objective(self, *, peak_first: bool) -> tuple[float, float]:
        return self.solver.ObjectiveValue(), self.solver.BestObjectiveBound()

    def objective_seconds(self, value: float) -> float:
        return value / 1e6


def backend_for(name: str, options):
    return CpSatBackend(name, options) if name == "CP_SAT" else MipBackend(name, options)
