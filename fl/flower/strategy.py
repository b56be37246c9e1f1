"""FedPlanStrategy: a thin Flower strategy around fedplan's round policy.

The round itself (selection, each client's plan and task, the instruction, the reject
ladder, the aggregation) is :class:`fedplan.fl.policy.RoundPolicy`, the same object the
embedded loop drives. This class only translates:

1. ``configure_train``: nodes that connected since the last round are queried
   (:meth:`NodeRegistry.discover`); the policy's ``configure`` is called with the online
   nodes; every :class:`~fedplan.fl.policy.Assignment` becomes **its own message**: a new
   ``RecordDict`` with a new ``ArrayRecord`` of the weights it names and a
   ``ConfigRecord`` with its plan JSON, the plan's digest, its task, its seed and its
   budget. Nothing is shared between nodes' messages (Flower's stock FedAvg shares one
   ``RecordDict`` per round).
2. ``aggregate_train``: every reply becomes an :class:`~fedplan.fl.policy.Outcome` (an
   error reply: rejected with its reason; a reply the SuperLink wrote because the node is
   gone: no reply; a malformed one: rejected), and the policy's ``aggregate`` judges and
   combines them. A selected node that did not reply within the round timeout is dropped
   until it reconnects.

Evaluation is centralised (the server app's ``evaluate_fn`` on the held-out test split,
through the policy's evaluation model): ``configure_evaluate`` sends nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedplan.fl.messages import MessageError
from fedplan.fl.policy import Outcome, RoundPolicy, derive_seed

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


def _EXTRA_KEYS(policy: RoundPolicy, round_index: int) -> set[str]:  # noqa: N802
    """The policy's own per-round metrics (a strategy's stage, say), as aggregate saw them."""
    return set(policy.round_info(round_index))


class FedPlanStrategy(Strategy):
    """Flower's hooks around a :class:`RoundPolicy` (see the module doc)."""

    def __init__(self, *, config: FlowerRunConfig, registry: NodeRegistry,
                 policy: RoundPolicy, log: Callable[[str, dict[str, Any]], None]):
        self.config, self.registry, self.policy = config, registry, policy
        self.log = log
        self.sent: dict[int, int] = {}             # node id -> client id
        self.digests: dict[int, str] = {}          # client id -> its plan's digest
        self.outbox: list[Message] = []            # this round's messages
        self.history: list[dict[str, Any]] = []    # one entry per round

    # ---- train ---------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        r = server_round - 1  # the embedded server counts rounds from 0
        self.registry.discover(grid, timeout=min(60.0, self.config.round_timeout),
                               group=f"query-{server_round}")
        weights = arrays_from_record(arrays)
        assignments = self.policy.configure(r, self.registry.client_infos(), weights)
        round_log: dict[str, Any] = {"round": server_round,
                                     "selected": list(self.policy.chosen),
                                     "replies": [], "rejected": [], "skipped": [],
                                     "no_reply": []}
        self.history.append(round_log)
        self.sent, messages = {}, []
        self.digests = {a.client_id: a.digest for a in assignments}
        for a in assignments:
            node = self.registry.nodes[a.client_id]
            content = instruction_to_content(a.instruction, a.digest)
            messages.append(Message(content, dst_node_id=node.node_id, message_type="train",
                                    group_id=str(server_round)))
            self.sent[node.node_id] = a.client_id
        self.log("round_sent", {"round": server_round, "clients": sorted(self.sent.values())})
        self.outbox = messages
        return messages

    def _sender(self, reply: Message) -> int:
        """The node a reply answers for. Flower sets each message's id when it pushes it;
        a reply names that id, and an error reply the SuperLink writes itself (node gone)
        carries the SuperLink's node id as its source, not the node's."""
        ids = {m.metadata.message_id: m.metadata.dst_node_id for m in self.outbox
               if m.metadata.message_id}
        return ids.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def _outcome(self, cid: int, msg: Message) -> Outcome:
        if msg.has_error():
            if msg.error.code in _GONE:
                return Outcome(cid, gone=_GONE[msg.error.code])
            return Outcome(cid, error=f"the node replied with error {msg.error.code}: "
                                      f"{(msg.error.reason or '').strip()[:300]}")
        try:
            reply, digest = reply_from_content(msg.content)
        except MessageError as exc:
            return Outcome(cid, error=str(exc).splitlines()[0])
        return Outcome(cid, reply=reply, digest=digest)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        r = server_round - 1
        outcomes: dict[int, Outcome] = {}
        for msg in replies:
            node_id = self._sender(msg)
            cid = self.sent.get(node_id)
            if cid is None or cid in outcomes:
                self.log("ignored", {"round": server_round, "node_id": node_id,
                                     "reason": "reply from a node this round did not ask"})
                continue
            outcomes[cid] = self._outcome(cid, msg)
        timeout = f"no reply within the round timeout of {self.config.round_timeout} s"
        for cid in self.sent.values():
            outcomes.setdefault(cid, Outcome(cid, gone=timeout))
        result = self.policy.aggregate(r, list(outcomes.values()))
        node_of = {cid: nid for nid, cid in self.sent.items()}
        round_log = self.history[-1]
        for rec in result.records:
            cid, kind = rec["client_id"], rec["kind"]
            entry = {"client_id": cid, "node_id": node_of.get(cid), "reason": rec["reason"]}
            if kind == "trained":
                reply = next(x for x in result.accepted if x.client_id == cid)
                round_log["replies"].append({
                    "client_id": cid, "node_id": node_of[cid],
                    "plan_digest": self.digests.get(cid),
                    "measured_peak_bytes": reply.measured_peak_bytes,
                    "budget_bytes": reply.budget_bytes, "num_examples": reply.num_samples,
                    "train_loss": reply.mean_loss, "train_seconds": reply.train_seconds,
                    **{k: v for k, v in rec.items() if k not in entry and k != "kind"}})
            elif kind == "skipped":
                round_log["skipped"].append({"client_id": cid, "reason": rec["reason"]})
            elif kind == "no_reply":
                round_log["no_reply"].append(entry)
                self.registry.drop(cid, rec["reason"] + "; dropped until it reconnects")
            else:
                round_log["rejected"].append({**entry, "kind": kind})
        m = result.metrics
        round_log.update(participants=m["clients"], train_loss=m["train_loss"],
                         bytes_sent=m["bytes_sent"],
                         simulated_round_seconds=m["round_seconds"],
                         **{k: v for k, v in m.items() if k in _EXTRA_KEYS(self.policy, r)})
        metrics = MetricRecord({"participants": m["participants"],
                                "rejected": len(round_log["rejected"]),
                                "no-reply": len(round_log["no_reply"]),
                                "num-examples": sum(x.num_samples for x in result.accepted),
                                "train-loss": m["train_loss"]})
        return arrays_to_record(result.weights), metrics

    # ---- evaluate: centralised, in the server app --------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        self.log("strategy", {"strategy": self.policy.name,
                              "clients_per_round": self.config.clients_per_round,
                              "round_timeout": self.config.round_timeout,
                              "nodes": len(self.registry.online())})
