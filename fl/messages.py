"""What the server and a client say to each other, as plain data (never pickles).

A message is two parts, which map one to one onto any engine's record types (Flower's
``ConfigRecord``/``MetricRecord`` and ``ArrayRecord``):

* ``meta``: a JSON-able dict (numbers, strings, lists, dicts), including the plan as the
  dict of :meth:`fedplan.Plan.to_json`;
* ``arrays``: named numpy arrays (the model's ``state_dict``, parameters and buffers).

:class:`TrainInstruction` goes to a client, :class:`ClientReply` comes back.
:func:`to_bytes` / :func:`from_bytes` put either on a wire (a JSON header plus raw
little-endian array bytes; decoding never unpickles anything), and
:func:`validate_reply` checks a reply against the weights that were sent: the same
names, shapes and dtypes, every value finite, a positive sample count. Rejections say
what was expected and what was found.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "ClientReply",
    "MessageError",
    "TrainInstruction",
    "from_bytes",
    "state_from_arrays",
    "state_to_arrays",
    "to_bytes",
    "validate_reply",
]

_MAGIC = b"FPM1"


class MessageError(ValueError):
    """A message that cannot be decoded, or a reply the server rejects."""


# --------------------------------------------------------------------------- tensors


def state_to_arrays(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A ``state_dict`` as named numpy arrays (copies, contiguous, in the dict's order)."""
    return {name: t.detach().cpu().contiguous().numpy().copy() for name, t in state.items()}


def state_from_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Named numpy arrays as a ``state_dict`` of tensors (copies)."""
    return {name: torch.from_numpy(np.array(a, copy=True)) for name, a in arrays.items()}


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, eq=False)
class TrainInstruction:
    """Server to client: train these weights with this plan for this many epochs.

    ``plan`` is :meth:`fedplan.Plan.to_json` output; ``seed`` seeds the client's batch
    order and dropout so a round repeats exactly.
    """

    round: int
    client_id: int
    plan: dict[str, Any]
    weights: dict[str, np.ndarray]
    epochs: int
    batch_size: int
    lr: float
    seed: int
    budget_bytes: int
    task: dict[str, Any] = field(default_factory=dict)
    """What to train, for strategies that train part of the model (JSON: the strategy's
    name and its block, width or cut; :mod:`fedplan.fl.strategies`). Empty: the whole
    model, as sent."""

    def to_message(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta = {"kind": "train", "round": self.round, "client_id": self.client_id,
                "plan": self.plan, "epochs": self.epochs, "batch_size": self.batch_size,
                "lr": self.lr, "seed": self.seed, "budget_bytes": self.budget_bytes,
                "task": dict(self.task)}
        return meta, dict(self.weights)

    @classmethod
    def from_message(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
                     ) -> TrainInstruction:
        _expect_kind(meta, "train")
        try:
            return cls(round=int(meta["round"]), client_id=int(meta["client_id"]),
                       plan=dict(meta["plan"]), weights=dict(arrays),
                       epochs=int(meta["epochs"]), batch_size=int(meta["batch_size"]),
                       lr=float(meta["lr"]), seed=int(meta["seed"]),
                       budget_bytes=int(meta["budget_bytes"]),
                       task=dict(meta.get("task") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise MessageError(f"train instruction: missing or malformed field {exc}") from exc


@dataclass(frozen=True, eq=False)
class ClientReply:
    """Client to server: the trained weights and what training cost and saw.

    ``loss_sum``/``loss_sq_sum``/``loss_count`` summarise the per-sample training losses
    of every local step (what Oort's statistical utility needs); ``measured_peak_bytes``
    is the profiler-measured peak of the client's profiled steps (the first two local
    steps: one without and one with optimizer state), held against ``budget_bytes``.
    """

    round: int
    client_id: int
    weights: dict[str, np.ndarray]
    num_samples: int
    steps: int
    loss_sum: float
    loss_sq_sum: float
    loss_count: int
    measured_peak_bytes: int
    budget_bytes: int
    train_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.loss_count if self.loss_count else math.nan

    def to_message(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta = {"kind": "reply", "round": self.round, "client_id": self.client_id,
                "num_samples": self.num_samples, "steps": self.steps,
                "loss_sum": self.loss_sum, "loss_sq_sum": self.loss_sq_sum,
                "loss_count": self.loss_count,
                "measured_peak_bytes": self.measured_peak_bytes,
                "budget_bytes": self.budget_bytes, "train_seconds": self.train_seconds,
                "extra": dict(self.extra)}
        return meta, dict(self.weights)

    @classmethod
    def from_message(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
                     ) -> ClientReply:
        _expect_kind(meta, "reply")
        try:
            return cls(round=int(meta["round"]), client_id=int(meta["client_id"]),
                       weights=dict(arrays), num_samples=int(meta["num_samples"]),
                       steps=int(meta["steps"]), loss_sum=float(meta["loss_sum"]),
                       loss_sq_sum=float(meta["loss_sq_sum"]),
                       loss_count=int(meta["loss_count"]),
                       measured_peak_bytes=int(meta["measured_peak_bytes"]),
                       budget_bytes=int(meta["budget_bytes"]),
                       train_seconds=float(meta["train_seconds"]),
                       extra=dict(meta.get("extra", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise MessageError(f"client reply: missing or malformed field {exc}") from exc


def _expect_kind(meta: Mapping[str, Any], kind: str) -> None:
    if not isinstance(meta, Mapping) or meta.get("kind") != kind:
        found = meta.get("kind") if isinstance(meta, Mapping) else type(meta).__name__
        raise MessageError(f"expected a {kind!r} message; found {found!r}")


# --------------------------------------------------------------------------- wire format


def to_bytes(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> bytes:
    """``FPM1``, a 4-byte header length, a JSON header (meta and array directory), then
    the arrays' raw little-endian bytes in directory order."""
    directory, chunks, offset = [], [], 0
    for name, array in arrays.items():
        a = np.asarray(array, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        if a.dtype.hasobject:
            raise MessageError(f"array {name!r} has dtype object; only numeric arrays travel")
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        raw = a.tobytes()
        directory.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape),
                          "offset": offset, "nbytes": len(raw)})
        chunks.append(raw)
        offset += len(raw)
    header = json.dumps({"meta": meta, "arrays": directory}, allow_nan=True).encode()
    return _MAGIC + struct.pack("<I", len(header)) + header + b"".join(chunks)


