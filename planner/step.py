"""Step-level decisions: how the whole training step runs, beside the per-activation plan.

A plan decides per activation (keep, recompute, compress) and, for the step:

* ``microbatches`` (k): the batch runs as k chunks with gradient accumulation, so the
  activations and operator temporaries are those of one chunk, while every gradient is
  held from the first chunk's backward on (``simulate(..., gradients_held=True)``);
* ``optimizer_in_backward``: each parameter is updated as soon as its gradient is
  complete and the gradient is freed at once (``simulate(..., optimizer_in_backward=True)``);
* ``state_bits``: the optimizer's state (SGD momentum, Adam moments) held in 8-bit
  block-wise codes between steps instead of 32-bit floats.

Which the planner may use is the user's list of decision names (``DECISIONS``). What
cannot run together is refused here, once: the step inside backward needs every gradient
of the step at once, so it excludes micro-batches (gradient accumulation).

Torch-free: the planner reads these as plain data; ``fedplan.runtime.step`` runs them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from .costmodel import CostModel
from .errors import BadInputError

RECOMPUTE = "recompute"
COMPRESS = "compress"
MICROBATCH = "microbatch"
IN_BACKWARD = "optimizer-in-backward"
STATE = "compress-optimizer-state"
DECISIONS = (RECOMPUTE, COMPRESS, MICROBATCH, IN_BACKWARD, STATE)
#: decisions that change nothing a user would call a different training run: recompute
#: and the step inside backward reproduce the step bit for bit, micro-batches up to the
#: order of a floating-point sum (the planner drops them for models with batch-coupled
#: layers such as BatchNorm, where the batch statistics would change)
DEFAULT_DECISIONS = (RECOMPUTE, MICROBATCH, IN_BACKWARD)
#: decisions that change the numbers a step computes; used only when asked for
NUMERICS_CHANGING = (COMPRESS, STATE)


def parse_decisions(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """The decision names in ``value`` ("all", a comma-separated string or a list)."""
    if value is None:
        return DEFAULT_DECISIONS
    names = [part.strip() for part in value.split(",")] if isinstance(value, str) else list(
        value)
    names = [name for name in names if name]
    if names == ["all"]:
        return DECISIONS
    unknown = [name for name in names if name not in DECISIONS]
    if unknown or not names:
        raise BadInputError(
            f"expected decisions from {', '.join(DECISIONS)} (or all); found "
            f"{', '.join(unknown) or 'none'}; pass a comma-separated list such as "
            f"--decisions recompute,microbatch")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True, kw_only=True)
class StepChoice:
    """The step-level part of a plan."""

    microbatches: int = 1
    """Chunks the batch runs as, with gradient accumulation (1: the whole batch)."""
    optimizer_in_backward: bool = False
    """Update each parameter inside backward and free its gradient at once."""
    state_bits: int = 32
    """Bits per element of the optimizer's state between steps: 32 (floats) or 8."""

    def __post_init__(self) -> None:
        if self.microbatches < 1:
            raise BadInputError(f"expected microbatches >= 1; found {self.microbatches}")
        if self.state_bits not in (8, 32):
            raise BadInputError(f"expected state_bits 8 or 32; found {self.state_bits}")
        if self.optimizer_in_backward and self.microbatches > 1:
            raise BadInputError(
                "the optimizer step inside backward cannot run with micro-batches: gradient "
                "accumulation needs every chunk's gradient before any update; choose one")

    @property
    def is_ordinary(self) -> bool:
        """Runs as ``loss.backward(); optimizer.step()`` with 32-bit state."""
        return self.microbatches == 1 and not self.optimizer_in_backward and \
            self.state_bits == 32

    def describe(self) -> str:
        parts = []
        if self.microbatches > 1:
            parts.append(f"{self.microbatches} micro-batches")
        if self.optimizer_in_backward:
            parts.append("optimizer step inside backward")
        if self.state_bits != 32:
            parts.append(f"{self.state_bits}-bit optimizer state")
        return ", ".join(parts) or "ordinary step"

    def to_json(self) -> dict:
        return {"microbatches": self.microbatches,
                "optimizer_in_backward": self.optimizer_in_backward,
                "state_bits": self.state_bits}

    @classmethod
    def from_json(cls, data: dict | None) -> StepChoice:
        data = dict(data or {})
        return cls(microbatches=int(data.get("microbatches", 1)),
                   optimizer_in_backward=bool(data.get("optimizer_in_backward", False)),
                   state_bits=int(data.get("state_bits", 32)))


def microbatch_counts(batch_size: int, limit: int = 64) -> list[int]:
    """The micro-batch counts worth trying: the divisors of the batch above 1, up to
    ``limit`` (equal chunks: a plan is captured for one chunk shape)."""
    return [k for k in range(2, min(batch_size, limit) + 1) if batch_size % k == 0]


