"""Client selection behind one interface: ``random``, ``exclude``, ``oort``, ``fedhybrid``.

A selector sees one :class:`Candidate` per client (what the server knows before the
round: budget, speed, sample count, whether any plan fits, whether keep-all fits, the
device's predicted step time under its plan), returns ``k`` client ids, and is told what
each selected client reported (:meth:`Selector.observe`) or that it failed
(:meth:`Selector.observe_failure`). Selectors hold no global state: randomness comes from
the ``numpy.random.Generator`` the server passes in (one per round, derived from the
seed), and :meth:`Selector.state_dict` / :meth:`Selector.load_state_dict` round-trip
everything they learned as plain JSON, for checkpoints and resume.

The formulas (``i`` a client, ``B_i`` its samples, ``L(k)`` the training loss of sample
``k`` in the client's last round, ``M_i`` its memory budget, ``M_G`` the model's keep-all
peak, ``t_i`` its device step time under its plan = the sum of the per-operator analytic
times of one step, recomputation included, divided by its speed):

* ``random``: ``k`` clients uniformly, without replacement, among all clients.
* ``exclude``: uniformly among clients with ``M_i >= M_G``: plain FedAvg on devices that
  must train keep-all.
* ``oort`` (Lai et al., OSDI'21): statistical utility
  ``S_i = |B_i| * sqrt(sum_k L(k)^2 / |B_i|)`` (from the last round it took part in),
  system utility ``(T / t_round_i) ** alpha`` when the client's predicted round time
  ``t_round_i`` exceeds the pacer ``T`` (the ``pacer_quantile`` of all clients' predicted
  round times), else 1; utility ``U_i = S_i * sys_i``. Oort knows nothing about memory:
  it may pick a client no plan fits, which the server skips; such a client is then marked
  explored with utility 0.
* ``fedhybrid`` (after Tam et al.; the paper's method section was not available, so
  this is our reading of its three utilities, stated exactly):
  ``U_i = D_i * Mem_i * C_i`` with

  - data utility ``D_i = S_i``, Oort's statistical utility above (per-sample training
    losses, from the last round the client took part in);
  - memory utility ``Mem_i = 1`` when ``M_i >= M_G``; when ``M_i < M_G`` and a plan fits,
    ``Mem_i = tau_i / tau'_i``: the keep-all step time over the step time under the
    client's plan (recomputation plus pack/unpack of compressed activations), i.e. the
    real cost of training below keep-all: a penalty as large as the plan's predicted time
    overhead (BENCHMARKS.md gives the values in the memory-wall experiment), not an
    exclusion; ``Mem_i = 0`` when no plan fits
    (such a client cannot train, and is never selected). The earlier ``M_i / M_G`` (from a
    public review of the paper) penalised a client for being memory-poor *although* its
    plan lets it train, and under-selected exactly the clients the memory wall hides;
  - compute utility from the per-operator time: ``t_i = steps_i * sum_o t_o / s_i``, the
    client's keep-all round time (sum of the model's per-operator analytic times
    ``t_o`` for one step, divided by the device speed ``s_i``, times its local steps);
    ``C_i = (T / t_i) ** alpha`` when ``t_i > T``, else 1, with ``T`` the
    ``pacer_quantile`` of all feasible clients' ``t_i`` (Oort's pacer on the same times).

  Exploration draws unexplored clients at random with probability proportional to the
  utility with the data term's prior: ``|B_i| * Mem_i * C_i`` (Oort registers a client
  with its sample count as its reward until it has trained, and draws unexplored clients
  in proportion to that reward times the pacer penalty); not fastest-first: that would
  always explore the fast, memory-rich devices first, and the data utility could never
  find a memory-poor client's distinctive data.

  Optional round deadline (``deadline_quantile = q``; off by default, ``q = 1``): only
  clients whose *planned* round time ``t'_i = round_seconds`` (its local steps x its step
  time under its plan / its speed, i.e. ``t_i / Mem_i`` where the overhead is known) is at
  most ``T_r = max(quantile_q(t'_j over feasible j), the k-th smallest t'_j)`` are
  explored or exploited. A synchronous round lasts as long as its slowest client, so a
  per-client penalty such as ``C_i`` cannot bound it: one slow client picked by
  exploration or a UCB bonus sets the whole round (FedCS, Nishio & Yonetani, ICC'19,
  selects only clients that can finish by the round deadline for this reason). The
  ``k``-th smallest time keeps ``k`` clients eligible. With ``deadline_weight =
  "samples"`` the quantile counts samples instead of clients: ``T_r`` is the smallest
  ``t'_j`` such that the feasible clients with ``t'_i <= t'_j`` hold at least ``q`` of
  all feasible clients' samples (then raised to the ``k``-th smallest ``t'_j`` as
  above). A client's local steps, and so ``t'_i``, grow with ``|B_i|``: the client-count
  median admits mostly small clients (in the memory-wall federations, the 47-50 clients
  within it held 1,185-1,420 of 4,000 samples), the sample median admits the clients
  holding half the data. The memory-wall benchmark runs ``fedhybrid`` with ``q = 0.5``
  (the pacer's quantile) counting samples; the weighting was chosen on development seeds
  the benchmark does not report, judged on training-pool accuracy
  (``benchmarks/bench_fl_dev.py``), not on the reported test accuracies.

  Optional relaxing deadline (``pacer_window = W``; off by default, ``W = 0``): Oort's
  pacer (Lai et al., OSDI'21, Algorithm 1: relax ``T`` by ``Delta`` when the utility
  summed over the last ``W`` rounds falls below the sum over the ``W`` rounds before)
  applied to fedhybrid's ``T``. ``U(r)``, the exploited utility of round
  ``r``, is the mean ``S_i`` its exploited clients reported (Oort's code,
  ``calculateSumUtil``; 0 when none reported); a mean, not a sum, because the exploited
  share of the ``k`` slots grows with ``1 - eps_r`` and a sum would grow with that
  schedule, not with the data. At the selection of round ``R`` (``R`` rounds closed),
  when ``R >= 2W`` and ``R`` is a multiple of ``W``: if
  ``sum_{r=R-W}^{R-1} U(r) < sum_{r=R-2W}^{R-W-1} U(r)``, the deadline quantile ``q``
  and the compute utility's pacer quantile both grow by ``Delta = pacer_step`` (capped
  at 1, where the deadline is off). Oort's released code relaxes when the two sums are
  within 10 % instead, and also tightens; we follow the paper's rule, which only relaxes.
  The memory-wall benchmark's ``--with-pacer`` run (``fedhybrid-pacer``; not its default:
  it missed the 10-point gap to ``exclude`` in (b) seed 1, see BENCHMARKS.md) takes ``W``
  and ``Delta`` from Oort's defaults (FedScale:
  ``pacer_step`` 20 rounds, ``pacer_delta`` 5 percentile points, ``exploration_decay``
  0.98): ``Delta = 0.05`` unchanged (a share of the clients, not a time), ``W`` scaled
  by the exploration schedule's time constant, ``20 x (1 - 0.98) / (1 - 0.95) = 8``
  rounds (our decay is 0.95), so the pacer compares windows of the same phase of the
  explore/exploit schedule as Oort's; fixed before any run with it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "SELECTORS",
    "Candidate",
    "ExcludeSelector",
    "FedHybridSelector",
    "OortSelector",
    "RandomSelector",
    "Selector",
    "make_selector",
]


DEADLINE_WEIGHTS = ("clients", "samples")
"""What fedhybrid's deadline quantile counts: clients, or the samples they hold."""