def from_bytes(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Inverse of :func:`to_bytes`; raises :class:`MessageError` on anything malformed."""
    if len(data) < 8 or data[:4] != _MAGIC:
        raise MessageError("not a fedplan message (bad magic bytes)")
    (length,) = struct.unpack("<I", data[4:8])
    try:
        header = json.loads(data[8:8 + length])
        meta, directory = header["meta"], header["arrays"]
    except (ValueError, KeyError, TypeError) as exc:
        raise MessageError(f"message header is not valid JSON ({exc})") from exc
    body = memoryview(data)[8 + length:]
    arrays = {}
    for entry in directory:
        start, nbytes = int(entry["offset"]), int(entry["nbytes"])
        if start + nbytes > len(body):
            raise MessageError(f"array {entry['name']!r} is truncated")
        dtype = np.dtype(entry["dtype"])
        if dtype.hasobject:
            raise MessageError(f"array {entry['name']!r} has dtype object")
        arrays[entry["name"]] = np.frombuffer(body[start:start + nbytes], dtype=dtype
                                              ).reshape(tuple(entry["shape"])).copy()
    return meta, arrays


# --------------------------------------------------------------------------- validation


def validate_reply(reply: ClientReply, sent: Mapping[str, np.ndarray], *,
                   round_index: int | None = None, client_id: int | None = None) -> None:
    """Raise :class:`MessageError` unless ``reply`` carries weights the server can average.

    Checks: the round and client match (when given); exactly the names that were sent;
    for each, the same shape and dtype; every floating value finite; a positive sample
    count and finite loss statistics.
    """
    who = f"client {reply.client_id} (round {reply.round})"
    if round_index is not None and reply.round != round_index:
        raise MessageError(f"{who}: reply is for round {reply.round}; expected {round_index}")
    if client_id is not None and reply.client_id != client_id:
        raise MessageError(f"reply from client {reply.client_id}; expected client {client_id}")
    missing = [n for n in sent if n not in reply.weights]
    extra = [n for n in reply.weights if n not in sent]
    if missing or extra:
        raise MessageError(
            f"{who}: tensor names differ from those sent"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unexpected {', '.join(extra)}" if extra else "") + "; reply rejected")
    for name, expected in sent.items():
        got = np.asarray(reply.weights[name])
        if got.shape != expected.shape or got.dtype != expected.dtype:
            raise MessageError(
                f"{who}: tensor {name!r} expected shape {tuple(expected.shape)} "
                f"{expected.dtype}; found {tuple(got.shape)} {got.dtype}; reply rejected")
        if np.issubdtype(got.dtype, np.floating) and not np.all(np.isfinite(got)):
            bad = int(np.size(got) - np.count_nonzero(np.isfinite(got)))
            raise MessageError(f"{who}: tensor {name!r} has {bad} NaN/Inf values; "
                               "reply rejected")
    if reply.num_samples <= 0:
        raise MessageError(f"{who}: expected a positive sample count; found "
                           f"{reply.num_samples}; reply rejected")
    for label, value in (("loss_sum", reply.loss_sum), ("loss_sq_sum", reply.loss_sq_sum)):
        if not math.isfinite(value):
            raise MessageError(f"{who}: {label} is {value}; reply rejected")