def step_choices(decisions: Sequence[str], batch_size: int, *,
                 batch_coupled: bool) -> list[StepChoice]:
    """Every step configuration the allowed ``decisions`` permit, ordinary first.

    Micro-batches are left out for models with batch-coupled layers unless the user named
    ``microbatch`` explicitly (``batch_coupled`` and not in the default set is the caller's
    call: it passes the decisions it resolved).
    """
    counts = [1] + (microbatch_counts(batch_size) if MICROBATCH in decisions
                    and not batch_coupled else [])
    in_backward = [False, True] if IN_BACKWARD in decisions else [False]
    state = [32, 8] if STATE in decisions else [32]
    choices = []
    for bits in state:
        for backward in in_backward:
            for count in counts:
                if backward and count > 1:
                    continue  # refused combination (see StepChoice)
                choices.append(StepChoice(microbatches=count, optimizer_in_backward=backward,
                                          state_bits=bits))
    return choices


def step_costs(costs: CostModel, choice: StepChoice, *, full_batch_input_bytes: int,
               state_bytes: int | None = None, state_step_temp_bytes: int | None = None,
               step_temp_per_byte: float | None = None) -> CostModel:
    """The cost model of one step under ``choice``, lowered so that the ordinary simulator
    (and every solver that reads a cost model) sees the step as it will run.

    ``costs`` is the cost model of what one forward/backward processes: the whole batch,
    or one chunk when ``choice.microbatches > 1`` (analysed at the chunk size). The
    lowering is exact or conservative against ``simulate``'s step flags
    (``tests/test_step_plans.py`` holds them side by side):

    * micro-batches: every parameter's gradient is held from the start (a later chunk
      accumulates into it): its bytes join the fixed costs, and each node's backward gets
      its parameters' gradient bytes as a transient (the fresh gradient before it is
      added); a parameter used by several nodes also has its first contribution held
      through the backward of every node between its users, and their sum made out of
      place at its first user; the caller holds the whole batch
      (``full_batch_input_bytes``);
    * optimizer step inside backward: a parameter used by one node only has no gradient
      held past that node's backward: its bytes and its share of the optimizer step's
      temporaries become that node's backward transient, and no step runs at the end; a
      parameter used by several nodes (tied weights) keeps its gradient to the end; a
      parameter's own step allocates ``step_temp_per_byte`` times its bytes (measured on
      the largest parameter: torch's Adam allocates two temporaries of a parameter's size,
      which a share of the whole step's temporaries under-counts), or its share of the
      whole step's temporaries when not given;
    * 8-bit optimizer state: the state's bytes and the 8-bit step's own scratch.
    """
    nodes = {cost.name: cost for cost in costs.nodes}
    params = dict(costs.params)
    fixed_extra = 0
    step_temp = costs.optimizer_step_temp_bytes
    if state_bytes is not None:
        step_temp = state_step_temp_bytes or 0
    kept_params = dict(params)
    if choice.microbatches > 1:
        fixed_extra += sum(params.values())
        extra = dict.fromkeys(nodes, 0)
        for name, cost in nodes.items():
            extra[name] += sum(params.get(param, 0) for param in cost.params)
        # a parameter several nodes use (tied weights): autograd sums its contributions
        # before accumulating, so the contribution of the last user in forward order (the
        # first in backward) is held from that node's backward until the first user's is
        # done (GPT's tied 256 KiB embedding: measured 261,584 B above the lowering
        # without this)
        order = [cost.name for cost in costs.nodes]
        users: dict[str, list[int]] = {}
        for position, cost in enumerate(costs.nodes):
            for param in cost.params:
                users.setdefault(param, []).append(position)
        for param, positions in users.items():
            if len(positions) > 1:
                for position in range(positions[0], positions[-1]):
                    extra[order[position]] += params.get(param, 0)
                # the first user's backward adds its contribution to the held one out of
                # place before accumulating: three copies at once (measured on a tied
                # embedding at one sample per micro-batch: 1,935,120 B, one copy above the
                # lowering without this)
                extra[order[positions[0]]] += params.get(param, 0)
        for name, cost in nodes.items():
            if extra[name]:
                nodes[name] = replace(cost, backward_temp_bytes=cost.backward_temp_bytes
                                      + extra[name])
        kept_params = {}
    elif choice.optimizer_in_backward:
        users: dict[str, list[str]] = {}
        for cost in costs.nodes:
            for param in cost.params:
                users.setdefault(param, []).append(cost.name)
        total = max(sum(params.values()), 1)
        moved = 0
        for param, names in users.items():
            if len(names) != 1:
                continue
            size = params.get(param, 0)
            cost = nodes[names[0]]
            share = (int(step_temp_per_byte * size) if step_temp_per_byte is not None
                     else step_temp * size // total)
            nodes[names[0]] = replace(cost, backward_temp_bytes=cost.backward_temp_bytes
                                      + size + share)
            kept_params.pop(param, None)
            moved += size
        # what stays (tied weights) is stepped at the end: its share of the temporaries
        step_temp = step_temp * (total - moved) // total
    return replace(
        costs, nodes=tuple(nodes[cost.name] for cost in costs.nodes),
        params=tuple((param, size) for param, size in costs.params if param in kept_params),
        buffer_bytes=costs.buffer_bytes + fixed_extra,
        input_bytes=full_batch_input_bytes,
        optimizer_state_bytes=(costs.optimizer_state_bytes if state_bytes is None
                               else state_bytes),
        optimizer_step_temp_bytes=step_temp)
