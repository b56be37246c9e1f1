"""FedPlanStrategy: Flower's strategy hooks around fedplan's round logic.

One round, as in the embedded server (:mod:`fedplan.fl.server`):

1. ``configure_train``: nodes that connected since the last round are queried
   (:meth:`NodeRegistry.discover`); the selector picks up to ``clients-per-round`` of the
   online nodes (randomness from ``(seed, round)``); each selected node gets the plan
   cache's plan for its budget (a node no plan fits is skipped and logged) and **its own
   message**: a new ``RecordDict`` with a new ``ArrayRecord`` of the global weights and a
   ``ConfigRecord`` with its plan JSON, the plan's digest, its seed
   ``(seed, round, client)`` and its budget. Nothing is shared between nodes' messages
   (Flower's stock FedAvg shares one ``RecordDict`` per round).
2. ``aggregate_train``: every reply is checked before it counts: an error reply, a
   malformed one, one whose weights differ in names, shapes or dtypes from those sent or
   hold NaN/Inf (:func:`~fedplan.fl.messages.validate_reply`), one whose plan digest is not
   the one sent, or one whose measured peak is over the node's budget is **rejected with
   a log line** and the round goes on; a selected node that did not reply within the
   round timeout is dropped until it reconnects. FedAvg over the accepted replies,
   weighted by ``num-examples`` (:func:`~fedplan.fl.server.fedavg`, replies in client-id
   order, so the sum is the embedded simulation's).

Evaluation is centralised (the server app's ``evaluate_fn`` on the held-out test split):
``configure_evaluate`` sends nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedplan.fl.messages import ClientReply, MessageError, TrainInstruction, validate_reply
from fedplan.fl.plan_cache import CachedPlan
from fedplan.fl.selectors import Selector
from fedplan.fl.server import fedavg

from .config import FlowerRunConfig
from .nodes import NodeRegistry
from .records import (
    arrays_from_record,
    arrays_to_record,
    instruction_to_content,
    reply_from_content,
)

__all__ = ["FedPlanStrategy", "derive_seed"]

# Errors the SuperLink itself answers with when the node is gone (missed heartbeats) or
# the message expired: the node did not reply, rather than replied badly.
_GONE = {ErrorCode.NODE_UNAVAILABLE: "the SuperLink reports the node unavailable (missed "
                                     "heartbeats)",
         ErrorCode.MESSAGE_UNAVAILABLE: "the message expired before the node took it",
         ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "the node's reply expired"}


def derive_seed(*parts: int) -> int:
    """The per-(seed, round, client) seed the embedded server derives (same formula, so a
    client trains identically under both)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class FedPlanStrategy(Strategy):
    """Per-node plans out, validated FedAvg in (see the module doc)."""

    def __init__(self, *, config: FlowerRunConfig, registry: NodeRegistry, selector: Selector,
                 batch_size: int, log: Callable[[str, dict[str, Any]], None]):
        self.config, self.registry, self.selector = config, registry, selector
        self.batch_size = batch_size
        self.log = log
        self.weights: dict[str, np.ndarray] = {}
        self.sent: dict[int, dict[str, Any]] = {}  # node id -> what it was sent
        self.outbox: list[Message] = []            # this round's messages
        self.history: list[dict[str, Any]] = []    # one entry per round

    # ---- train ---------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        r = server_round - 1  # the embedded server counts rounds from 0
        cfg = self.config
        self.registry.discover(grid, timeout=min(60.0, cfg.round_timeout),
                               group=f"query-{server_round}")
        self.weights = arrays_from_record(arrays)
        rng = np.random.default_rng([cfg.seed, r, 7])
        chosen = self.selector.select(r, self.registry.candidates(), cfg.clients_per_round,
                                      rng)
        self.sent = {}
        round_log: dict[str, Any] = {"round": server_round, "selected": list(chosen),
                                     "replies": [], "rejected": [], "skipped": [],
                                     "no_reply": []}
        self.history.append(round_log)
        messages = []
        for cid in chosen:
            node = self.registry.nodes[cid]
            if not isinstance(node.entry, CachedPlan):
                reason = f"no plan fits its budget of {node.budget_bytes} B"
                round_log["skipped"].append({"client_id": cid, "reason": reason})
                self.log("skipped", {"round": server_round, "client_id": cid,
                                     "reason": reason})
                self.selector.observe_failure(r, cid, reason)
                continue
            instruction = TrainInstruction(
                round=r, client_id=cid, plan=node.entry.plan_json, weights=self.weights,
                epochs=cfg.epochs, batch_size=self.batch_size, lr=cfg.lr,
                seed=derive_seed(cfg.seed, r, cid), budget_bytes=node.budget_bytes)
            content = instruction_to_content(instruction, node.digest)
            messages.append(Message(content, dst_node_id=node.node_id, message_type="train",
                                    group_id=str(server_round)))
            self.sent[node.node_id] = {"client_id": cid, "digest": node.digest,
                                       "budget_bytes": node.budget_bytes}
        self.log("round_sent", {"round": server_round, "clients": sorted(
            v["client_id"] for v in self.sent.values())})
        self.outbox = messages
        return messages

    def _sender(self, reply: Message) -> int:
        """The node a reply answers for. Flower sets each message's id when it pushes it;
        a reply names that id, and an error reply the SuperLink writes itself (node gone)
        carries the SuperLink's node id as its source, not the node's."""
        ids = {m.metadata.message_id: m.metadata.dst_node_id for m in self.outbox
               if m.metadata.message_id}
        return ids.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def _reject(self, server_round: int, cid: int, node_id: int, reason: str) -> None:
        self.history[-1]["rejected"].append({"client_id": cid, "node_id": node_id,
                                             "reason": reason})
        self.log("rejected", {"round": server_round, "client_id": cid, "node_id": node_id,
                              "reason": reason})
        self.selector.observe_failure(server_round - 1, cid, "rejected")

    def _check(self, server_round: int, msg: Message, sent: dict[str, Any]) -> ClientReply:
        """The reply, or MessageError saying why it is rejected."""
        if msg.has_error():
            raise MessageError(f"the node replied with error {msg.error.code}: "
                               f"{(msg.error.reason or '').strip()[:300]}")
        reply, digest = reply_from_content(msg.content)
        validate_reply(reply, self.weights, round_index=server_round - 1,
                       client_id=sent["client_id"])
        if digest != sent["digest"]:
            raise MessageError(f"plan digest {digest!r} echoed; sent {sent['digest']!r}; "
                               "the update was not trained under the plan sent")
        if reply.budget_bytes != sent["budget_bytes"] or \
                reply.measured_peak_bytes > sent["budget_bytes"]:
            raise MessageError(f"measured peak {reply.measured_peak_bytes} B against a budget "
                               f"of {sent['budget_bytes']} B (reply says "
                               f"{reply.budget_bytes} B); over budget")
        return reply

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        r = server_round - 1
        replies = list(replies)
        round_log = self.history[-1]
        accepted: list[ClientReply] = []
        answered = set()
        for msg in replies:
            node_id = self._sender(msg)
            sent = self.sent.get(node_id)
            if sent is None or node_id in answered:
                self.log("ignored", {"round": server_round, "node_id": node_id,
                                     "reason": "reply from a node this round did not ask"})
                continue
            cid = sent["client_id"]
            if msg.has_error() and msg.error.code in _GONE:
                continue  # counted below as no reply
            answered.add(node_id)
            try:
                reply = self._check(server_round, msg, sent)
            except MessageError as exc:
                self._reject(server_round, cid, node_id, str(exc).splitlines()[0])
                continue
            accepted.append(reply)
            round_log["replies"].append({
                "client_id": cid, "node_id": node_id, "plan_digest": sent["digest"],
                "measured_peak_bytes": reply.measured_peak_bytes,
                "budget_bytes": reply.budget_bytes, "num_examples": reply.num_samples,
                "train_loss": reply.mean_loss, "train_seconds": reply.train_seconds})
            self.selector.observe(r, cid, num_samples=reply.num_samples,
                                  loss_sq_sum=reply.loss_sq_sum, loss_count=reply.loss_count)
        gone = {self._sender(m): _GONE[m.error.code] for m in replies
                if m.has_error() and m.error.code in _GONE}
        for node_id, sent in self.sent.items():
            if node_id not in answered:
                cid = sent["client_id"]
                reason = gone.get(node_id, "no reply within the round timeout of "
                                           f"{self.config.round_timeout} s")
                round_log["no_reply"].append({"client_id": cid, "node_id": node_id,
                                              "reason": reason})
                self.log("no_reply", {"round": server_round, "client_id": cid,
                                      "node_id": node_id, "reason": reason})
                self.selector.observe_failure(r, cid, "no reply")
                self.registry.drop(cid, reason + "; dropped until it reconnects")
        accepted.sort(key=lambda x: x.client_id)
        self.weights = fedavg(accepted, self.weights)
        count = sum(x.loss_count for x in accepted)
        train_loss = sum(x.loss_sum for x in accepted) / count if count else math.nan
        round_log.update(participants=[x.client_id for x in accepted], train_loss=train_loss)
        metrics = MetricRecord({"participants": len(accepted),
                                "rejected": len(round_log["rejected"]),
                                "no-reply": len(round_log["no_reply"]),
                                "num-examples": sum(x.num_samples for x in accepted),
                                "train-loss": train_loss})
        return arrays_to_record(self.weights), metrics

    # ---- evaluate: centralised, in the server app --------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        self.log("strategy", {"selector": self.config.selector,
                              "clients_per_round": self.config.clients_per_round,
                              "round_timeout": self.config.round_timeout,
                              "nodes": len(self.registry.online())})
