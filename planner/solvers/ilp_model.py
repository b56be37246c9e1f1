"""The ILP over keep/recompute/compress decisions, written once for every backend.

Variables (one per decision unit, see ``planner.candidates``; the facts come from the
step program through ``ilp._facts``):

* ``r[g]`` boolean: the unit is recomputed (runs in a checkpoint region);
* ``h[k]`` 0/1: storage ``k`` is retained for backward (its saver is kept, or it is the
  input of a region); the objective never rewards ``h``, so it is 1 exactly when a
  constraint forces it;
* ``z[u, c]`` 0/1: producer ``u`` and consumer ``c`` lie in one region (every node from
  ``u`` to ``c`` recomputed);
* ``c[node, option]`` boolean: the node's output storage is held packed for backward;
* ``a[i]`` >= 0: bytes recomputed for the region around position ``i`` that are live when
  backward reaches ``i`` (a running sum that restarts at every kept node); ``tau[i]`` the
  largest forward temporary of that region so far;
* prefix sums ``Rf`` and ``Rb`` of retained bytes in forward and backward order, so each
  memory constraint has a constant number of terms and the model stays linear in size.

Constraints: a memory inequality at every forward position, every backward position and
at every region's recomputation, each an upper bound on what the simulator replays (the
backward bounds free a retained storage only once backward passes its producer, which is
never earlier than the runtime frees it). Objective: the seconds of forward work
recomputed plus the seconds of packing, or the peak when minimising it.

Sizes are in KiB. The backend adapter (``ilp_backends``) decides how a size, the budget
and a conditional constraint are expressed (fractional and big-M for a MIP; rounded up,
rounded down and enforcement literals for CP-SAT).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..costmodel import CostModel
from .ilp_backends import backend_for

KIB = 1024.0


class IlpModel:
    """The model for one budget (or to minimise the peak when ``budget_bytes`` is None)."""

    def __init__(self, facts, costs: CostModel, budget_bytes: int | None, options):
        self.facts = facts
        b = self.backend = backend_for(options.backend, options)
        order = facts.order
        n = len(order)
        unit_count = max(facts.unit_of.values(), default=-1) + 1
        self.units = unit_count
        self.r = [b.boolean(f"r_{g}") for g in range(unit_count)]
        size = {key: b.size(facts.size[key]) for key in facts.storages}
        total = sum(size.values()) + 1

        def r_at(i: int):
            unit = facts.unit_of.get(order[i])
            return None if unit is None else self.r[unit]

        self.peak_first = budget_bytes is None
        if budget_bytes is None:
            horizon = (b.size(facts.fixed) + total * 3
                       + b.size(max(facts.backward_base, default=0))
                       + b.size(max(facts.backward_extra, default=0))
                       + b.size(max(facts.forward_extra, default=0)) + 1)
            budget = b.quantity(horizon, "peak")
        else:
            budget = b.budget(budget_bytes)

        # every region holds its saved RNG state: count region starts
        fixed = b.size(facts.fixed)
        starts = []
        for i in range(n):
            r = r_at(i)
            if r is None:
                continue
            before = r_at(i - 1) if i > 0 else None
            start = b.indicator(f"start_{i}")
            b.add(start >= r - (before if before is not None else 0))
            starts.append(start)
        if starts and facts.region_kib > 0:
            # one variable for the regions' bytes: inlining the sum into every memory row
            # made the model quadratic (2.8 M terms on a 966-node ViT, 7.7 s of presolve)
            region = b.size(facts.region_kib)
            regions = b.quantity(region * len(starts), "regions")
            b.add(regions == region * b.total(starts))
            fixed = fixed + regions

        # retention h[k]: 1 if a kept saver holds k, or k feeds a region from outside it
        h: dict[str, object] = {}
        for key, why in facts.retention.items():
            if why.always or why.never:
                h[key] = 1 if why.always else 0
                continue
            var = b.indicator(f"h_{key}")
            h[key] = var
            for unit in why.savers:
                b.add(var >= 1 - self.r[unit])  # a kept saver holds it for backward
            for index, (reader, span) in enumerate(why.region_inputs):
                if span is None:  # the reader's region starts after the provider
                    b.add(var >= self.r[reader])
                    continue
                same = b.indicator(f"z_{key}_{index}")
                for unit in span:
                    b.add(same <= self.r[unit])  # one region: every node recomputes
                b.add(var >= self.r[reader] - same)  # a region saves outside inputs

        # compression: c[node, option], at most one option, never with recomputation, only
        # for a storage held for backward (which it then holds packed)
        self.c: dict[tuple[str, str], object] = {}
        saving: dict[str, list] = {}
        forward_delta = [[] for _ in range(n + 2)]   # packed copy from producer to end_read
        backward_delta = [[] for _ in range(n + 2)]  # unpacked again up to its last use
        region_fresh = [[] for _ in range(n + 2)]    # unpacked for a region's replay
        compress_micros = []
        for item in facts.compress:
            held = h[item.key]
            constant = isinstance(held, int)  # 0 or 1 (a variable otherwise)
            if constant and held == 0:
                continue
            literals = []
            full = size[item.key]
            for name, packed_kib, micros, _error in item.options:
                packed = b.size(packed_kib)
                if packed >= full:
                    continue
                var = b.boolean(f"c_{item.node}_{name}")
                self.c[item.node, name] = var
                literals.append(var)
                if not constant:
                    b.add(var <= held)
                saving.setdefault(item.key, []).append((full - packed, var))
                forward_delta[item.producer].append((packed, var))
                forward_delta[item.end_read + 1].append((-packed, var))
                backward_delta[item.producer].append((full, var))  # next to the packed
                backward_delta[item.last_use + 1].append((-full, var))
                compress_micros.append((b.cost(micros), var))
                for reader in item.readers:  # a recomputed reader's region unpacks it
                    region_fresh[reader].append((full, var))
            if literals:
                unit = [self.r[item.unit]] if item.unit is not None else []
                b.add(b.total(literals + unit) <= 1)

        def running(deltas, label):
            """Per position, the running sum of the deltas (a variable where it changes)."""
            values, current = [], 0
            for i in range(n):
                if deltas[i]:
                    var = b.quantity(total, f"{label}_{i}")
                    b.add(var == current + b.total([k * v for k, v in deltas[i]]))
                    current = var
                values.append(current)
            return values

        packed_forward = running(forward_delta, "P")
        unpacked_backward = running(backward_delta, "U")

        def retained(keys) -> list:
            terms = []
            for key in keys:
                terms.append(size[key] * h[key])
                terms.extend(-k * v for k, v in saving.get(key, ()))
            return terms

        # forward: storages still to be read are live; older ones only if retained
        by_end: dict[int, list[str]] = {}
        live_delta = [0] * (n + 1)
        for key in facts.storages:
            by_end.setdefault(facts.end_read[key], []).append(key)
            live_delta[facts.producer[key] + 1] += size[key]
            live_delta[facts.end_read[key] + 1] -= size[key]
        live = 0
        previous = 0
        for i in range(n):
            live += live_delta[i]
            prefix = b.quantity(total, f"Rf_{i}")
            b.add(prefix == previous + b.total(retained(by_end.get(i - 1, []))))
            previous = prefix  # retained, read before i
            b.add(fixed + live + prefix + packed_forward[i]
                  + b.size(facts.forward_extra[i]) <= budget)

        # backward: retained storages are held until backward passes their producer
        by_free: dict[int, list[str]] = {}
        for key in facts.storages:
            by_free.setdefault(facts.free_from[key], []).append(key)
        temps = [b.size(costs.node[name].temp_bytes / KIB) for name in order]
        max_temp = max(temps, default=0)
        running_prefix = 0
        a_previous = t_previous = None
        a_bound = 0  # the most a_previous can be: the big-M of the region chain
        for i in range(n):
            prefix = b.quantity(total, f"Rb_{i}")  # may still be live at backward position i
            b.add(prefix == running_prefix + b.total(retained(by_free.get(i, []))))
            running_prefix = prefix
            base = b.size(facts.backward_base[i]) + unpacked_backward[i]
            extra = b.size(facts.backward_extra[i])
            r = r_at(i)
            if r is None:
                a_previous = t_previous = None
                a_bound = 0
                b.add(fixed + prefix + base + extra <= budget)
                continue
            # a: bytes a region re-materialises up to i (storages produced inside it and
            # not retained anyway, and compressed inputs it unpacks); restarts at a kept node
            fresh = [size[key] * (1 - h[key]) for key in facts.produced[i]]
            fresh += [k * v for k, v in region_fresh[i]]
            a = b.quantity(2 * total, f"a_{i}")
            before = a_previous if a_previous is not None else 0
            a_bound += sum(size[key] for key in facts.produced[i])
            a_bound += sum(k for k, _ in region_fresh[i])
            b.add_if(a, before + b.total(fresh), r, big_m=a_bound)
            b.zero_unless(a, r)
            tau = b.quantity(max_temp, f"tau_{i}")  # the region's largest temporary so far
            b.add_if(tau, temps[i], r, big_m=temps[i])
            if t_previous is not None:
                b.add_if(tau, t_previous, r, big_m=max_temp)
            a_previous, t_previous = a, tau
            b.add(fixed + prefix + a + base + tau <= budget)  # the recomputation itself
            b.add(fixed + prefix + a + base + extra <= budget)

        # objective: recompute and packing seconds, or the peak when minimising it
        micros: dict[int, float] = {}
        for name, unit in facts.unit_of.items():
            micros[unit] = micros.get(unit, 0) + b.cost(costs.node[name].forward_seconds * 1e6)
        cost = b.total([micros.get(g, 0) * self.r[g] for g in range(unit_count)]
                       + [k * v for k, v in compress_micros])
        b.minimize(budget, cost, peak_first=self.peak_first)
        b.configure(unit_count)

    def set_time_limit(self, seconds: float) -> None:
        self.backend.set_time_limit(seconds, self.units)

    def hint(self, decisions: Mapping[str, str], *, complete_seconds: float = 0.0
             ) -> bool | None:
        """Hint the decisions (a tied unit recomputes if all its nodes do); CP-SAT
        completes the hint with a short solve when ``complete_seconds`` > 0 and returns
        whether it did; a MIP backend completes a hint itself (None)."""
        values: dict[int, int] = {}
        for name, unit in self.facts.unit_of.items():
            recompute = 1 if decisions.get(name) == "recompute" else 0
            values[unit] = min(values.get(unit, 1), recompute)
        fixed = [(var, values.get(g, 0)) for g, var in enumerate(self.r)] + [
            (var, 1 if decisions.get(node) == f"compress:{name}" else 0)
            for (node, name), var in self.c.items()]
        return self.backend.hint(fixed, complete_seconds)

    def solve(self) -> tuple[str, dict[str, str], float | None, float | None]:
        """(status, decisions, objective seconds, bound seconds)."""
        b = self.backend
        state = b.solve()
        if state not in ("optimal", "feasible"):
            return state, {}, None, None
        decisions = {name: "recompute" if b.value(self.r[unit]) > 0.5 else "keep"
                     for name, unit in self.facts.unit_of.items()}
        for (node, name), var in self.c.items():
            if b.value(var) > 0.5:
                decisions[node] = f"compress:{name}"
        objective, bound = b.objective(peak_first=self.peak_first)
        return state, decisions, b.objective_seconds(objective), b.objective_seconds(bound)
