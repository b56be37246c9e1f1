"""One whole training step, with the step-level decisions of a plan.

``train_step`` runs forward, loss, backward and the optimizer step for a module and
returns the loss. Two step-level decisions change how it runs (``StepOptions``):

* **micro-batches** (``microbatches=k``): the batch is split along dim 0 into ``k``
  chunks (sizes differ by at most one); each chunk runs forward and backward on its own
  and its loss is scaled by ``chunk_size / batch_size``, so the accumulated gradient is
  the full-batch gradient of a mean loss (up to summation order). Activations and
  operator temporaries are those of one chunk. Batch-coupled layers (BatchNorm) see
  smaller batches: a numerics-changing decision there.
* **the optimizer step inside backward** (``optimizer_in_backward=True``): every
  parameter is updated by the caller's own optimizer as soon as autograd has accumulated
  its gradient (``Tensor.register_post_accumulate_grad_hook``, PyTorch's "fuse the
  optimizer step into backward" recipe, torchtune's ``OptimizerInBackward``), and its
  gradient is freed at once, so at most a few gradients are alive at any time instead of
  all of them. The updated parameters are bit-identical to ``loss.backward();
  optimizer.step()`` (tested for SGD with momentum and weight decay, and Adam). It cannot
  be combined with gradient accumulation (micro-batches) or global-norm clipping, which
  need every gradient before any update: asking for either raises
  :class:`IncompatibleStepOptionsError`.

With the default options ``train_step`` is exactly ``optimizer.zero_grad(set_to_none=True);
loss_fn(module(*inputs), targets).backward(); optimizer.step()``, bit for bit.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedplan.planner.errors import BadInputError

LOSS_REDUCTIONS = ("mean", "sum")

Inputs = torch.Tensor | Sequence[Any] | Mapping[str, Any]


class IncompatibleStepOptionsError(BadInputError):
    """Step-level options that cannot run together (in-backward with accumulation or
    global-norm clipping), or options that do not fit the batch."""


@dataclass(frozen=True, kw_only=True)
class StepOptions:
    """The step-level decisions of one training step (validated on construction)."""

    microbatches: int = 1
    """Split the batch along dim 0 into this many chunks and accumulate their gradients.
    Chunk sizes differ by at most one (``torch.tensor_split``); must not exceed the batch."""

    optimizer_in_backward: bool = False
    """Step each parameter inside backward as soon as its gradient is complete and free
    the gradient at once. Bit-identical to the ordinary step; excludes ``microbatches > 1``
    and ``max_grad_norm``."""

    max_grad_norm: float | None = None
    """Clip the global gradient norm (``torch.nn.utils.clip_grad_norm_``) before the
    optimizer step; None: no clipping."""

    loss_reduction: str = "mean"
    """How ``loss_fn`` reduces over the batch: ``"mean"`` (each chunk's loss is scaled by
    ``chunk_size / batch_size``) or ``"sum"`` (chunk losses add up unscaled)."""

    release_gradients: bool = True
    """Set the optimizer's gradients to None after the step, so nothing holds them between
    steps (the next step allocates them again anyway). False keeps them for inspection;
    with ``optimizer_in_backward`` they are freed inside backward regardless."""

    def __post_init__(self) -> None:
        if isinstance(self.microbatches, bool) or not isinstance(self.microbatches, int) \
                or self.microbatches < 1:
            raise BadInputError(f"expected microbatches to be an integer >= 1; found "
                                f"{self.microbatches!r}")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise BadInputError(f"expected loss_reduction one of {', '.join(LOSS_REDUCTIONS)}; "
                                f"found {self.loss_reduction!r}")
        if self.max_grad_norm is not None and not (self.max_grad_norm > 0):
            raise BadInputError(f"expected max_grad_norm > 0 or None; found "
                                f"{self.max_grad_norm!r}")
        if self.optimizer_in_backward and self.microbatches > 1:
            raise IncompatibleStepOptionsError(
                f"the optimizer step inside backward cannot be combined with micro-batches "
                f"(found microbatches={self.microbatches}): each parameter would be updated "
                f"after the first chunk, before its gradient is accumulated; use "
                f"microbatches=1 or optimizer_in_backward=False")
        if self.optimizer_in_backward and self.max_grad_norm is not None:
            raise IncompatibleStepOptionsError(
                f"the optimizer step inside backward cannot be combined with global-norm "
                f"clipping (found max_grad_norm={self.max_grad_norm}): the norm needs every "
                f"gradient before the first update; use max_grad_norm=None or "
                f"optimizer_in_backward=False")

    @property
    def is_ordinary(self) -> bool:
        """True when the step is the plain three lines (no step-level decision taken)."""
        return self.microbatches == 1 and not self.optimizer_in_backward


# ----------------------------------------------------------------------------- batches


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for item in value.values() for t in _tensors(item)]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def batch_size_of(inputs: Inputs, targets: Any = None) -> int:
    """The batch size: dim 0 shared by every tensor of ``inputs`` and ``targets``.

    Raises :class:`IncompatibleStepOptionsError` when tensors disagree (they cannot be
    split into micro-batches) or there is no tensor with a batch dimension.
    """
    tensors = _tensors(inputs) + _tensors(targets)
    if not tensors:
        raise IncompatibleStepOptionsError(
            "expected the inputs to hold at least one tensor; found none: pass the batch "
            "as a tensor, a tuple of tensors or a dict of keyword tensors")
    sizes = {tuple(t.shape[:1]) for t in tensors}
    if len(sizes) != 1 or () in sizes:
        raise IncompatibleStepOptionsError(
            f"expected every input and target tensor to share dim 0 (the batch); found "
            f"leading sizes {sorted(tuple(t.shape[:1]) for t in tensors)}: pass per-batch "
            f"tensors only (constants belong in the module), or use microbatches=1")
    return int(tensors[0].shape[0])


def _chunk(value: Any, microbatches: int) -> list[Any]:
    """``value`` split along dim 0 into views (non-tensors repeated)."""
    if isinstance(value, torch.Tensor):
        return list(torch.tensor_split(value, microbatches, dim=0))
    if isinstance(value, Mapping):
        parts = {key: _chunk(item, microbatches) for key, item in value.items()}
        return [{key: parts[key][i] for key in value} for i in range(microbatches)]
    if isinstance(value, (tuple, list)):
        parts = [_chunk(item, microbatches) for item in value]
        return [type(value)(part[i] for part in parts) for i in range(microbatches)]
    return [value] * microbatches


def split_batch(inputs: Inputs, targets: Any, microbatches: int
                ) -> list[tuple[Any, Any, int]]:
    """``(inputs, targets, chunk_size)`` per micro-batch: views along dim 0, no copies.

    Sizes follow ``torch.tensor_split``: the first ``batch % k`` chunks hold one more.
    """
    batch = batch_size_of(inputs, targets)
    if microbatches > batch:
        raise IncompatibleStepOptionsError(
            f"expected at most one micro-batch per sample; found microbatches="
            f"{microbatches} for a batch of {batch}: use microbatches <= {batch}")
    chunks_in = _chunk(inputs, microbatches)
    chunks_out = _chunk(targets, microbatches)
    sizes = [batch // microbatches + (1 if i < batch % microbatches else 0)
             for i in range(microbatches)]
    return list(zip(chunks_in, chunks_out, sizes))


def call_module(module: Callable, inputs: Inputs) -> Any:
    """``module(x)``, ``module(*inputs)`` or ``module(**inputs)`` by the inputs' kind."""
    if isinstance(inputs, torch.Tensor):
        return module(inputs)
    if isinstance(inputs, Mapping):
        return module(**inputs)
    return module(*inputs)


