"""One round of a federation, engine-free: :class:`RoundPolicy`.

Flower's ``Strategy`` is the model: a policy has a ``configure`` hook (choose this round's
clients and what each is sent) and an ``aggregate`` hook (judge the replies and combine
them). Nothing here knows an engine. Two thin drivers run it:

* the embedded loop (:class:`fedplan.fl.server.Server`) calls ``configure``, sends each
  :class:`Assignment`'s instruction through the wire format to an in-process client,
  wraps what comes back (or the exception) as an :class:`Outcome` and calls
  ``aggregate``;
* the Flower strategy (:class:`fedplan.fl.flower.strategy.FedPlanStrategy`) turns the same
  assignments into one Flower message per node and the nodes' replies (or Flower's error
  replies) into the same outcomes.

So selection, the plan a client gets, the instruction, the reject ladder, the
aggregation and the round's simulated time are written once. The ladder, in order: an
error (the client raised, or the engine reports an error reply) is *rejected*; a node
that never answered is *no_reply*; a reply whose tensors differ in names, shapes or
dtypes from those expected, or hold NaN/Inf (:func:`~.messages.validate_reply`), or that
echoes another plan's digest, is *rejected*; a client whose simulated time exceeds the
deadline is a *straggler*; a measured peak above the client's budget is a
*budget_violation* (counted, the update dropped). Every one is logged with its reason and
reported to the selector; the round goes on with the rest.

Subclasses (the strategies in :mod:`fedplan.fl.strategies`) override
:meth:`RoundPolicy.assign` (what one chosen client is sent), :meth:`RoundPolicy.combine`
(how accepted replies become the new global weights), :meth:`RoundPolicy.candidate`
(what the selector knows of a client), and the evaluation model.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .client import local_steps
from .clock import client_seconds, round_seconds
from .messages import ClientReply, MessageError, TrainInstruction, validate_reply
from .plan_cache import CachedPlan, Infeasible, PlanCache
from .selectors import Candidate, Selector

__all__ = ["Assignment", "ClientInfo", "Outcome", "PolicyConfig", "RoundPolicy",
           "RoundResult", "derive_seed", "evaluate", "fedavg", "make_candidate",
           "plan_digest"]


def derive_seed(*parts: int) -> int:
    """The per-(seed, round, client) seed of a client's training (both engines)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def plan_digest(plan_json: Mapping[str, Any]) -> str:
    """A short, stable digest of a plan's JSON (sorted keys): what a client echoes back so
    the server knows which plan the update was trained under."""
    text = json.dumps(plan_json, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- plain values


@dataclass(frozen=True)
class ClientInfo:
    """What an engine knows of a client before a round (from the device profile in the
    embedded simulation, from the node's answer to the query round on Flower)."""

    client_id: int
    budget_bytes: int
    speed: float
    num_samples: int


@dataclass(frozen=True, kw_only=True)
class PolicyConfig:
    """The per-round knobs every policy reads."""

    clients_per_round: int
    epochs: int
    batch_size: int
    lr: float
    seed: int
    deadline_seconds: float | None = None
    """Simulated seconds a client may take per round; slower clients are stragglers."""
    rounds: int | None = None
    """Rounds the run will have, when known (strategies that pace stages read it)."""


@dataclass(eq=False)
class Assignment:
    """One chosen client's work this round, and what its reply is checked against."""

    client_id: int
    instruction: TrainInstruction
    digest: str
    """The plan's digest; a reply that echoes another is rejected."""
    expected: dict[str, np.ndarray]
    """Names, shapes and dtypes the reply's tensors must have (the trained part)."""
    budget_bytes: int
    speed: float
    step_seconds: float
    """Simulated seconds of one local step at speed 1.0 on the device (its plan's)."""
    extra_step_seconds: float = 0.0
    """Simulated seconds per step that the device's speed does not scale (e.g. the link
    and the edge server of a split)."""
    bytes_per_step: int = 0
    """Bytes that cross the network per local step besides the weights (a split's cut)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Strategy-specific facts logged with the participation (block, width, cut...)."""

    def seconds(self, steps: int) -> float:
        return (client_seconds(steps, self.step_seconds, self.speed)
                + steps * self.extra_step_seconds)


@dataclass(eq=False)
class Outcome:
    """What came back for one assignment."""

    client_id: int
    reply: ClientReply | None = None
    error: str | None = None
    """The client raised, or the engine holds an error reply: rejected with this reason."""
    gone: str | None = None
    """The client never answered (node gone, timeout): this reason."""
    digest: str | None = None
    """The plan digest the client echoed (engines that carry one; None: not checked)."""


@dataclass(eq=False)
class RoundResult:
    weights: dict[str, np.ndarray]
    accepted: list[ClientReply]
    metrics: dict[str, Any]
    records: list[dict[str, Any]]
    """One entry per chosen client: client_id, kind (trained, skipped, rejected,
    straggler, budget_violation, no_reply), reason, and for replies the measured peak."""


# --------------------------------------------------------------------------- helpers


def fedavg(replies: Sequence[ClientReply], reference: dict[str, np.ndarray]
           ) -> dict[str, np.ndarray]:
    """Sample-weighted mean of the replies' floating tensors (float64 accumulation);
    integer tensors (e.g. BatchNorm's ``num_batches_tracked``) take the largest value.
    A tensor no reply carries keeps its value in ``reference`` (block-wise strategies
    send and receive only the trained part); a reply's tensor may be a leading slice of
    the reference's (HeteroFL's nested widths): each element is averaged over the
    replies that hold it."""
    if not replies:
        return dict(reference)
    out = {}
    for name, ref in reference.items():
        holders = [r for r in replies if name in r.weights]
        if not holders:
            out[name] = ref
            continue
        if not np.issubdtype(ref.dtype, np.floating):
            if all(r.weights[name].shape == ref.shape for r in holders):
                out[name] = np.max(np.stack([r.weights[name] for r in holders]), axis=0)
            else:
                out[name] = ref
            continue
        if all(r.weights[name].shape == ref.shape for r in holders):
            total = float(sum(r.num_samples for r in holders))
            acc = np.zeros(ref.shape, dtype=np.float64)
            for r in holders:
                acc += (r.num_samples / total) * r.weights[name].astype(np.float64)
            out[name] = acc.astype(ref.dtype)
            continue
        acc = np.zeros(ref.shape, dtype=np.float64)
        weight = np.zeros(ref.shape, dtype=np.float64)
        for r in holders:
            part = r.weights[name]
            region = tuple(slice(0, n) for n in part.shape)
            acc[region] += r.num_samples * part.astype(np.float64)
            weight[region] += r.num_samples
        merged = ref.astype(np.float64).copy()
        held = weight > 0
        merged[held] = acc[held] / weight[held]
        out[name] = merged.astype(ref.dtype)
    return out


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
             batch: int = 100) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on ``x, y`` in eval mode, in batches of 100 (on this
    machine 6x faster for the mbconv model than batches of 1000: they fall out of cache).
    Outputs of shape (B, T, C) (next-token models) are scored per position."""
    model.eval()
    correct, loss, count = 0, 0.0, 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            out = model(x[i:i + batch])
            target = y[i:i + batch]
            if out.dim() == 3:
                out, target = out.reshape(-1, out.shape[-1]), target.reshape(-1)
            correct += int((out.argmax(1) == target).sum())
            loss += float(torch.nn.functional.cross_entropy(out, target, reduction="sum"))
            count += int(target.numel())
    model.train()
    return correct / count, loss / count


def make_candidate(client: ClientInfo, entry: CachedPlan | Infeasible, *, steps: int,
                   keep_all_bytes: int, keep_all_step_seconds: float,
                   extra_step_seconds: float = 0.0) -> Candidate:
    """The selectors' view of a client whose plan (or lack of one) is ``entry``."""
    feasible = isinstance(entry, CachedPlan)
    step = (entry.step_seconds / client.speed + extra_step_seconds) if feasible else math.inf
    return Candidate(client_id=client.client_id, budget_bytes=client.budget_bytes,
                     speed=client.speed, num_samples=client.num_samples, feasible=feasible,
                     fits_keep_all=client.budget_bytes >= keep_all_bytes, step_seconds=step,
                     round_seconds=steps * step if feasible else math.inf,
                     keep_all_step_seconds=keep_all_step_seconds / client.speed)


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


