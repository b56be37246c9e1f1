"""The nodes the server knows: discovered by a ``query`` message, planned by the plan cache.

Flower gives every SuperNode a random node id and keeps its ``node_config`` on the node,
so the server learns who is there by asking: :meth:`NodeRegistry.discover` sends a
``query`` message to every node id it has not seen yet and registers each reply as a
:class:`KnownNode`: the node's :class:`~.config.NodeSpec`, its budget in bytes, the plan
cache's entry for that budget (a plan, or why none fits) and the
:class:`~fedplan.fl.selectors.Candidate` the selectors see (the same fields as in the
embedded simulation).

The client id the selectors and the seeds use is the node's ``partition-id``; its
``client-key`` names the device in logs and summaries. A node that reconnects (a restarted
SuperNode gets a new node id) with the id of a node that was dropped takes its place and
keeps the selector's history; a second *online* node claiming an id already held is
refused with a log line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedplan.errors import BadInputError
from fedplan.fl.client import local_steps
from fedplan.fl.plan_cache import CachedPlan, Infeasible, PlanCache
from fedplan.fl.policy import ClientInfo, make_candidate
from fedplan.fl.selectors import Candidate

from .config import NodeSpec
from .records import plan_digest

__all__ = ["KnownNode", "NodeRegistry"]

_CANDIDATE_FIELDS = {f.name for f in fields(Candidate)}


def decisions_digest(plan_json: dict[str, Any]) -> str:
    """A digest of what a plan decides (its decisions, step choices and budget), without
    the solve's timings that make :func:`plan_digest` differ between processes: two
    processes that planned the same thing agree on it (the parity tests compare it)."""
    return plan_digest({key: plan_json.get(key) for key in
                        ("decisions", "step", "budget_bytes", "fingerprint", "batch_size")})


@dataclass
class KnownNode:
    """A node that answered the query."""

    node_id: int
    spec: NodeSpec
    budget_bytes: int
    entry: CachedPlan | Infeasible
    candidate: Candidate
    online: bool = True

    @property
    def client_id(self) -> int:
        return self.spec.partition_id

    @property
    def digest(self) -> str | None:
        return plan_digest(self.entry.plan_json) if isinstance(self.entry, CachedPlan) else None

    def summary(self) -> dict[str, Any]:
        entry = self.entry
        out = {"client_id": self.client_id, "client_key": self.spec.key,
               "num_samples": self.candidate.num_samples,
               "node_id": self.node_id, "tier": self.spec.tier, "speed": self.spec.speed,
               "budget_bytes": self.budget_bytes, "online": self.online,
               "fault": self.spec.fault, "plan_digest": self.digest,
               "bucket": entry.bucket, "plan_edge_bytes": entry.edge_bytes}
        if isinstance(entry, CachedPlan):
            out.update(recomputed=entry.recomputed,
                       cached_measured_peak_bytes=entry.measured_peak_bytes,
                       decisions_digest=decisions_digest(entry.plan_json))
        else:
            out.update(no_plan_reason=entry.reason)
        return out


class NodeRegistry:
    """Known nodes by client id, planned against one :class:`PlanCache`."""

    def __init__(self, cache: PlanCache, *, batch_size: int, epochs: int,
                 log: Callable[[str, dict[str, Any]], None]):
        self.cache, self.batch_size, self.epochs = cache, batch_size, epochs
        self.log = log  # (kind, fields) -> None
        self.nodes: dict[int, KnownNode] = {}
        self.seen: set[int] = set()  # node ids ever queried (answered or not)
        self.num_partitions: int | None = None

    def online(self) -> list[KnownNode]:
        return [n for _, n in sorted(self.nodes.items()) if n.online]

    def by_node_id(self, node_id: int) -> KnownNode | None:
        return next((n for n in self.nodes.values() if n.node_id == node_id), None)

    def drop(self, client_id: int, reason: str) -> None:
        node = self.nodes[client_id]
        node.online = False
        self.log("dropped", {"client_id": client_id, "node_id": node.node_id,
                             "reason": reason})

    def discover(self, grid: Grid, *, timeout: float, group: str) -> list[KnownNode]:
        """Query every node id not seen before; register the answers. Returns the new
        nodes."""
        fresh = [nid for nid in grid.get_node_ids() if nid not in self.seen]
        if not fresh:
            return []
        self.seen.update(fresh)
        messages = [Message(RecordDict({"query": ConfigRecord({"want": "node-config"})}),
                            dst_node_id=nid, message_type="query", group_id=group)
                    for nid in fresh]
        added = []
        replied = set()
        for reply in grid.send_and_receive(messages, timeout=timeout):
            # the pushed messages now carry their ids; a reply names the one it answers
            ids = {m.metadata.message_id: m.metadata.dst_node_id for m in messages
                   if m.metadata.message_id}
            nid = ids.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            replied.add(nid)
            if reply.has_error():
                self.log("query_failed", {"node_id": nid, "reason": reply.error.reason})
                continue
            try:
                info = dict(reply.content["node"])
                num_samples = int(info.pop("num-examples"))
                if num_samples < 1:
                    raise BadInputError(f"node holds {num_samples} samples")
                spec = NodeSpec.from_node_config(info)
                added.append(self.register(nid, spec, num_samples))
            except (BadInputError, KeyError, TypeError, ValueError) as exc:
                self.log("refused", {"node_id": nid, "reason": f"{type(exc).__name__}: {exc}"})
        for nid in set(fresh) - replied:
            self.log("query_failed", {"node_id": nid,
                                      "reason": f"no reply within {timeout} s"})
        return added

    def register(self, node_id: int, spec: NodeSpec, num_samples: int) -> KnownNode:
        """Plan for a node that answered the query (raises BadInputError to refuse it)."""
        self.seen.add(node_id)
        if self.num_partitions is None:
            self.num_partitions = spec.num_partitions
        elif spec.num_partitions != self.num_partitions:
            raise BadInputError(f"node says num-partitions={spec.num_partitions}; the "
                                f"federation has {self.num_partitions}; node refused")
        held = self.nodes.get(spec.partition_id)
        if held is not None and held.online:
            raise BadInputError(f"partition-id {spec.partition_id} is already held by node "
                                f"{held.node_id} ({held.spec.key}); node refused")
        budget = spec.budget_for(self.cache.keep_all_bytes)
        entry = self.cache.lookup(budget)
        # the same candidate fields build_federation gives an embedded client
        candidate = make_candidate(
            ClientInfo(client_id=spec.partition_id, budget_bytes=budget, speed=spec.speed,
                       num_samples=num_samples), entry,
            steps=local_steps(num_samples, self.batch_size, self.epochs),
            keep_all_bytes=self.cache.keep_all_bytes,
            keep_all_step_seconds=self.cache.base_step_seconds)
        node = KnownNode(node_id=node_id, spec=spec, budget_bytes=budget, entry=entry,
                         candidate=candidate)
        self.nodes[spec.partition_id] = node
        self.log("joined", node.summary())
        return node

    def candidates(self) -> list[Candidate]:
        return [n.candidate for n in self.online()]

    def client_infos(self) -> list[ClientInfo]:
        """The online nodes as the round policy sees clients."""
        return [ClientInfo(client_id=n.client_id, budget_bytes=n.budget_bytes,
                           speed=n.spec.speed, num_samples=n.candidate.num_samples)
                for n in self.online()]

    def summaries(self) -> list[dict[str, Any]]:
        return [n.summary() for _, n in sorted(self.nodes.items())]

    def ids(self) -> Iterable[int]:
        return sorted(self.nodes)
