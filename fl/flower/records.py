"""fedplan's messages as Flower records, and back (the only module that knows both).

A train message (server to node) is a fresh ``RecordDict`` per node:

* ``"arrays"``: ``ArrayRecord``, the global weights (named numpy arrays);
* ``"config"``: ``ConfigRecord``, the :class:`~fedplan.fl.messages.TrainInstruction`'s
  fields, the node's plan as a JSON string under ``"plan"``, its digest under
  ``"plan-digest"`` and its task (what part of the model to train) as JSON under
  ``"task"``.

A train reply (node to server):

* ``"arrays"``: the trained weights;
* ``"metrics"``: ``MetricRecord`` with ``num-examples`` (what FedAvg weights by),
  ``steps``, the training-loss statistics (``loss-sum``, ``loss-sq-sum``, ``loss-count``,
  ``train-loss``), ``measured-peak-bytes``, ``budget-bytes``, ``train-seconds``, ``round``
  and ``client-id``;
* ``"config"``: ``plan-digest`` (echoed back) and ``client-key``.

Everything is plain data (JSON text, numbers, raw arrays); nothing is pickled.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedplan.fl.messages import ClientReply, MessageError, TrainInstruction
from fedplan.fl.policy import plan_digest

__all__ = ["arrays_from_record", "arrays_to_record", "instruction_from_content",
           "instruction_to_content", "plan_digest", "reply_from_content", "reply_to_content"]


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """A new ``ArrayRecord`` holding copies of ``arrays`` (in order)."""
    return ArrayRecord({name: Array(np.array(a, copy=True)) for name, a in arrays.items()})


def arrays_from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: np.array(array.numpy(), copy=True) for name, array in record.items()}


def instruction_to_content(instruction: TrainInstruction, digest: str) -> RecordDict:
    """One node's train message content (new records: nothing is shared between nodes)."""
    meta, arrays = instruction.to_message()
    config = {k: v for k, v in meta.items() if k not in ("plan", "task")}
    config["plan"] = json.dumps(meta["plan"])
    config["task"] = json.dumps(meta["task"])
    config["plan-digest"] = digest
    return RecordDict({"arrays": arrays_to_record(arrays), "config": ConfigRecord(config)})


def instruction_from_content(content: RecordDict) -> tuple[TrainInstruction, str]:
    """(instruction, the digest the server sent); raises MessageError if malformed or if
    the plan does not hash to that digest."""
    try:
        config = dict(content["config"])
        arrays = arrays_from_record(content["arrays"])
        meta = dict(config)
        sent_digest = str(meta.pop("plan-digest"))
        meta["plan"] = json.loads(meta["plan"])
        meta["task"] = json.loads(meta.get("task", "{}"))
    except (KeyError, TypeError, ValueError) as exc:
        raise MessageError(f"train message: missing or malformed record {exc}") from exc
    found = plan_digest(meta["plan"])
    if found != sent_digest:
        raise MessageError(f"train message: the plan hashes to {found}, the server says "
                           f"{sent_digest}; the plan was altered in transit, refusing it")
    return TrainInstruction.from_message(meta, arrays), sent_digest


def reply_to_content(reply: ClientReply, digest: str, client_key: str) -> RecordDict:
    metrics = MetricRecord({
        "num-examples": int(reply.num_samples), "steps": int(reply.steps),
        "loss-sum": float(reply.loss_sum), "loss-sq-sum": float(reply.loss_sq_sum),
        "loss-count": int(reply.loss_count), "train-loss": float(reply.mean_loss),
        "measured-peak-bytes": int(reply.measured_peak_bytes),
        "budget-bytes": int(reply.budget_bytes), "train-seconds": float(reply.train_seconds),
        "round": int(reply.round), "client-id": int(reply.client_id)})
    return RecordDict({"arrays": arrays_to_record(reply.weights), "metrics": metrics,
                       "config": ConfigRecord({"plan-digest": digest,
                                               "client-key": client_key})})


def reply_from_content(content: RecordDict) -> tuple[ClientReply, str]:
    """(reply, the plan digest the node echoed); raises MessageError if malformed."""
    try:
        m = content["metrics"]
        digest = str(content["config"]["plan-digest"])
        reply = ClientReply(
            round=int(m["round"]), client_id=int(m["client-id"]),
            weights=arrays_from_record(content["arrays"]), num_samples=int(m["num-examples"]),
            steps=int(m["steps"]), loss_sum=float(m["loss-sum"]),
            loss_sq_sum=float(m["loss-sq-sum"]), loss_count=int(m["loss-count"]),
            measured_peak_bytes=int(m["measured-peak-bytes"]),
            budget_bytes=int(m["budget-bytes"]), train_seconds=float(m["train-seconds"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise MessageError(f"train reply: missing or malformed record {exc}") from exc
    return reply, digest
