"""Plan: the contract between the planner and everything downstream.

A plan is frozen plain data: a schema version, the fingerprint of the traced model it was
made for, the batch size, budget and optimizer, one decision per candidate node
(``keep`` or ``recompute``; compression adds ``compress:...``), the predicted peak and
overhead, and what the solver reported (name, status, objective, bound, wall time).
It round-trips through JSON; files are written atomically (temporary file, then rename)
and never pickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import IO, Any

from .errors import BadInputError, PlanMismatchError
from .step import StepChoice

# 2: plans are made for torch.export captures (node names are ATen-level) and carry the
# model's input signature; 3: decisions only (the runtime's pack and unpin points are
# lowered again from them, planner.program), so a version-2 file reads as well
SCHEMA_VERSION = 3
READABLE_VERSIONS = (2, 3)
KEEP = "keep"
RECOMPUTE = "recompute"


@dataclass(frozen=True)
class Plan:
    """One decision per candidate node, plus what it was made for and what it predicts."""

    fingerprint: str
    model_name: str
    batch_size: int
    budget_bytes: int
    optimizer: str
    decisions: tuple[tuple[str, str], ...]
    predicted_peak_bytes: int
    predicted_overhead_seconds: float
    keep_all_peak_bytes: int
    solver: str
    status: str                     # optimal | feasible | heuristic | baseline
    objective: float
    bound: float | None
    solve_seconds: float
    breakdown: Mapping[str, int] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    notes: tuple[str, ...] = ()
    # shapes and dtypes of the model's inputs (planner.capture.input_signature): lets a
    # saved plan capture its model again without the user's data
    inputs: Mapping[str, Any] = field(default_factory=dict)
    # step-level decisions (planner.step.StepChoice as JSON): micro-batches, the optimizer
    # step inside backward, the optimizer state's precision; empty: an ordinary step
    step: Mapping[str, Any] = field(default_factory=dict)

    @property
    def step_choice(self) -> StepChoice:
        return StepChoice.from_json(dict(self.step))

    @cached_property
    def decision_map(self) -> dict[str, str]:
        return dict(self.decisions)

    def decision(self, node: str) -> str:
        return self.decision_map.get(node, KEEP)

    @property
    def recomputed(self) -> list[str]:
        return [name for name, d in self.decisions if d == RECOMPUTE]

    @property
    def kept(self) -> list[str]:
        return [name for name, d in self.decisions if d == KEEP]

    @property
    def compressed(self) -> list[str]:
        return [name for name, d in self.decisions if d.startswith("compress:")]

    @property
    def gap(self) -> float | None:
        """Relative optimality gap (objective - bound) / objective; 0 when proven optimal."""
        if self.bound is None:
            return None
        if self.objective <= 0:
            return 0.0
        return max(0.0, (self.objective - self.bound) / self.objective)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, decision in self.decisions:
            counts[decision] = counts.get(decision, 0) + 1
        return counts

    # ---- serialisation -----------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["decisions"] = dict(self.decisions)
        data["breakdown"] = dict(self.breakdown)
        data["notes"] = list(self.notes)
        data["inputs"] = dict(self.inputs)
        data["step"] = dict(self.step)
        data.pop("decision_map", None)
        return {"schema_version": data.pop("schema_version"), **data}

    @classmethod
    def from_json(cls, data: Any, *, source: str = "plan") -> Plan:
        if not isinstance(data, dict):
            raise BadInputError(f"{source}: expected a JSON object; found "
                                f"{type(data).__name__}")
        version = data.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise PlanMismatchError(
                f"{source}: plan schema version {version!r}; this fedplan reads version "
                f"{SCHEMA_VERSION}; re-run `fedplan compile` to make a new plan")
        try:
            decisions = data["decisions"]
            if not isinstance(decisions, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in decisions.items()):
                raise TypeError("decisions must map node names to strings")
            return cls(
                fingerprint=str(data["fingerprint"]), model_name=str(data["model_name"]),
                batch_size=int(data["batch_size"]), budget_bytes=int(data["budget_bytes"]),
                optimizer=str(data["optimizer"]), decisions=tuple(decisions.items()),
                predicted_peak_bytes=int(data["predicted_peak_bytes"]),
                predicted_overhead_seconds=float(data["predicted_overhead_seconds"]),
                keep_all_peak_bytes=int(data["keep_all_peak_bytes"]),
                solver=str(data["solver"]), status=str(data["status"]),
                objective=float(data["objective"]),
                bound=None if data.get("bound") is None else float(data["bound"]),
                solve_seconds=float(data["solve_seconds"]),
                breakdown={str(k): int(v) for k, v in dict(data.get("breakdown", {})).items()},
                notes=tuple(str(n) for n in data.get("notes", ())),
                inputs=dict(data.get("inputs", {})),
                step=_step_json(StepChoice.from_json(data.get("step"))))
        except (KeyError, TypeError, ValueError) as exc:
            missing = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise BadInputError(f"{source}: not a valid fedplan plan ({missing}); re-run "
                                f"`fedplan compile` to make a new plan") from exc

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON atomically: a reader sees the old file or the new one."""
        return write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise BadInputError(f"plan file {str(path)!r} not found; make one with "
                                f"`fedplan compile MODEL.py --budget SIZE -o {path}`")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadInputError(f"plan file {str(path)!r} is not valid JSON ({exc}); it may "
                                f"be truncated or corrupt: re-run `fedplan compile`") from exc
        return cls.from_json(data, source=f"plan file {str(path)!r}")

    def check_matches(self, *, fingerprint: str | None = None, batch_size: int | None = None,
                      optimizer: str | None = None, source: str = "plan") -> None:
        """Raise PlanMismatchError if this plan was made for another model or setting;
        each check runs only when its argument is given."""
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise PlanMismatchError(
                f"{source} was made for model {self.model_name!r} with fingerprint "
                f"{self.fingerprint}; this model traces to {fingerprint}; compile a plan "
                f"for this model")
        if batch_size is not None and batch_size != self.batch_size:
            raise PlanMismatchError(
                f"{source} was made for batch size {self.batch_size}; found {batch_size}; "
                f"use --batch-size {self.batch_size} or compile a plan for {batch_size}")
        if optimizer is not None and optimizer != self.optimizer:
            raise PlanMismatchError(
                f"{source} was made for optimizer {self.optimizer!r}; found {optimizer!r}; "
                f"compile a plan for {optimizer!r}")


def _step_json(choice: StepChoice) -> dict[str, Any]:
    """A plan stores an ordinary step as {} (what a plan without step decisions has)."""
    return {} if choice.is_ordinary else choice.to_json()


def write_atomic(path: str | os.PathLike, write: Callable[[IO], Any], *,
                 binary: bool = False) -> Path:
    """Call ``write(stream)`` on a temporary file in ``path``'s folder, fsync, then rename
    it over ``path``: a reader sees the old file or the new one, never a partial one."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise BadInputError(f"cannot write {str(path)!r}: folder {str(folder)!r} does not exist")
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb" if binary else "w") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would surprise a user's output file
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON to a temporary file in the same folder, fsync, then rename over ``path``."""
    def write(stream) -> None:
        json.dump(data, stream, indent=2)
        stream.write("\n")
    return write_atomic(path, write)