# ----------------------------------------------------------------------------- backward


def forward_backward(module: Callable, inputs: Inputs, targets: Any, loss_fn: Callable, *,
                     microbatches: int = 1, loss_reduction: str = "mean") -> torch.Tensor:
    """Forward and backward of one batch, accumulating into ``.grad``; returns the loss.

    ``loss_fn(outputs, targets)`` must return a scalar reduced over the batch by
    ``loss_reduction``. With ``microbatches=1`` this is ``loss_fn(module(...),
    targets).backward()`` exactly; with ``k`` chunks each chunk's loss is multiplied by
    ``chunk_size / batch_size`` (mean) before its backward, so the accumulated gradient is
    the full-batch gradient up to summation order. Returns the full-batch loss, detached:
    the sum of the scaled chunk losses (equal to the full-batch loss up to rounding).
    """
    if microbatches == 1:
        loss = loss_fn(call_module(module, inputs), targets)
        _check_loss(loss)
        loss.backward()
        return loss.detach()
    batch = batch_size_of(inputs, targets)
    total = None
    for chunk_inputs, chunk_targets, size in split_batch(inputs, targets, microbatches):
        loss = loss_fn(call_module(module, chunk_inputs), chunk_targets)
        _check_loss(loss)
        if loss_reduction == "mean":
            loss = loss * (size / batch)
        loss.backward()
        value = loss.detach()
        total = value if total is None else total + value
        del loss  # the chunk's graph is gone after backward; drop its outputs before the next
    return total


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        found = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise BadInputError(f"expected loss_fn to return a scalar tensor reduced over the "
                            f"batch; found {found}: reduce it with mean (or sum and "
                            f"loss_reduction='sum')")


