"""The ILP of ``ilp.py`` written for CP-SAT: integers and enforcement literals.

Same variables and constraints as the MIP in ``ilp.py`` (see its docstring), with two
changes that CP-SAT needs or likes: sizes are integer KiB rounded *up* per storage and
the budget is rounded *down* (so the integer model stays an upper bound of the bytes),
and the region chain uses enforcement literals (``OnlyEnforceIf``) instead of big-M
terms, which CP-SAT propagates far better than a MIP's LP relaxation handles big-M.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ortools.sat.python import cp_model

from ..costmodel import CostModel

KIB = 1024
# Above this many decision units presolve skips probing (measured in BENCHMARKS.md).
PROBING_UNITS = 400


def _up(value_kib: float) -> int:
    return int(math.ceil(value_kib - 1e-9))


class CpSatModel:
    def __init__(self, facts, costs: CostModel, budget_bytes: int | None, options):
        self.facts = facts
        model = cp_model.CpModel()
        self.model = model
        order = facts.order
        n = len(order)
        unit_count = max(facts.unit_of.values(), default=-1) + 1
        self.r = [model.NewBoolVar(f"r_{g}") for g in range(unit_count)]
        size = {key: _up(facts.size[key]) for key in facts.storages}
        total = sum(size.values()) + 1
        horizon = _up(facts.fixed) + total * 3 + _up(max(facts.backward_base, default=0)) + _up(
            max(facts.backward_extra, default=0)) + _up(max(facts.forward_extra, default=0)) + 1

        def r_at(i: int):
            unit = facts.unit_of.get(order[i])
            return None if unit is None else self.r[unit]

        if budget_bytes is None:
            budget = model.NewIntVar(0, horizon, "peak")
            self.peak_var = budget
        else:
            budget = budget_bytes // KIB  # rounded down: the integer model fits inside
            self.peak_var = None

        h: dict[str, object] = {}
        for key, why in facts.retention.items():
            if why.always or why.never:
                h[key] = 1 if why.always else 0
                continue
            var = model.NewBoolVar(f"h_{key}")
            h[key] = var
            for unit in why.savers:
                model.AddBoolOr([self.r[unit], var])  # a kept saver holds it for backward
            for index, (reader, span) in enumerate(why.region_inputs):
                if span is None:  # the reader's region starts after the provider
                    model.AddImplication(self.r[reader], var)
                    continue
                same = model.NewBoolVar(f"z_{key}_{index}")
                for unit in span:
                    model.AddImplication(same, self.r[unit])  # one region: all recompute
                model.AddBoolOr([self.r[reader].Not(), same, var])  # region saves inputs

        # compression: c[node, option] (at most one option; never with recomputation; only
        # for a storage held for backward, which it then holds packed)
        self.c: dict[tuple[str, str], object] = {}
        saving: dict[str, list] = {}
        forward_delta = [[] for _ in range(n + 2)]   # packed copy from producer to end_read
        backward_delta = [[] for _ in range(n + 2)]  # unpacked again up to its last use
        region_fresh = [[] for _ in range(n + 2)]    # unpacked for a region's replay
        compress_micros = []
        for item in facts.compress:
            held = h[item.key]
            if isinstance(held, int) and held == 0:
                continue
            literals = []
            for name, packed_kib, micros, _error in item.options:
                packed = _up(packed_kib)
                if packed >= size[item.key]:
                    continue
                var = model.NewBoolVar(f"c_{item.node}_{name}")
                self.c[item.node, name] = var
                literals.append(var)
                if not isinstance(held, int):
                    model.AddImplication(var, held)
                saving.setdefault(item.key, []).append((size[item.key] - packed, var))
                forward_delta[item.producer].append((packed, var))
                forward_delta[item.end_read + 1].append((-packed, var))
                # unpacked next to the packed copy, at full size
                backward_delta[item.producer].append((size[item.key], var))
                backward_delta[item.last_use + 1].append((-size[item.key], var))
                compress_micros.append((int(round(micros)), var))
                for reader in item.readers:  # a recomputed reader's region unpacks it
                    region_fresh[reader].append((size[item.key], var))
            if literals:
                unit = [self.r[item.unit]] if item.unit is not None else []
                model.Add(sum(literals + unit) <= 1)

        def running(deltas, label):
            """Per position, the running sum of the deltas (an IntVar where it changes)."""
            values, current = [], 0
            for i in range(n):
                if deltas[i]:
                    var = model.NewIntVar(0, total, f"{label}_{i}")
                    model.Add(var == current + sum(k * v for k, v in deltas[i]))
                    current = var
                values.append(current)
            return values

        packed_forward = running(forward_delta, "P")
        unpacked_backward = running(backward_delta, "U")

        def retained(keys):
            return sum(size[key] * h[key] - sum(k * v for k, v in saving.get(key, ()))
                       for key in keys)

        by_end: dict[int, list[str]] = {}
        live_delta = [0] * (n + 1)
        for key in facts.storages:
            by_end.setdefault(facts.end_read[key], []).append(key)
            live_delta[facts.producer[key] + 1] += size[key]
            live_delta[facts.end_read[key] + 1] -= size[key]
        live = 0
        previous = 0
        fixed = _up(facts.fixed)
        # every region holds its saved RNG state: count region starts
        starts = []
        for i in range(n):
            r = r_at(i)
            if r is None:
                continue
            before = r_at(i - 1) if i > 0 else None
            start = model.NewBoolVar(f"start_{i}")
            if before is None:
                model.AddImplication(r, start)
            else:
                model.AddBoolOr([r.Not(), before, start])  # r and not before -> start
            starts.append(start)
        if starts and facts.region_kib > 0:
            # one variable for the regions' bytes: inlining the sum into every memory
            # constraint made the model quadratic (2.8 M terms on a 966-node ViT, 7.7 s of
            # presolve before any search)
            regions = model.NewIntVar(0, _up(facts.region_kib) * len(starts), "regions")
            model.Add(regions == _up(facts.region_kib) * sum(starts))
            fixed = fixed + regions
        for i in range(n):
            live += live_delta[i]
            prefix = model.NewIntVar(0, total, f"Rf_{i}")
            model.Add(prefix == previous + retained(by_end.get(i - 1, [])))
            previous = prefix
            model.Add(fixed + live + prefix + packed_forward[i]
                      + _up(facts.forward_extra[i]) <= budget)

        by_free: dict[int, list[str]] = {}
        for key in facts.storages:
            by_free.setdefault(facts.free_from[key], []).append(key)
        temps = [_up(costs.node[name].temp_bytes / KIB) for name in order]
        running = 0
        a_previous = None
        t_previous = None
        for i in range(n):
            prefix = model.NewIntVar(0, total, f"Rb_{i}")
            model.Add(prefix == running + retained(by_free.get(i, [])))
            running = prefix
            r = r_at(i)
            base = _up(facts.backward_base[i]) + unpacked_backward[i]
            if r is None:
                a_previous = t_previous = None
                model.Add(fixed + prefix + base + _up(facts.backward_extra[i]) <= budget)
                continue
            a = model.NewIntVar(0, 2 * total, f"a_{i}")
            fresh = sum(size[key] * (1 - h[key]) for key in facts.produced[i]) + sum(
                k * v for k, v in region_fresh[i])
            model.Add(a >= (a_previous if a_previous is not None else 0) + fresh
                      ).OnlyEnforceIf(r)  # a region's re-made bytes accumulate
            model.Add(a == 0).OnlyEnforceIf(r.Not())
            tau = model.NewIntVar(0, max(temps) if temps else 0, f"tau_{i}")
            model.Add(tau >= temps[i]).OnlyEnforceIf(r)
            if t_previous is not None:
                model.Add(tau >= t_previous).OnlyEnforceIf(r)
            a_previous, t_previous = a, tau
            model.Add(fixed + prefix + a + base + tau <= budget)  # the recomputation
            model.Add(fixed + prefix + a + base + _up(facts.backward_extra[i]) <= budget)

        micros: dict[int, int] = {}
        for name, unit in facts.unit_of.items():
            micros[unit] = micros.get(unit, 0) + int(round(
                costs.node[name].forward_seconds * 1e6))
        self.micros = micros
        recompute = sum(micros.get(g, 0) * self.r[g] for g in range(unit_count)) + sum(
            k * v for k, v in compress_micros)
        if budget_bytes is None:
            model.Minimize(budget)
        else:
            model.Minimize(recompute)
        self.solver = cp_model.CpSolver()
        self.solver.parameters.max_time_in_seconds = options.time_limit_seconds
        self.solver.parameters.num_workers = options.workers
        self.solver.parameters.random_seed = options.seed
        if unit_count > PROBING_UNITS:
            # presolve's probing costs 1.1 s of a 5 s budget on a 962-unit model and
            # bought nothing there (BENCHMARKS.md, "ILP solve time")
            self.solver.parameters.cp_model_probing_level = 0

    def set_time_limit(self, seconds: float) -> None:
        self.solver.parameters.max_time_in_seconds = seconds

    def hint(self, decisions: Mapping[str, str], *, complete_seconds: float = 0.0) -> bool:
        """Hint the decisions; with ``complete_seconds`` > 0, complete the hint.

        A hint of the decisions alone leaves CP-SAT to find the thousands of auxiliary
        values (retention, prefix sums, region chains) itself: on a 962-unit model it took
        5-8 s to turn the greedy hint into a first solution. Completing it is one short
        solve of a copy of the model with the decisions fixed (0.3 s there); CP-SAT then
        starts from a complete, feasible hint. Returns whether the hint was completed
        (False also when the decisions do not fit the model's conservative memory bound).
        """
        values: dict[int, int] = {}
        for name, unit in self.facts.unit_of.items():  # a tied unit recomputes if all do
            recompute = 1 if decisions.get(name) == "recompute" else 0
            values[unit] = min(values.get(unit, 1), recompute)
        fixed = [(var, values.get(g, 0)) for g, var in enumerate(self.r)] + [
            (var, 1 if decisions.get(node) == f"compress:{name}" else 0)
            for (node, name), var in self.c.items()]
        if complete_seconds > 0:
            copy = self.model.Clone()
            for var, value in fixed:
                copy.Add(copy.GetBoolVarFromProtoIndex(var.Index()) == value)
            solver = cp_model.CpSolver()
            solver.parameters.num_workers = 1
            solver.parameters.max_time_in_seconds = complete_seconds
            solver.parameters.stop_after_first_solution = True
            solver.parameters.random_seed = self.solver.parameters.random_seed
            if solver.Solve(copy) in (cp_model.OPTIMAL, cp_model.FEASIBLE):
                solution = solver.ResponseProto().solution
                for index in range(len(self.model.Proto().variables)):
                    self.model.AddHint(self.model.GetIntVarFromProtoIndex(index),
                                       solution[index])
                return True
        for var, value in fixed:
            self.model.AddHint(var, value)
        return False

    def solve(self) -> tuple[str, dict[str, str], float | None, float | None]:
        """(status, decisions, objective seconds, bound seconds)."""
        status = self.solver.Solve(self.model)
        names = {cp_model.OPTIMAL: "optimal", cp_model.FEASIBLE: "feasible",
                 cp_model.INFEASIBLE: "infeasible", cp_model.MODEL_INVALID: "model_invalid"}
        state = names.get(status, "unknown")
        if state not in ("optimal", "feasible"):
            return state, {}, None, None
        decisions = {name: "recompute" if self.solver.Value(self.r[unit]) else "keep"
                     for name, unit in self.facts.unit_of.items()}
        for (node, name), var in self.c.items():
            if self.solver.Value(var):
                decisions[node] = f"compress:{name}"
        return (state, decisions, self.solver.ObjectiveValue() / 1e6,
                self.solver.BestObjectiveBound() / 1e6)