@dataclass(frozen=True)
class Candidate:
    """What the server knows about a client before a round."""

    client_id: int
    budget_bytes: int
    speed: float
    num_samples: int
    feasible: bool          # some cached plan fits the budget
    fits_keep_all: bool     # the budget holds the measured keep-all peak
    step_seconds: float     # device seconds of one local step under its plan (inf if none)
    round_seconds: float    # device seconds of its whole local work this round
    keep_all_step_seconds: float = math.nan
    """Device seconds of one keep-all step (the per-operator times over the speed); NaN
    when unknown, and then ``fedhybrid`` charges no plan overhead."""

    @property
    def keep_all_round_seconds(self) -> float:
        """Its local work this round if it trained keep-all (``round_seconds`` if unknown)."""
        if not math.isfinite(self.keep_all_step_seconds):
            return self.round_seconds
        steps = self.round_seconds / self.step_seconds if math.isfinite(
            self.step_seconds) and self.step_seconds > 0 else 0.0
        return steps * self.keep_all_step_seconds if steps else math.inf


class Selector(ABC):
    """Choose ``k`` clients per round; learn from what they report."""

    name = "selector"

    @abstractmethod
    def select(self, round_index: int, candidates: Sequence[Candidate], k: int,
               rng: np.random.Generator) -> list[int]:
        """Ids of at most ``k`` distinct clients, in ascending order."""

    def observe(self, round_index: int, client_id: int, *, num_samples: int,  # noqa: B027
                loss_sq_sum: float, loss_count: int) -> None:
        """A client's successful round (training-loss statistics); default: ignore."""

    def observe_failure(self, round_index: int, client_id: int,  # noqa: B027
                        reason: str) -> None:
        """A selected client that did not contribute (infeasible, rejected, straggler)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027
        """Restore what :meth:`state_dict` returned; default: nothing to restore."""


def _pick(ids: Sequence[int], k: int, rng: np.random.Generator) -> list[int]:
    ids = sorted(ids)
    if len(ids) <= k:
        return ids
    return sorted(int(i) for i in rng.choice(ids, size=k, replace=False))


class RandomSelector(Selector):
    name = "random"

    def select(self, round_index, candidates, k, rng):
        return _pick([c.client_id for c in candidates], k, rng)


class FeasibleRandomSelector(Selector):
    """Uniformly among clients some plan fits (what ProFL, NeuLite and HeteroFL's servers
    do: they know each device's memory and pick at random among those that can train)."""

    name = "random-feasible"

    def select(self, round_index, candidates, k, rng):
        return _pick([c.client_id for c in candidates if c.feasible], k, rng)


class ExcludeSelector(Selector):
    name = "exclude"

    def select(self, round_index, candidates, k, rng):
        return _pick([c.client_id for c in candidates if c.fits_keep_all], k, rng)


class _UtilitySelector(Selector):
    """Oort's explore/exploit scaffolding; subclasses define the utility."""

    def __init__(self, *, exploration: float = 0.9, exploration_decay: float = 0.95,
                 exploration_min: float = 0.2, ucb_c: float = 0.3):
        self.exploration, self.decay = exploration, exploration_decay
        self.exploration_min, self.ucb_c = exploration_min, ucb_c
        self.stat: dict[int, float] = {}    # S_i from the last successful round
        self.count: dict[int, int] = {}     # n_i: rounds observed (success or failure)
        self._last_exploited: list[int] = []  # the last select's exploited clients

    # what the subclasses define
    def _prior(self, c: Candidate, candidates: Sequence[Candidate]) -> float:
        raise NotImplementedError

    def _utility(self, c: Candidate, candidates: Sequence[Candidate]) -> float:
        raise NotImplementedError

    def _eligible(self, c: Candidate) -> bool:
        return True

    def _pool(self, candidates: Sequence[Candidate], k: int) -> list[Candidate]:
        """The clients this round may pick from."""
        return [c for c in candidates if self._eligible(c)]

    def select(self, round_index, candidates, k, rng):
        pool = self._pool(candidates, k)
        fresh = [c for c in pool if c.client_id not in self.count]
        known = [c for c in pool if c.client_id in self.count]
        eps = max(self.exploration_min, self.exploration * self.decay ** round_index)
        n_explore = min(len(fresh), max(0, round(eps * k)))
        n_exploit = min(len(known), k - n_explore)
        n_explore = min(len(fresh), k - n_exploit)  # give unused slots to the other pool
        tie = rng.permutation(len(candidates))  # random tie-break, seeded per round
        order = {c.client_id: int(tie[j]) for j, c in enumerate(candidates)}
        explored = self._explore(fresh, n_explore, candidates, order, rng)
        utilities = {c.client_id: self._utility(c, candidates) for c in known}
        top = max(utilities.values(), default=0.0) or 1.0
        log_r = math.log(round_index + 1.0)

        def score(c: Candidate) -> float:
            bonus = self.ucb_c * math.sqrt(log_r / self.count[c.client_id])
            return utilities[c.client_id] / top + bonus

        known.sort(key=lambda c: (-score(c), order[c.client_id]))
        self._last_exploited = [c.client_id for c in known[:n_exploit]]
        return sorted(explored + self._last_exploited)

    def _explore(self, fresh: list[Candidate], n: int, candidates: Sequence[Candidate],
                 order: dict[int, int], rng: np.random.Generator) -> list[int]:
        """``n`` unexplored clients; default: the highest prior first (Oort)."""
        fresh = sorted(fresh, key=lambda c: (-self._prior(c, candidates), order[c.client_id]))
        return [c.client_id for c in fresh[:n]]

    def observe(self, round_index, client_id, *, num_samples, loss_sq_sum, loss_count):
        mean_sq = loss_sq_sum / loss_count if loss_count else 0.0
        self.stat[client_id] = num_samples * math.sqrt(max(mean_sq, 0.0))
        self.count[client_id] = self.count.get(client_id, 0) + 1

    def observe_failure(self, round_index, client_id, reason):
        self.stat[client_id] = 0.0
        self.count[client_id] = self.count.get(client_id, 0) + 1

    def state_dict(self):
        return {"stat": {str(k): v for k, v in sorted(self.stat.items())},
                "count": {str(k): v for k, v in sorted(self.count.items())}}

    def load_state_dict(self, state):
        self.stat = {int(k): float(v) for k, v in state.get("stat", {}).items()}
        self.count = {int(k): int(v) for k, v in state.get("count", {}).items()}


class OortSelector(_UtilitySelector):
    name = "oort"

    def __init__(self, *, pacer_quantile: float = 0.5, alpha: float = 2.0, **kw):
        super().__init__(**kw)
        self.pacer_quantile, self.alpha = pacer_quantile, alpha

    def _pacer(self, candidates) -> float:
        times = [c.round_seconds for c in candidates if math.isfinite(c.round_seconds)]
        return float(np.quantile(times, self.pacer_quantile)) if times else math.inf

    def _system(self, c, candidates) -> float:
        pacer = self._pacer(candidates)
        if not math.isfinite(c.round_seconds):  # Oort cannot know; it assumes the pacer
            return 1.0
        return (pacer / c.round_seconds) ** self.alpha if c.round_seconds > pacer else 1.0

    def _prior(self, c, candidates):
        return -c.round_seconds if math.isfinite(c.round_seconds) else -self._pacer(
            candidates)

    def _utility(self, c, candidates):
        return self.stat.get(c.client_id, 0.0) * self._system(c, candidates)


class FedHybridSelector(_UtilitySelector):
    name = "fedhybrid"

    def __init__(self, *, keep_all_bytes: int, pacer_quantile: float = 0.5,
                 alpha: float = 2.0, deadline_quantile: float = 1.0,
                 deadline_weight: str = "clients",
                 pacer_window: int = 0, pacer_step: float = 0.05, **kw):
        super().__init__(**kw)
        if deadline_weight not in DEADLINE_WEIGHTS:
            raise ValueError(f"deadline_weight must be one of {', '.join(DEADLINE_WEIGHTS)}; "
                             f"got {deadline_weight!r}")
        self.deadline_weight = deadline_weight
        if not 0.0 < deadline_quantile <= 1.0:
            raise ValueError(f"deadline_quantile must be in (0, 1] (1: no deadline); "
                             f"got {deadline_quantile!r}")
        if int(pacer_window) != pacer_window or pacer_window < 0:
            raise ValueError(f"pacer_window must be a whole number of rounds >= 0 "
                             f"(0: the deadline never relaxes); got {pacer_window!r}")
        if not 0.0 < pacer_step <= 1.0:
            raise ValueError(f"pacer_step must be in (0, 1] (a quantile step); "
                             f"got {pacer_step!r}")
        self.keep_all_bytes = int(keep_all_bytes)
        self.pacer_quantile, self.alpha = pacer_quantile, alpha
        self.deadline_quantile = float(deadline_quantile)
        self.pacer_window, self.pacer_step = int(pacer_window), float(pacer_step)
        self.relaxations = 0                    # times the pacer relaxed T by pacer_step
        self.exploit_utility: list[float] = []  # per closed round: mean S_i of its exploited
        self._open_round: int | None = None     # the round selected last, not yet closed
        self._open_exploited: list[int] = []    # the clients that round exploited
        self._open_rewards: list[float] = []    # S_i those of them reported

    @property
    def relaxed(self) -> float:
        """What the pacer has added to both quantiles so far (``relaxations x step``)."""
        return self.relaxations * self.pacer_step

    def current_deadline_quantile(self) -> float:
        return min(1.0, self.deadline_quantile + self.relaxed)

    def current_pacer_quantile(self) -> float:
        return min(1.0, self.pacer_quantile + self.relaxed)

    def round_deadline(self, candidates: Sequence[Candidate], k: int) -> float:
        """``T_r``: the current deadline quantile of the feasible clients' planned round
        times (counting clients, or the samples they hold: ``deadline_weight``), raised
        to the ``k``-th smallest of them; ``inf`` without a deadline."""
        timed = sorted((c.round_seconds, c.num_samples) for c in candidates
                       if c.feasible and math.isfinite(c.round_seconds))
        times = [t for t, _ in timed]
        quantile = self.current_deadline_quantile()
        if quantile >= 1.0 or len(times) <= k:
            return math.inf
        if self.deadline_weight == "samples":
            # the smallest planned time by which clients holding a share ``quantile`` of
            # the feasible clients' samples are done
            held = np.cumsum([n for _, n in timed], dtype=np.float64)
            at = times[int(np.searchsorted(held, quantile * held[-1]))]
        else:
            at = float(np.quantile(times, quantile))
        return max(at, times[k - 1])

    def _close_round(self) -> None:
        """Append the last selected round's exploited utility to the pacer's history:
        the mean ``S_i`` of its exploited clients that reported (Oort's
        ``calculateSumUtil``: 0 when none did)."""
        if self._open_round is None:
            return
        rewards = self._open_rewards
        self.exploit_utility.append(sum(rewards) / len(rewards) if rewards else 0.0)
        self._open_round, self._open_exploited, self._open_rewards = None, [], []

    def pace(self, round_index: int) -> None:
        """Oort's pacer (Lai et al., OSDI'21, Algorithm 1): every ``W`` rounds from round
        ``2W`` on, relax ``T`` by one step when the exploited utility summed over the last
        ``W`` rounds fell below the sum over the ``W`` rounds before."""
        self._close_round()
        window = self.pacer_window
        if (window <= 0 or self.deadline_quantile >= 1.0 or round_index < 2 * window
                or round_index % window or len(self.exploit_utility) < 2 * window):
            return
        last = sum(self.exploit_utility[-window:])
        before = sum(self.exploit_utility[-2 * window:-window])
        if last < before and self.current_deadline_quantile() < 1.0:
            self.relaxations += 1

    def select(self, round_index, candidates, k, rng):
        self.pace(round_index)
        chosen = super().select(round_index, candidates, k, rng)
        self._open_round = round_index
        self._open_exploited = sorted(self._last_exploited)
        return chosen

    def observe(self, round_index, client_id, *, num_samples, loss_sq_sum, loss_count):
        super().observe(round_index, client_id, num_samples=num_samples,
                        loss_sq_sum=loss_sq_sum, loss_count=loss_count)
        if round_index == self._open_round and client_id in self._open_exploited:
            self._open_rewards.append(self.stat[client_id])

    def state_dict(self):
        state = super().state_dict()
        state["pacer"] = {"relaxations": self.relaxations,
                          "exploit_utility": list(self.exploit_utility),
                          "open_round": self._open_round,
                          "open_exploited": list(self._open_exploited),
                          "open_rewards": list(self._open_rewards)}
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        pacer = state.get("pacer", {})
        self.relaxations = int(pacer.get("relaxations", 0))
        self.exploit_utility = [float(u) for u in pacer.get("exploit_utility", [])]
        open_round = pacer.get("open_round")
        self._open_round = None if open_round is None else int(open_round)
        self._open_exploited = [int(c) for c in pacer.get("open_exploited", [])]
        self._open_rewards = [float(u) for u in pacer.get("open_rewards", [])]

    def _pool(self, candidates, k):
        deadline = self.round_deadline(candidates, k)
        return [c for c in super()._pool(candidates, k) if c.round_seconds <= deadline]

    def memory_utility(self, c: Candidate) -> float:
        """``Mem_i``: 0 without a plan, 1 at or above keep-all, else the plan's slowdown."""
        if not c.feasible:
            return 0.0
        if c.fits_keep_all or c.budget_bytes >= self.keep_all_bytes:
            return 1.0
        if not (math.isfinite(c.keep_all_step_seconds) and c.step_seconds > 0):
            return 1.0  # the plan's overhead is unknown: charge none
        return min(1.0, c.keep_all_step_seconds / c.step_seconds)

    def _pacer(self, candidates: Sequence[Candidate]) -> float:
        times = [c.keep_all_round_seconds for c in candidates
                 if c.feasible and math.isfinite(c.keep_all_round_seconds)]
        return float(np.quantile(times, self.current_pacer_quantile())) if times else \
            math.inf

    def compute_utility(self, c: Candidate, candidates: Sequence[Candidate]) -> float:
        """``C_i = (T / t_i) ** alpha`` above the pacer ``T``, else 1 (0 without a plan)."""
        t = c.keep_all_round_seconds
        if not (c.feasible and math.isfinite(t)):
            return 0.0
        pacer = self._pacer(candidates)
        return (pacer / t) ** self.alpha if t > pacer else 1.0

    def _eligible(self, c):
        return c.feasible

    def _prior(self, c, candidates):
        """The utility before any training: ``|B_i|`` (Oort's initial reward) for ``D_i``."""
        return c.num_samples * self.memory_utility(c) * self.compute_utility(c, candidates)

    def _explore(self, fresh, n, candidates, order, rng):
        if n <= 0 or not fresh:
            return []
        fresh = sorted(fresh, key=lambda c: c.client_id)
        weights = np.array([self._prior(c, candidates) for c in fresh], dtype=np.float64)
        positive = int((weights > 0).sum())
        if positive == 0:
            return []
        picked = rng.choice(len(fresh), size=min(n, positive), replace=False,
                            p=weights / weights.sum())
        return [fresh[int(j)].client_id for j in picked]

    def _utility(self, c, candidates):
        return (self.stat.get(c.client_id, 0.0) * self.memory_utility(c)
                * self.compute_utility(c, candidates))


SELECTORS = ("exclude", "fedhybrid", "oort", "random")


def make_selector(name: str, *, keep_all_bytes: int, **options: Any) -> Selector:
    """A selector by name; ``keep_all_bytes`` is ``M_G`` (used by ``fedhybrid``)."""
    key = str(name).strip().lower()
    if key == "random":
        return RandomSelector()
    if key == "exclude":
        return ExcludeSelector()
    if key == "oort":
        return OortSelector(**options)
    if key == "fedhybrid":
        return FedHybridSelector(keep_all_bytes=keep_all_bytes, **options)
    raise ValueError(f"unknown selector {name!r}; valid names: {', '.join(SELECTORS)}")