class OptimizerInBackward:
    """While active, ``optimizer`` steps each of its parameters inside backward.

    ``with OptimizerInBackward(optimizer): loss.backward()`` registers one
    post-accumulate-grad hook per parameter of the optimizer (removed on exit). When
    autograd has accumulated a parameter's gradient, the hook runs the caller's optimizer
    on that parameter alone (its own param group's hyperparameters, read at that moment, so
    learning-rate schedules apply; its state in ``optimizer.state``, so ``state_dict``
    round-trips as usual) and sets the gradient to None. Per-parameter optimizers (SGD,
    Adam, AdamW, ... and ``runtime.optim_state``'s 8-bit ones) update each parameter from
    its own gradient and state only, so the result is bit-identical to one
    ``optimizer.step()`` after backward. Parameters that receive no gradient are not
    stepped, as ``optimizer.step()`` skips them. Step hooks registered on the optimizer run
    once per parameter.

    Not for optimizers whose step couples parameters (LBFGS, which needs a closure, is
    refused; a global trust ratio or norm would silently see one parameter), nor for models
    that save a *detached* alias of a parameter for a later backward node (the in-place
    update would trip autograd's version check; ordinary uses cannot: a parameter's
    gradient is complete only after every node that saved it has run).

    ``stepped`` counts the parameters updated while active.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        if isinstance(optimizer, torch.optim.LBFGS):
            raise IncompatibleStepOptionsError(
                "expected a per-parameter optimizer for the step inside backward; found "
                "LBFGS, whose step re-evaluates the whole model through a closure: use "
                "optimizer_in_backward=False")
        self.optimizer = optimizer
        self.stepped = 0
        self._handles: list[Any] = []

    def __enter__(self) -> OptimizerInBackward:
        if self._handles:
            raise RuntimeError("OptimizerInBackward is already active")
        self.stepped = 0
        for index, group in enumerate(self.optimizer.param_groups):
            for param in group["params"]:
                if param.requires_grad:
                    self._handles.append(param.register_post_accumulate_grad_hook(
                        functools.partial(self._step_one, index)))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _step_one(self, group_index: int, param: torch.Tensor) -> None:
        optimizer = self.optimizer
        groups = optimizer.param_groups
        single = dict(groups[group_index])
        single["params"] = [param]
        optimizer.param_groups = [single]
        try:
            optimizer.step()
        finally:
            optimizer.param_groups = groups
        param.grad = None
        self.stepped += 1


def _optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def train_step(module: nn.Module, inputs: Inputs, targets: Any, loss_fn: Callable,
               optimizer: torch.optim.Optimizer, *, options: StepOptions | None = None
               ) -> torch.Tensor:
    """Run one whole training step; return the full-batch loss (a detached 0-d tensor).

    ``inputs``: a tensor (``module(x)``), a tuple/list (``module(*inputs)``) or a dict of
    keyword tensors (``module(**inputs)``, Hugging Face style). ``targets``: a tensor, a
    nested structure of tensors, or None; the loss is ``loss_fn(outputs, targets)`` (for
    models that compute their own loss: ``loss_fn=lambda out, _: out.loss``).

    The step: gradients of the optimizer's parameters set to None; forward and backward
    (per micro-batch); clipping; ``optimizer.step()`` (or the step inside backward);
    gradients released (``options.release_gradients``). Raises
    :class:`IncompatibleStepOptionsError` for options that do not fit the batch.
    """
    options = StepOptions() if options is None else options
    if not isinstance(options, StepOptions):
        raise BadInputError(f"expected options to be a StepOptions; found "
                            f"{type(options).__name__}")
    if options.microbatches > 1:
        split_batch(inputs, targets, options.microbatches)  # validate before any work
    optimizer.zero_grad(set_to_none=True)
    if options.optimizer_in_backward:
        with OptimizerInBackward(optimizer):
            loss = forward_backward(module, inputs, targets, loss_fn,
                                    loss_reduction=options.loss_reduction)
        return loss
    loss = forward_backward(module, inputs, targets, loss_fn,
                            microbatches=options.microbatches,
                            loss_reduction=options.loss_reduction)
    if options.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(_optimizer_parameters(optimizer),
                                       options.max_grad_norm)
    optimizer.step()
    if options.release_gradients:
        optimizer.zero_grad(set_to_none=True)
    return loss


def gradient_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the gradients of the optimizer's parameters that require grad: the memory
    the step inside backward stops holding all at once."""
    return sum(math.prod(p.shape) * p.element_size() for p in _optimizer_parameters(optimizer)
               if p.requires_grad)