# --------------------------------------------------------------------------- the policy


class RoundPolicy:
    """Selection with one cached plan per client budget, and FedAvg: FedHybrid and the
    plain selectors (``random``, ``oort``, ``exclude``). Strategies subclass it.

    ``log(kind, fields)`` is called for every skipped, rejected, straggling, violating or
    silent client (the engines keep these as their event logs).
    """

    name = "selection"

    def __init__(self, *, config: PolicyConfig, cache: PlanCache, selector: Selector,
                 model_factory: Callable[[], torch.nn.Module],
                 log: Callable[[str, dict[str, Any]], None] | None = None):
        self.config, self.cache, self.selector = config, cache, selector
        self.model_factory = model_factory
        self.log = log or (lambda _kind, _fields: None)
        self.pending: dict[int, Assignment] = {}
        self.sent_weights: dict[str, np.ndarray] = {}
        self._eval_model: torch.nn.Module | None = None
        self.chosen: list[int] = []
        self._skipped: list[dict[str, Any]] = []

    # ---- what the selector sees ----------------------------------------------------------
    def candidate(self, client: ClientInfo) -> Candidate:
        entry = self.cache.lookup(client.budget_bytes)
        steps = local_steps(client.num_samples, self.config.batch_size, self.config.epochs)
        return make_candidate(client, entry, steps=steps,
                              keep_all_bytes=self.cache.keep_all_bytes,
                              keep_all_step_seconds=self.cache.base_step_seconds)

    def candidates(self, clients: Sequence[ClientInfo]) -> list[Candidate]:
        return [self.candidate(c) for c in clients]

    # ---- configure -----------------------------------------------------------------------
    def select(self, round_index: int, clients: Sequence[ClientInfo]) -> list[int]:
        rng = np.random.default_rng([self.config.seed, round_index, 7])
        return self.selector.select(round_index, self.candidates(clients),
                                    self.config.clients_per_round, rng)

    def instruction(self, round_index: int, client: ClientInfo, plan_json: dict[str, Any],
                    weights: dict[str, np.ndarray], task: dict[str, Any] | None = None
                    ) -> TrainInstruction:
        cfg = self.config
        return TrainInstruction(
            round=round_index, client_id=client.client_id, plan=plan_json, weights=weights,
            epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
            seed=derive_seed(cfg.seed, round_index, client.client_id),
            budget_bytes=client.budget_bytes, task=dict(task or {}))

    def assign(self, round_index: int, client: ClientInfo, weights: dict[str, np.ndarray]
               ) -> Assignment | str:
        """The assignment for one chosen client, or the reason it is skipped."""
        entry = self.cache.lookup(client.budget_bytes)
        if not isinstance(entry, CachedPlan):
            return f"no plan fits its budget of {client.budget_bytes} B"
        return Assignment(
            client_id=client.client_id,
            instruction=self.instruction(round_index, client, entry.plan_json, weights),
            digest=plan_digest(entry.plan_json), expected=weights,
            budget_bytes=client.budget_bytes, speed=client.speed,
            step_seconds=entry.step_seconds)

    def configure(self, round_index: int, clients: Sequence[ClientInfo],
                  weights: dict[str, np.ndarray], *, chosen: Sequence[int] | None = None
                  ) -> list[Assignment]:
        """This round's assignments (chosen clients that no plan fits are skipped, logged
        and reported to the selector). ``chosen``: clients a subclass already selected."""
        by_id = {c.client_id: c for c in clients}
        if chosen is None:
            chosen = self.select(round_index, clients)
        self.sent_weights = weights
        self.pending = {}
        self.chosen = list(chosen)
        self._skipped: list[dict[str, Any]] = []
        out = []
        for cid in chosen:
            got = self.assign(round_index, by_id[cid], weights)
            if isinstance(got, str):
                self._skipped.append({"client_id": cid, "kind": "skipped", "reason": got})
                self.log("skipped", {"round": round_index, "client_id": cid, "reason": got})
                self.selector.observe_failure(round_index, cid, got)
                continue
            self.pending[cid] = got
            out.append(got)
        return out

    # ---- aggregate -----------------------------------------------------------------------
    def judge(self, round_index: int, assignment: Assignment, outcome: Outcome
              ) -> tuple[str, str]:
        """(kind, reason) for one outcome; kind ``trained`` when it counts."""
        if outcome.gone is not None:
            return "no_reply", outcome.gone
        if outcome.error is not None:
            return "rejected", outcome.error
        reply = outcome.reply
        if reply is None:
            return "rejected", "no reply content"
        try:
            validate_reply(reply, assignment.expected, round_index=round_index,
                           client_id=assignment.client_id)
        except MessageError as exc:
            return "rejected", f"MessageError: {str(exc).splitlines()[0]}"
        if outcome.digest is not None and outcome.digest != assignment.digest:
            return "rejected", (f"plan digest {outcome.digest!r} echoed; sent "
                                f"{assignment.digest!r}; the update was not trained under "
                                "the plan sent")
        seconds = assignment.seconds(reply.steps)
        deadline = self.config.deadline_seconds
        if deadline is not None and seconds > deadline:
            return "straggler", (f"{seconds:.3f} simulated s exceeds the deadline "
                                 f"{deadline} s")
        if reply.budget_bytes != assignment.budget_bytes or \
                reply.measured_peak_bytes > assignment.budget_bytes:
            return "budget_violation", (
                f"measured peak {reply.measured_peak_bytes} B against a budget of "
                f"{assignment.budget_bytes} B (reply says {reply.budget_bytes} B); over "
                "budget")
        return "trained", ""

    def aggregate(self, round_index: int, outcomes: Sequence[Outcome]) -> RoundResult:
        """Judge every outcome, combine the accepted replies, time the round."""
        counts = {"skipped": len(self._skipped), "rejected": 0, "stragglers": 0,
                  "violations": 0, "no_reply": 0}
        failure = {"rejected": "rejected", "straggler": "straggler",
                   "budget_violation": "budget violation", "no_reply": "no reply"}
        counter = {"rejected": "rejected", "straggler": "stragglers",
                   "budget_violation": "violations", "no_reply": "no_reply"}
        records = list(self._skipped)
        accepted: list[ClientReply] = []
        times, peaks = [], []
        bytes_sent = 0
        seen = set()
        for outcome in sorted(outcomes, key=lambda o: o.client_id):
            assignment = self.pending.get(outcome.client_id)
            if assignment is None or outcome.client_id in seen:
                self.log("ignored", {"round": round_index, "client_id": outcome.client_id,
                                     "reason": "reply from a client this round did not ask"})
                continue
            seen.add(outcome.client_id)
            bytes_sent += _nbytes(assignment.instruction.weights)
            kind, reason = self.judge(round_index, assignment, outcome)
            reply = outcome.reply
            record = {"client_id": outcome.client_id, "kind": kind, "reason": reason,
                      **assignment.info}
            if reply is not None and kind not in ("rejected", "no_reply"):
                seconds = assignment.seconds(reply.steps)
                times.append(seconds)
                bytes_sent += _nbytes(reply.weights) + reply.steps * assignment.bytes_per_step
                record.update(measured_peak_bytes=reply.measured_peak_bytes,
                              budget_bytes=assignment.budget_bytes,
                              simulated_seconds=seconds)
                if kind != "straggler":
                    peaks.append(reply.measured_peak_bytes / assignment.budget_bytes)
            records.append(record)
            if kind != "trained":
                counts[counter[kind]] += 1
                self.log(kind, {"round": round_index, "client_id": outcome.client_id,
                                "reason": reason})
                self.selector.observe_failure(round_index, outcome.client_id, failure[kind])
                continue
            accepted.append(reply)
            self.selector.observe(round_index, outcome.client_id,
                                  num_samples=reply.num_samples,
                                  loss_sq_sum=reply.loss_sq_sum, loss_count=reply.loss_count)
        for cid in sorted(set(self.pending) - seen):  # the engine lost it: never answered
            records.append({"client_id": cid, "kind": "no_reply", "reason": "no outcome"})
            counts["no_reply"] += 1
            self.selector.observe_failure(round_index, cid, "no reply")
        weights = self.combine(round_index, accepted)
        count = sum(x.loss_count for x in accepted)
        metrics = {
            "selected": len(self.chosen), "participants": len(accepted), **counts,
            "round_seconds": round_seconds(times, self.config.deadline_seconds),
            "train_loss": (sum(x.loss_sum for x in accepted) / count) if count else math.nan,
            "max_peak_over_budget": max(peaks, default=math.nan),
            "bytes_sent": bytes_sent,
            "clients": [x.client_id for x in accepted],
            **self.round_info(round_index),
        }
        self.after_round(round_index, accepted)
        self.pending = {}
        return RoundResult(weights=weights, accepted=accepted, metrics=metrics,
                           records=records)

    def combine(self, round_index: int, accepted: list[ClientReply]) -> dict[str, np.ndarray]:
        """The new global weights: FedAvg by samples over the accepted replies."""
        return fedavg(accepted, self.sent_weights)

    def round_info(self, round_index: int) -> dict[str, Any]:
        """Extra per-round metrics (a strategy's stage, say)."""
        return {}

    def after_round(self, round_index: int, accepted: list[ClientReply]) -> None:
        """Update strategy state after the round's weights are combined."""

    # ---- evaluation and state ------------------------------------------------------------
    def eval_model(self, weights: dict[str, np.ndarray]) -> torch.nn.Module:
        """The model the test set scores after a round (the full model by default)."""
        from .messages import state_from_arrays
        if self._eval_model is None:
            self._eval_model = self.model_factory()
        self._eval_model.load_state_dict(state_from_arrays(weights))
        return self._eval_model

    def evaluate(self, weights: dict[str, np.ndarray], x: torch.Tensor, y: torch.Tensor
                 ) -> tuple[float, float]:
        return evaluate(self.eval_model(weights), x, y)

    def initial_weights(self) -> dict[str, np.ndarray]:
        from .messages import state_to_arrays
        return state_to_arrays(self.model_factory().state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"selector": self.selector.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.selector.load_state_dict(state["selector"])


def _nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))
