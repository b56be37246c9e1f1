"""The embedded federation: set-up, round loop, FedAvg, faults, checkpoints, resume.

:func:`build_federation` turns a :class:`SimConfig` into a :class:`Federation` (dataset,
partitions, device profiles, the plan cache, one :class:`~.selectors.Candidate` per
client). :class:`Server` runs rounds over it:

1. the selector picks up to ``clients_per_round`` clients;
2. each gets the cached plan for its budget (a client no plan fits is skipped and
   logged), and a :class:`~.messages.TrainInstruction` that goes through the wire format
   (:func:`~.messages.to_bytes`) exactly as it would over a network;
3. the client function trains (by default :func:`~.client.train_client` in-process);
   a client that raises, replies with NaN/Inf or wrongly named or shaped tensors, or
   whose simulated time exceeds the deadline is rejected and logged, and the round goes
   on with the rest; a measured peak above the client's budget is counted in
   ``budget_violations`` and the update rejected;
4. FedAvg weighted by sample counts, evaluation on the held-out test set, the simulated
   clock advanced by the slowest client (:mod:`.clock`);
5. the server state (weights as named arrays, selector state, clock, history, the
   config) is written atomically to ``out_dir/state.npz`` (no pickle).

:meth:`Server.resume` reads that file back; every random choice is derived from
``(seed, round, client)``, so a resumed run ends with the same weights as one that was
never interrupted.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedplan.errors import BadInputError
from fedplan.modelfile import ModelSpec, load_model_file
from fedplan.planner.plan import write_atomic

from . import data as fldata
from . import devices as fldevices
from .client import local_steps
from .messages import (
    ClientReply,
    MessageError,
    TrainInstruction,
    from_bytes,
    to_bytes,
    validate_reply,
)
from .models import default_model
from .plan_cache import PlanCache
from .policy import ClientInfo, Outcome, RoundPolicy, derive_seed, evaluate, fedavg
from .policy import make_candidate as _make_candidate
from .selectors import SELECTORS, Candidate, Selector
from .strategies import make_policy, run_instruction, strategy_names

__all__ = ["DEFAULT_MODEL", "Federation", "Server", "SimConfig", "build_federation",
           "derive_seed", "evaluate", "fedavg", "run_simulation"]

DEFAULT_MODEL = default_model("mnist5k")
"""The packaged model of the default dataset (each dataset's: :mod:`.models`)."""
STATE_FILE = "state.npz"
PARTITIONS = ("dirichlet", "iid", "shards", "correlated")
MIN_SAMPLES = 10
"""Smallest partition the Dirichlet partitioners accept (they redraw until it holds)."""


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """Everything that defines a simulated federation; two equal configs give equal runs."""

    model: str = ""
    """A model file (README's contract) for the dataset's inputs; empty: the dataset's
    packaged default (:mod:`.models`), or a dataset file's ``DEFAULT_MODEL``."""
    dataset: str = "mnist5k"
    """``mnist5k``, ``fashion-mnist``, ``digits``, ``shakespeare`` (:mod:`.data`) or a
    dataset file ``path/to/data.py`` (README's contract: ``load_clients``)."""
    num_clients: int = 100
    rounds: int = 30
    clients_per_round: int = 10
    selector: str = "fedhybrid"
    """``exclude``, ``random``, ``oort`` or ``fedhybrid`` (:mod:`.selectors`)."""
    strategy: str = ""
    """A round policy by name (:mod:`.strategies`): a selector's name, or ``profl``,
    ``neulite``, ``smartsplit``, ``heterofl``. Empty: the selection policy of
    ``selector``."""
    strategy_options: dict[str, Any] = field(default_factory=dict)
    """Keyword options of the strategy (see its class)."""
    partition: str = "dirichlet"
    """``dirichlet`` (label skew, ``alpha``), ``iid``, ``shards`` (``shards_per_client``
    classes' shards each) or ``correlated`` (memory-poor clients, those whose budget is
    below the keep-all peak, hold ``poor_classes``; the rest hold the other classes;
    ``leak`` of each class crosses over; Dirichlet(``alpha``) within each side)."""
    alpha: float = 0.5
    shards_per_client: int = 2
    poor_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    leak: float = 0.05
    tiers: str = "default"
    """``default`` (the packaged tier table), a tier CSV, or fractions of the keep-all peak
    like ``0.3,0.6,1.2`` (:func:`.devices.parse_tiers_arg`)."""
    tier_anchor: str = "6GB"
    """Tier-table mode: the tier whose training memory is mapped onto ``anchor_headroom``
    times the keep-all peak (every tier scaled by the same factor); ``median``, ``min``,
    ``max`` or a tier name. With the default table and ``6GB`` at 1.1: 2GB, 3GB and 4GB
    devices (54 % of devices) get 0.37, 0.55 and 0.73 of keep-all."""
    anchor_headroom: float = 1.1
    epochs: int = 2
    """Local epochs per round (full batches only)."""
    batch_size: int | None = None
    """Default: the model file's ``DEFAULT_BATCH_SIZE``."""
    lr: float = 0.05
    seed: int = 0
    deadline_seconds: float | None = None
    """Simulated seconds a client may take per round; slower clients are dropped."""
    max_client_samples: int | None = None
    """Keep at most this many samples of each client's partition (its first ones, in the
    partition's seeded order); None keeps all. For quick runs on the 60k Fashion-MNIST."""
    plan_time_limit: float = 20.0
    """Seconds each plan solve may take (the plan cache's solver time limit)."""
    bucket_fraction: float = 0.025
    threads: int = 1
    """torch threads while the simulation runs (restored afterwards)."""
    selector_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        def bad(msg: str):
            raise BadInputError(msg)
        for name in ("num_clients", "rounds", "clients_per_round", "epochs", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(f"expected a positive integer for {name}; found {value!r}")
        if self.clients_per_round > self.num_clients:
            bad(f"clients_per_round {self.clients_per_round} exceeds num_clients "
                f"{self.num_clients}")
        if self.selector not in SELECTORS:
            bad(f"unknown selector {self.selector!r}; valid names: {', '.join(SELECTORS)}")
        if self.strategy and self.strategy not in strategy_names():
            bad(f"unknown strategy {self.strategy!r}; valid names: "
                f"{', '.join(strategy_names())}")
        if self.partition not in PARTITIONS:
            bad(f"unknown partition {self.partition!r}; valid: {', '.join(PARTITIONS)}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            bad(f"expected a positive alpha; found {self.alpha}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad(f"expected a positive learning rate; found {self.lr}")
        if self.deadline_seconds is not None and not self.deadline_seconds > 0:
            bad(f"expected a positive deadline; found {self.deadline_seconds}")
        if not (self.plan_time_limit > 0 and math.isfinite(self.plan_time_limit)):
            bad(f"expected a positive plan_time_limit; found {self.plan_time_limit}")
        if self.max_client_samples is not None and self.max_client_samples < 1:
            bad(f"expected a positive max_client_samples; found {self.max_client_samples}")
        if self.batch_size is not None and self.batch_size < 1:
            bad(f"expected a positive batch size; found {self.batch_size}")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["poor_classes"] = list(self.poor_classes)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SimConfig:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if "poor_classes" in kwargs:
            kwargs["poor_classes"] = tuple(kwargs["poor_classes"])
        return cls(**kwargs)


# --------------------------------------------------------------------------- set-up


@dataclass
class Federation:
    """The clients and everything shared: built once, used by every round."""

    config: SimConfig
    spec: ModelSpec
    dataset: fldata.Dataset
    devices: list[fldevices.DeviceProfile]
    partitions: list[torch.Tensor]
    cache: PlanCache
    candidates: list[Candidate]
    batch_size: int
    setup_seconds: float

    def client_data(self, client_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.partitions[client_id]
        return self.dataset.train_x[idx], self.dataset.train_y[idx]

    def summary(self) -> dict[str, Any]:
        keep_all = self.cache.keep_all_bytes
        return {
            "model": self.spec.name, "dataset": self.dataset.name,
            "clients": len(self.devices), "batch_size": self.batch_size,
            "keep_all_peak_bytes": keep_all,
            "clients_below_keep_all": sum(d.budget_bytes < keep_all for d in self.devices),
            "clients_without_plan": sum(not c.feasible for c in self.candidates),
            "tiers": {t: sum(d.tier == t for d in self.devices)
                      for t in sorted({d.tier for d in self.devices})},
            "plan_cache": self.cache.stats(),
            "setup_seconds": round(self.setup_seconds, 3),
        }


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the block, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _partitions(config: SimConfig, labels: torch.Tensor, devices, keep_all: int,
                min_size: int) -> list[torch.Tensor]:
    k, seed = config.num_clients, config.seed
    if config.partition == "iid":
        return fldata.partition_iid(labels, k, seed)
    if config.partition == "shards":
        return fldata.partition_shards(labels, k, config.shards_per_client, seed)
    if config.partition == "dirichlet":
        return fldata.partition_dirichlet(labels, k, config.alpha, seed, min_size=min_size)
    groups = [0 if d.budget_bytes < keep_all else 1 for d in devices]
    if len(set(groups)) < 2:
        raise BadInputError("partition 'correlated' needs clients both below and at or above "
                            "the keep-all peak; these device budgets are all on one side")
    rich = [c for c in range(10) if c not in config.poor_classes]
    return fldata.partition_correlated(labels, groups, {0: list(config.poor_classes),
                                                        1: rich},
                                       config.alpha, seed, config.leak, min_size=min_size)


def solver_options(time_limit: float):
    """The plan cache's solver options: one worker (CP-SAT workers race; the same seed
    must give the same plans) and ``time_limit`` seconds per solve."""
    import fedplan
    return fedplan.SolverOptions(workers=1, time_limit_seconds=float(time_limit))


def model_for(dataset: str) -> str:
    """The model file a federation on ``dataset`` uses when none is given: a dataset
    file's ``DEFAULT_MODEL`` (relative to the file), else the packaged default."""
    if fldata.is_dataset_file(dataset):
        import re
        text = Path(dataset).read_text(encoding="utf-8") if Path(dataset).is_file() else ""
        found = re.search(r"^DEFAULT_MODEL\s*=\s*[\"']([^\"']+)[\"']", text, re.M)
        if not found:
            raise BadInputError(f"{dataset}: a dataset file needs --model, or a line "
                                "DEFAULT_MODEL = 'model.py' naming its model file")
        return str((Path(dataset).parent / found.group(1)).resolve())
    try:
        return default_model(fldata._canonical(dataset))
    except ValueError as exc:
        raise BadInputError(str(exc)) from exc


def build_federation(config: SimConfig, progress: Callable[[str], None] | None = None, *,
                     cache: PlanCache | None = None) -> Federation:
    """Load model and data, plan once per budget bucket, draw devices and partitions.
    ``cache``: a plan cache already built for this model, batch size, learning rate and
    bucket width (benchmarks reuse one across seeds; plans do not depend on the seed)."""
    say = progress or (lambda _m: None)
    start = time.perf_counter()
    try:
        dataset, natural = fldata.load_federated(config.dataset, config.num_clients,
                                                 config.seed)
        tiers_arg = fldevices.parse_tiers_arg(config.tiers)
    except ValueError as exc:
        raise BadInputError(str(exc)) from exc
    spec = load_model_file(config.model or model_for(config.dataset))
    batch_size = config.batch_size or spec.default_batch_size
    (inputs, *rest), targets = spec.batch(batch_size)
    if rest or tuple(inputs.shape[1:]) != dataset.input_shape:
        raise BadInputError(
            f"{spec.path}: example_batch gives inputs of shape {tuple(inputs.shape[1:])} per "
            f"sample; dataset {dataset.name!r} has {dataset.input_shape}; pick a model for "
            f"{dataset.input_shape} images")
    say(f"tracing and measuring {spec.name} (batch {batch_size})")
    with torch_threads(config.threads):
        if cache is None:
            cache = PlanCache(spec.build, inputs, targets, lr=config.lr,
                              loss_fn=spec.loss_fn, bucket_fraction=config.bucket_fraction,
                              progress=say, options=solver_options(config.plan_time_limit))
        keep_all = cache.keep_all_bytes
        try:
            if tiers_arg.fractions is not None:
                devices = tiers_arg.devices(config.num_clients, keep_all, config.seed,
                                            assignment="shuffled")
            else:
                tiers = fldevices.scale_tiers(
                    tiers_arg.tiers, round(config.anchor_headroom * keep_all),
                    anchor=config.tier_anchor if config.tier_anchor in
                    {t.tier for t in tiers_arg.tiers} | {"median", "min", "max"} else "median")
                # quota: exact tier counts (largest remainder), in seeded random order
                devices = fldevices.sample_devices(config.num_clients, tiers, config.seed,
                                                   method="quota")
            partitions = natural if natural is not None else _partitions(
                config, dataset.train_y, devices, keep_all, MIN_SAMPLES)
            if config.max_client_samples is not None:
                partitions = [p[:config.max_client_samples] for p in partitions]
        except ValueError as exc:
            raise BadInputError(str(exc)) from exc
        candidates = [
            _make_candidate(ClientInfo(client_id=cid, budget_bytes=device.budget_bytes,
                                       speed=device.speed, num_samples=len(part)),
                            cache.lookup(device.budget_bytes),
                            steps=local_steps(len(part), batch_size, config.epochs),
                            keep_all_bytes=keep_all,
                            keep_all_step_seconds=cache.base_step_seconds)
            for cid, (device, part) in enumerate(zip(devices, partitions))]
    return Federation(config=config, spec=spec, dataset=dataset, devices=devices,
                      partitions=partitions, cache=cache, candidates=candidates,
                      batch_size=batch_size, setup_seconds=time.perf_counter() - start)


def _derive_seed(*parts: int) -> int:
    return derive_seed(*parts)


# --------------------------------------------------------------------------- the server

ClientFn = Callable[[TrainInstruction], ClientReply]
_ROUND_KEYS = {"selected", "participants", "skipped", "rejected", "stragglers", "violations",
               "no_reply", "round_seconds", "train_loss", "max_peak_over_budget",
               "bytes_sent", "clients"}


class Server:
    """The embedded driver of a :class:`~.policy.RoundPolicy` over a :class:`Federation`
    (see the module doc for one round)."""

    def __init__(self, federation: Federation, *, out_dir: str | os.PathLike | None = None,
                 client_fn: ClientFn | None = None):
        self.fed = federation
        self.config = federation.config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.client_fn = client_fn or self.local_client
        self.events: list[dict[str, Any]] = []  # skipped / rejected clients, with reasons
        self.round = 0                      # rounds completed
        self.policy: RoundPolicy = make_policy(federation, log=self._log_event)
        self.selector: Selector = self.policy.selector
        self.weights = self.policy.initial_weights()
        self.clock = 0.0                    # simulated seconds
        self.history: list[dict[str, Any]] = []
        self.clients = [ClientInfo(client_id=cid, budget_bytes=d.budget_bytes, speed=d.speed,
                                   num_samples=len(part))
                        for cid, (d, part) in enumerate(zip(federation.devices,
                                                            federation.partitions))]

    # ---- the default client: in-process training on the client's partition -------------
    def local_client(self, instruction: TrainInstruction) -> ClientReply:
        x, y = self.fed.client_data(instruction.client_id)
        return run_instruction(instruction, x, y, self.fed.spec)

    def _log_event(self, kind: str, fields_: dict[str, Any]) -> None:
        if kind == "ignored":
            return
        self.events.append({"round": fields_["round"], "client_id": fields_["client_id"],
                            "kind": kind, "reason": fields_["reason"]})

    def _call_client(self, instruction: TrainInstruction) -> ClientReply:
        """Send through the wire format and back, as a network would."""
        sent = TrainInstruction.from_message(*from_bytes(to_bytes(*instruction.to_message())))
        reply = self.client_fn(sent)
        if not isinstance(reply, ClientReply):
            raise MessageError(f"client returned {type(reply).__name__}, not a ClientReply")
        return ClientReply.from_message(*from_bytes(to_bytes(*reply.to_message())))

    def run_round(self) -> dict[str, Any]:
        r = self.round
        outcomes = []
        for assignment in self.policy.configure(r, self.clients, self.weights):
            try:
                reply = self._call_client(assignment.instruction)
            except Exception as exc:  # a client's failure must not end the round
                first = str(exc).splitlines()[0] if str(exc) else ""
                outcomes.append(Outcome(assignment.client_id,
                                        error=f"{type(exc).__name__}: {first}"))
                continue
            outcomes.append(Outcome(assignment.client_id, reply=reply))
        result = self.policy.aggregate(r, outcomes)
        self.weights = result.weights
        m = result.metrics
        self.clock += m["round_seconds"]
        accuracy, test_loss = self.policy.evaluate(self.weights, self.fed.dataset.test_x,
                                                   self.fed.dataset.test_y)
        below = [cid for cid in m["clients"] if not self.fed.candidates[cid].fits_keep_all]
        metrics = {
            "round": r + 1, "simulated_seconds": self.clock,
            "round_seconds": m["round_seconds"], "accuracy": accuracy,
            "test_loss": test_loss, "train_loss": m["train_loss"],
            "selected": m["selected"], "participants": m["participants"],
            "below_keep_all": len(below),
            **{k: m[k] for k in ("skipped", "rejected", "stragglers", "violations")},
            "max_peak_over_budget": m["max_peak_over_budget"],
            "bytes_sent": m["bytes_sent"],
            **{k: v for k, v in m.items() if k not in _ROUND_KEYS},
            "clients": m["clients"],
            "peaks": [[x["client_id"], x["measured_peak_bytes"], x["budget_bytes"]]
                      for x in result.records if "measured_peak_bytes" in x],
        }
        self.history.append(metrics)
        self.round += 1
        if self.out_dir is not None:
            self.save_state(self.out_dir / STATE_FILE)
        return metrics

    def run(self, on_round: Callable[[dict[str, Any]], None] | None = None
            ) -> dict[str, Any]:
        with torch_threads(self.config.threads):
            while self.round < self.config.rounds:
                metrics = self.run_round()
                if on_round is not None:
                    on_round(metrics)
        return self.result()

    # ---- results -------------------------------------------------------------------------
    def result(self) -> dict[str, Any]:
        h = self.history
        participated = sorted({c for m in h for c in m["clients"]})
        return {
            "final_accuracy": h[-1]["accuracy"] if h else math.nan,
            "best_accuracy": max((m["accuracy"] for m in h), default=math.nan),
            "rounds": self.round,
            "simulated_seconds": self.clock,
            "budget_violations": sum(m["violations"] for m in h),
            "rejected": sum(m["rejected"] for m in h),
            "stragglers": sum(m["stragglers"] for m in h),
            "skipped_no_plan": sum(m["skipped"] for m in h),
            "participations": sum(m["participants"] for m in h),
            "participations_below_keep_all": sum(m["below_keep_all"] for m in h),
            "unique_participants": len(participated),
            "clients_trained": len(participated),
            "clients_trained_share": len(participated) / len(self.clients),
            "bytes_sent": sum(m.get("bytes_sent", 0) for m in h),
            "max_peak_over_budget": max((m["max_peak_over_budget"] for m in h
                                         if math.isfinite(m["max_peak_over_budget"])),
                                        default=math.nan),
            "selector": self.config.selector,
            "strategy": self.policy.name,
            "federation": self.fed.summary(),
            "config": self.config.to_json(),
            "history": h,
            "events": self.events,
        }

    # ---- checkpoints ---------------------------------------------------------------------
    def save_state(self, path: Path) -> Path:
        """Weights as named arrays plus a JSON document, in one ``.npz``, atomically."""
        meta = {"version": 1, "round": self.round, "clock": self.clock,
                "config": self.config.to_json(), "history": self.history,
                "events": self.events, "policy": self.policy.state_dict()}
        arrays = {f"w/{k}": v for k, v in self.weights.items()}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomic(path, lambda stream: np.savez(stream, **arrays), binary=True)

    @staticmethod
    def read_state(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        path = Path(path)
        if path.is_dir():
            path = path / STATE_FILE
        if not path.is_file():
            raise BadInputError(f"no server state at {str(path)!r}; --resume takes the --out "
                                "folder of an earlier run")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                weights = {k[2:]: z[k] for k in z.files if k.startswith("w/")}
        except (OSError, ValueError, KeyError) as exc:
            raise BadInputError(f"server state {str(path)!r} is unreadable ({exc})") from exc
        return meta, weights

    def load_state(self, meta: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
        mine = self.config.to_json()
        theirs = dict(meta["config"])
        differ = [k for k in mine if k != "rounds" and mine[k] != theirs.get(k)]
        if differ:
            raise BadInputError(
                f"the saved state was made with a different configuration ({', '.join(differ)}"
                f" differ); resume with the same options (only --rounds may change)")
        validate_reply(ClientReply(round=0, client_id=0, weights=weights, num_samples=1,
                                   steps=0, loss_sum=0.0, loss_sq_sum=0.0, loss_count=0,
                                   measured_peak_bytes=0, budget_bytes=0, train_seconds=0.0),
                       self.weights)
        self.weights = {k: weights[k] for k in self.weights}
        self.round, self.clock = int(meta["round"]), float(meta["clock"])
        self.history, self.events = list(meta["history"]), list(meta["events"])
        self.policy.load_state_dict(meta["policy"])


def run_simulation(config: SimConfig, *, out_dir: str | os.PathLike | None = None,
                   resume: str | os.PathLike | None = None,
                   progress: Callable[[str], None] | None = None,
                   on_round: Callable[[dict[str, Any]], None] | None = None,
                   client_fn: ClientFn | None = None) -> dict[str, Any]:
    """Build the federation, run (or resume) it, and return the result dict."""
    start = time.perf_counter()
    federation = build_federation(config, progress)
    server = Server(federation, out_dir=out_dir if out_dir is not None else resume,
                    client_fn=client_fn)
    if resume is not None:
        server.load_state(*Server.read_state(resume))
    result = server.run(on_round)
    result["wall_seconds"] = time.perf_counter() - start
    return result
