"""What a fedplan Flower run is told: the run config (one per run) and each node's config.

Flower hands both to the apps as flat ``UserConfig`` dicts (TOML scalars). This module
turns them into frozen, validated dataclasses; a bad value raises
:class:`fedplan.errors.BadInputError` naming the key, what was expected and what was found.

**Run config** (``[tool.flwr.app.config]`` of the app's ``pyproject.toml``, overridden with
``flwr run ... --run-config 'key=value'``): see :class:`FlowerRunConfig`; every field is
the key with ``_`` written ``-``.

**Node config** (``flower-supernode --node-config '...'``, one per device): see
:class:`NodeSpec`. The server cannot read a node's ``node_config`` (Flower keeps it on the
node), so the server app asks every node for it with a ``query`` message first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedplan.errors import BadInputError
from fedplan.units import parse_size

__all__ = ["FAULTS", "FlowerRunConfig", "NodeSpec"]

PARTITIONS = ("iid", "dirichlet", "shards")
FAULTS = ("none", "nan", "delay", "bad-digest")


def _bad(key: str, expected: str, found: Any) -> BadInputError:
    return BadInputError(f"{key}: expected {expected}; found {found!r}")


@dataclass(frozen=True, kw_only=True)
class FlowerRunConfig:
    """One run of the fedplan Flower app (server and clients read the same values)."""

    model: str = ""
    """Model file (README's contract) taking (B, 1, H, W) images; the same path must exist
    on the server and on every SuperNode. Empty: the dataset's packaged default model
    (:mod:`fedplan.fl.models`)."""
    dataset: str = "mnist5k"
    """``mnist5k``, ``fashion-mnist`` or ``digits`` (:mod:`fedplan.fl.data`); every node
    reads its own partition of it, the server its test split."""
    partition: str = "iid"
    """How node ``partition-id`` of ``num-partitions`` gets its samples: ``iid``,
    ``dirichlet`` (label skew, ``alpha``) or ``shards`` (``shards-per-client``)."""
    alpha: float = 0.5
    shards_per_client: int = 2
    num_server_rounds: int = 3
    clients_per_round: int = 10
    """Nodes selected per round (at most the nodes known)."""
    selector: str = "fedhybrid"
    """``exclude``, ``random``, ``oort`` or ``fedhybrid`` (:mod:`fedplan.fl.selectors`)."""
    strategy: str = ""
    """A round policy by name (:mod:`fedplan.fl.strategies`: a selector's name, or
    ``profl``, ``neulite``, ``smartsplit``, ``heterofl``); empty: ``selector``'s."""
    epochs: int = 1
    batch_size: int = 0
    """0: the model file's ``DEFAULT_BATCH_SIZE``."""
    lr: float = 0.05
    seed: int = 0
    bucket_fraction: float = 0.025
    """Plan-cache bucket width as a fraction of the keep-all peak."""
    min_nodes: int = 2
    """Nodes that must have connected before the query round starts."""
    node_wait_seconds: float = 120.0
    """How long the server waits for ``min-nodes`` nodes before it gives up."""
    round_timeout: float = 120.0
    """Seconds the server waits for replies in a round; a node that has not replied by
    then is dropped from the federation until it connects again (a restarted SuperNode
    gets a new node id and is queried again; its ``client-key`` keeps its history)."""
    threads: int = 1
    """torch threads in the server app and in every client app."""
    plan_time_limit: float = 20.0
    """Seconds each plan solve may take (the embedded simulation's ``plan_time_limit``;
    the strategies' own plan caches get it too)."""
    strategy_options: str = ""
    """Keyword options of ``strategy``: ``name=value`` pairs separated by commas
    (``edge_fail_round=2,edge_speed=4``); a value is read as an integer, else a number,
    else text. The names are checked against the strategy's class."""
    test_clients: int = 10
    """Naturally split datasets (``shakespeare``): the federation size whose held-out
    windows make the server's test set (set it to the nodes' ``num-partitions``)."""
    out_dir: str = ""
    """Folder for ``summary.json`` (rewritten after every phase) and the global weights
    after each round (``weights-round-R.npz``); empty: write nothing."""

    def __post_init__(self):
        for name in ("num_server_rounds", "clients_per_round", "epochs", "min_nodes",
                     "threads", "shards_per_client", "test_clients"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _bad(_key(name), "a positive integer", value)
        if not isinstance(self.batch_size, int) or self.batch_size < 0:
            raise _bad("batch-size", "0 (the model's default) or a positive integer",
                       self.batch_size)
        if self.partition not in PARTITIONS:
            raise _bad("partition", f"one of {', '.join(PARTITIONS)} (``correlated`` needs "
                       "every budget at partition time, which no node knows)", self.partition)
        for name in ("alpha", "lr", "round_timeout", "node_wait_seconds", "plan_time_limit"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise _bad(_key(name), "a positive number", value)
        if not 0 < self.bucket_fraction < 1:
            raise _bad("bucket-fraction", "a number in (0, 1)", self.bucket_fraction)
        if self.strategy:
            from fedplan.fl.strategies import strategy_names
            if self.strategy not in strategy_names():
                raise _bad("strategy", f"one of {', '.join(strategy_names())}", self.strategy)
        options = self.options()  # raises on a malformed or unknown option
        if options and not self.strategy:
            raise _bad("strategy-options", "no options without a strategy",
                       self.strategy_options)
        if options:
            known = _strategy_keywords(self.strategy)
            unknown = sorted(set(options) - known)
            if unknown:
                raise _bad("strategy-options", f"options of {self.strategy} "
                           f"({', '.join(sorted(known)) or 'none'})", ", ".join(unknown))

    def options(self) -> dict[str, Any]:
        """``strategy_options`` as keyword arguments."""
        text = str(self.strategy_options).strip()
        out: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, sep, value = item.partition("=")
            name, value = name.strip().replace("-", "_"), value.strip()
            if not sep or not name.isidentifier() or not value:
                raise _bad("strategy-options", "name=value pairs separated by commas",
                           self.strategy_options)
            for kind in (int, float):
                try:
                    out[name] = kind(value)
                    break
                except ValueError:
                    continue
            else:
                out[name] = value
        return out

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FlowerRunConfig:
        """Read the known keys (``-`` or ``_`` spelled); unknown keys are ignored so that a
        user's own app may add its own."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in run_config.items():
            name = str(key).replace("-", "_")
            if name not in known:
                continue
            default = known[name].default
            if isinstance(default, float) and isinstance(value, int) \
                    and not isinstance(value, bool):
                value = float(value)
            kwargs[name] = value
        return cls(**kwargs)

    def to_json(self) -> dict[str, Any]:
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}

    @property
    def model_path(self) -> str:
        from fedplan.fl.server import model_for  # the embedded layer's default

        return self.model or model_for(self.dataset)


def _strategy_keywords(strategy: str) -> set[str]:
    """Keyword options a strategy's policy class takes (beyond what every policy gets)."""
    import inspect

    from fedplan.fl.strategies import STRATEGIES

    names: set[str] = set()
    for klass in getattr(STRATEGIES.get(strategy), "__mro__", ()):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        names |= {p.name for p in inspect.signature(init).parameters.values()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY}
    # what every policy is given, and plan-time-limit (its own key)
    return names - {"config", "cache", "spec", "log", "model_factory", "selector",
                    "plan_time_limit"}


def _key(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True, kw_only=True)
class NodeSpec:
    """What one SuperNode says about itself (its ``node_config``).

    Keys: ``partition-id`` and ``num-partitions`` (required: which share of the dataset the
    node holds; the partition id is also the client id the selectors and the seeds use),
    ``budget`` (training-memory budget: ``512MB``, ``0.5GiB`` or bytes) *or*
    ``budget-fraction`` (a fraction of the model's measured keep-all peak, for demos and
    tests), ``tier`` (a device-tier label, reported only), ``speed`` (relative compute
    speed, default 1.0, used by the selectors), ``client-key`` (a stable name for the
    device; default ``partition-<id>``), and ``fault`` (a **test hook**, see
    :data:`FAULTS`: ``nan`` replies NaN weights, ``delay:SECONDS`` sleeps before training,
    ``bad-digest`` echoes a wrong plan digest; never set it in production).
    """

    partition_id: int
    num_partitions: int
    budget_bytes: int | None = None
    budget_fraction: float | None = None
    tier: str = ""
    speed: float = 1.0
    client_key: str = ""
    fault: str = "none"

    def __post_init__(self):
        for name in ("partition_id", "num_partitions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise _bad(_key(name), "a non-negative integer", value)
        if not self.partition_id < self.num_partitions:
            raise _bad("partition-id", f"an id below num-partitions={self.num_partitions}",
                       self.partition_id)
        if (self.budget_bytes is None) == (self.budget_fraction is None):
            raise BadInputError("node config: expected exactly one of budget (e.g. "
                                "budget=\"512MB\") and budget-fraction; found "
                                f"budget={self.budget_bytes!r}, "
                                f"budget-fraction={self.budget_fraction!r}")
        if self.budget_fraction is not None and not (
                math.isfinite(self.budget_fraction) and self.budget_fraction > 0):
            raise _bad("budget-fraction", "a positive number", self.budget_fraction)
        if not (math.isfinite(self.speed) and self.speed > 0):
            raise _bad("speed", "a positive number", self.speed)
        kind = self.fault.split(":", 1)[0]
        if kind not in FAULTS:
            raise _bad("fault", f"one of {', '.join(FAULTS)} (a test hook)", self.fault)
        if kind == "delay":
            try:
                float(self.fault.split(":", 1)[1])
            except (IndexError, ValueError):
                raise _bad("fault", "delay:SECONDS", self.fault) from None

    @property
    def key(self) -> str:
        return self.client_key or f"partition-{self.partition_id}"

    def budget_for(self, keep_all_bytes: int) -> int:
        """The node's budget in bytes (a fraction is resolved against ``keep_all_bytes``)."""
        if self.budget_bytes is not None:
            return self.budget_bytes
        return max(1, round(float(self.budget_fraction) * keep_all_bytes))

    @classmethod
    def from_node_config(cls, config: Mapping[str, Any]) -> NodeSpec:
        def get(key: str, default: Any = None) -> Any:
            return config.get(key, config.get(key.replace("-", "_"), default))

        missing = [k for k in ("partition-id", "num-partitions") if get(k) is None]
        if missing:
            raise BadInputError(f"node config: missing {', '.join(missing)}; start the "
                                "SuperNode with --node-config 'partition-id=0 "
                                "num-partitions=10 budget=\"512MB\"'")
        budget = get("budget")
        fraction = get("budget-fraction")
        try:
            speed = float(get("speed", 1.0))
        except (TypeError, ValueError):
            raise _bad("speed", "a positive number", get("speed")) from None
        return cls(
            partition_id=get("partition-id"), num_partitions=get("num-partitions"),
            budget_bytes=None if budget is None else parse_size(budget, what="budget"),
            budget_fraction=None if fraction is None else float(fraction),
            tier=str(get("tier", "")), speed=speed, client_key=str(get("client-key", "")),
            fault=str(get("fault", "none")))

    def to_config(self) -> dict[str, Any]:
        """Flat TOML-scalar dict for a ``ConfigRecord`` (the query reply)."""
        out: dict[str, Any] = {"partition-id": self.partition_id,
                               "num-partitions": self.num_partitions, "tier": self.tier,
                               "speed": self.speed, "client-key": self.key,
                               "fault": self.fault}
        if self.budget_bytes is not None:
            out["budget"] = self.budget_bytes
        else:
            out["budget-fraction"] = float(self.budget_fraction)
        return out
