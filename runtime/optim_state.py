"""Optimizers whose state is held in 8-bit block-wise form between steps.

``QuantizedSGD`` (momentum) and ``QuantizedAdam`` keep SGD's momentum and Adam's moments
in the block-wise dynamic 8-bit format of :mod:`fedplan.kernels.blockwise` (Dettmers et
al., ICLR'22): momentum and the first moment with the signed map, the second moment with
the unsigned map. A step works per parameter and per chunk of whole blocks: dequantize the
state into float32 scratch, apply exactly torch's single-tensor update (same operations in
the same order), update the parameter from the float32 state, quantize the state back.
The scratch buffers (a few chunks, under 1.5 MiB) are allocated once per ``step()`` call
and reused across chunks and parameters; they are freed when the step ends, so a measured
peak sees them.

Parameters with fewer than ``min_8bit_numel`` elements (biases, norms) keep float32 state,
as bitsandbytes does (4096): their state is small and 8 bits gain almost nothing there.
With ``StateQuantization(bits=32)`` every state is float32 and the optimizers reproduce
``torch.optim.SGD`` / ``torch.optim.Adam`` bit for bit (a control for the accuracy
benchmark; tested).

State is plain tensors in ``optimizer.state[param]``: ``momentum_codes`` (uint8) +
``momentum_absmax`` (float32), or ``momentum_buffer`` (float32, torch's name) when not
quantized; Adam: ``step`` (float32 scalar, as torch), ``exp_avg_codes`` /
``exp_avg_absmax`` / ``exp_avg_sq_codes`` / ``exp_avg_sq_absmax``, or ``exp_avg`` /
``exp_avg_sq``. ``state_dict`` / ``load_state_dict`` round-trip them unchanged. The step
works inside backward (``runtime.step.OptimizerInBackward``) like torch's optimizers.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from fedplan.kernels.blockwise import (
    BLOCK_SIZES,
    Workspace,
    blockwise_nbytes,
    dequantize_into,
    n_blocks,
    quantize_into,
)
from fedplan.planner.errors import BadInputError
from fedplan.planner.optimizers import check_optimizer

# Elements per chunk of the fused update: a multiple of every block size; the float32
# scratch is 4 buffers of this many elements (512 KiB) plus the kernels' workspace.
UPDATE_CHUNK = 1 << 15

QUANTIZED_SUFFIXES = ("_codes", "_absmax")


@dataclass(frozen=True, kw_only=True)
class StateQuantization:
    """How optimizer state is held between steps (validated on construction)."""

    bits: int = 8
    """8: block-wise dynamic 8-bit codes; 32: float32 (torch's own state, bit for bit)."""

    block_size: int = 256
    """Elements per block (one float32 absmax each): a power of two in [64, 4096]. 256
    costs 1.0156 bytes per element; 2048 costs 1.0020 but one outlier widens more codes."""

    min_8bit_numel: int = 4096
    """Parameters with fewer elements keep float32 state (bitsandbytes' default)."""

    def __post_init__(self) -> None:
        if self.bits not in (8, 32):
            raise BadInputError(f"expected state bits 8 or 32; found {self.bits!r}")
        if self.block_size not in BLOCK_SIZES:
            raise BadInputError(f"expected block_size one of {BLOCK_SIZES}; found "
                                f"{self.block_size!r}")
        if not isinstance(self.min_8bit_numel, int) or self.min_8bit_numel < 0:
            raise BadInputError(f"expected min_8bit_numel an integer >= 0; found "
                                f"{self.min_8bit_numel!r}")

    def quantizes(self, numel: int) -> bool:
        """Whether a parameter of ``numel`` elements gets 8-bit state."""
        return self.bits == 8 and numel >= self.min_8bit_numel and numel > 0


def compressed_state_bytes(name: str, param_numels: Iterable[int], *,
                           quantization: StateQuantization | None = None) -> int:
    """Exact bytes of state that ``QuantizedSGD`` (``"sgd"``, with momentum) or
    ``QuantizedAdam`` (``"adam"``) hold between steps for float32 parameters of these
    element counts (numels, not bytes): the 8-bit counterpart of
    ``planner.optimizers.optimizer_state_bytes``, which takes parameter *bytes*; with
    ``bits=32`` the two agree (``optimizer_state_bytes(name, [4 * n for n in numels])``)."""
    check_optimizer(name)
    quantization = quantization or StateQuantization()

    def one(numel: int) -> int:
        if quantization.quantizes(numel):
            return blockwise_nbytes(numel, quantization.block_size)
        return 4 * numel

    sizes = list(param_numels)
    if name == "sgd":
        return sum(one(n) for n in sizes)
    return sum(2 * one(n) + 4 for n in sizes)


def step_scratch_bytes(name: str, *, quantization: StateQuantization | None = None) -> int:
    """Bytes the 8-bit step allocates on top of parameters, gradients and state, whatever
    the parameters' sizes (when some parameter has at least ``UPDATE_CHUNK`` elements; an
    upper bound otherwise): the float32 chunk buffers (2 for SGD, 4 for Adam), the kernels'
    workspace (3 chunk buffers), one chunk-sized int32 temporary of the code comparison and
    the per-block absmax guard. Measured by the profiler: SGD 786,944 B, Adam 1,049,088 B
    at block 256 (tested). torch's own SGD/Adam steps instead allocate temporaries the size
    of the largest parameter (Adam: two)."""
    check_optimizer(name)
    quantization = quantization or StateQuantization()
    buffers = 2 if name == "sgd" else 4
    return 4 * UPDATE_CHUNK * (buffers + 3 + 1) + 4 * (UPDATE_CHUNK // quantization.block_size)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct tensors in ``optimizer.state`` (what it holds between steps)."""
    storages: dict[int, int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class _Scratch:
    """float32 buffers of one chunk plus the kernels' workspace, for one step() call."""

    def __init__(self, device: torch.device, count: int):
        self.buffers = [torch.empty(UPDATE_CHUNK, dtype=torch.float32, device=device)
                        for _ in range(count)]
        self.workspace = Workspace(device, UPDATE_CHUNK)


def _flat(param: torch.Tensor, what: str) -> torch.Tensor:
    if not param.is_contiguous():
        raise BadInputError(f"expected a contiguous {what} for 8-bit optimizer state; found "
                            f"strides {param.stride()} for shape {tuple(param.shape)}: make "
                            f"it contiguous or use StateQuantization(bits=32)")
    return param.view(-1)


def _chunks(numel: int):
    for start in range(0, numel, UPDATE_CHUNK):
        end = min(numel, start + UPDATE_CHUNK)
        yield start, end


class _QuantizedStateOptimizer(torch.optim.Optimizer):
    """Shared parts: quantized state entries, their bytes and the state_dict round trip."""

    quantization: StateQuantization

    def _init_codes(self, state: dict, name: str, param: torch.Tensor, signed: bool) -> None:
        numel = param.numel()
        block_size = self.quantization.block_size
        # absmax 0 dequantizes every code to exactly 0: the zero-initialised state
        state[name + "_codes"] = torch.zeros(numel, dtype=torch.uint8, device=param.device)
        state[name + "_absmax"] = torch.zeros(n_blocks(numel, block_size),
                                              dtype=torch.float32, device=param.device)

    def _load(self, state: dict, name: str, start: int, end: int, out: torch.Tensor,
              signed: bool, workspace: Workspace) -> None:
        block_size = self.quantization.block_size
        dequantize_into(state[name + "_codes"][start:end],
                        state[name + "_absmax"][start // block_size:
                                                n_blocks(end, block_size)],
                        out, block_size=block_size, signed=signed, workspace=workspace)

    def _store(self, state: dict, name: str, start: int, end: int, values: torch.Tensor,
               signed: bool, workspace: Workspace) -> None:
        block_size = self.quantization.block_size
        quantize_into(values, state[name + "_codes"][start:end],
                      state[name + "_absmax"][start // block_size: n_blocks(end, block_size)],
                      block_size=block_size, signed=signed, workspace=workspace)

    def state_bytes(self) -> int:
        """Exact bytes this optimizer holds between steps (all state tensors)."""
        return state_bytes(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts every floating state tensor but ``step`` to the parameter's dtype;
        # codes must stay uint8 and absmax float32: keep them out of its cast, put them back
        stripped = copy.copy(state_dict)
        stripped["state"] = {}
        kept: dict[Any, dict[str, torch.Tensor]] = {}
        for key, value in state_dict["state"].items():
            stripped["state"][key] = {k: v for k, v in value.items()
                                      if not k.endswith(QUANTIZED_SUFFIXES)}
            kept[key] = {k: v for k, v in value.items() if k.endswith(QUANTIZED_SUFFIXES)}
        super().load_state_dict(stripped)
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for param, saved_id in zip(params, saved_ids):
            for k, v in kept.get(saved_id, {}).items():
                self.state[param][k] = v.to(device=param.device, copy=True)


class QuantizedSGD(_QuantizedStateOptimizer):
    """SGD with momentum whose momentum buffers are held in 8 bits (signed map).

    Hyperparameters and update are torch.optim.SGD's (``lr``, ``momentum``, ``dampening``,
    ``weight_decay``, ``nesterov``); ``momentum`` must be > 0 (without momentum SGD has no
    state to compress: use torch.optim.SGD).
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.9, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *,
                 quantization: StateQuantization | None = None):
        if not momentum > 0:
            raise BadInputError(f"expected momentum > 0 for QuantizedSGD; found {momentum!r}: "
                                f"plain SGD keeps no state, use torch.optim.SGD")
        if nesterov and dampening != 0:
            raise BadInputError("Nesterov momentum requires dampening 0")
        self.quantization = quantization or StateQuantization()
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scratch: _Scratch | None = None
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise BadInputError("QuantizedSGD does not support sparse gradients")
                state = self.state[param]
                if not self.quantization.quantizes(param.numel()):
                    self._step_float32(param, state, group)
                    continue
                if scratch is None:
                    scratch = _Scratch(param.device, 2)
                self._step_quantized(param, state, group, scratch)
        return loss

    @staticmethod
    def _step_float32(param: torch.Tensor, state: dict, group: dict) -> None:
        # torch.optim.SGD's single-tensor update, operation for operation
        grad = param.grad
        if group["weight_decay"] != 0:
            grad = grad.add(param, alpha=group["weight_decay"])
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = grad.detach().clone()
            state["momentum_buffer"] = buf
        else:
            buf.mul_(group["momentum"]).add_(grad, alpha=1 - group["dampening"])
        grad = grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        param.add_(grad, alpha=-group["lr"])

    def _step_quantized(self, param: torch.Tensor, state: dict, group: dict,
                        scratch: _Scratch) -> None:
        first = "momentum_codes" not in state
        if first:
            self._init_codes(state, "momentum", param, signed=True)
        flat_param = _flat(param, "parameter")
        flat_grad = param.grad.reshape(-1)
        momentum, dampening = group["momentum"], group["dampening"]
        weight_decay, lr = group["weight_decay"], group["lr"]
        grad_buf, mom_buf = scratch.buffers
        for start, end in _chunks(param.numel()):
            length = end - start
            p = flat_param[start:end]
            g = flat_grad[start:end]
            if weight_decay != 0:
                g = torch.add(g, p, alpha=weight_decay, out=grad_buf[:length])
            buf = mom_buf[:length]
            if first:  # torch: buf = grad.clone()
                buf.copy_(g)
            else:
                self._load(state, "momentum", start, end, buf, True, scratch.workspace)
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            if group["nesterov"]:
                g = torch.add(g, buf, alpha=momentum, out=grad_buf[:length])
            else:
                g = buf
            p.add_(g, alpha=-lr)
            self._store(state, "momentum", start, end, buf, True, scratch.workspace)


class QuantizedAdam(_QuantizedStateOptimizer):
    """Adam whose moments are held in 8 bits (first moment signed, second unsigned).

    Hyperparameters and update are torch.optim.Adam's (``lr``, ``betas``, ``eps``,
    ``weight_decay`` added to the gradient, or with ``decoupled_weight_decay=True``
    torch.optim.AdamW's decay of the parameter; no amsgrad, no maximize).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *,
                 decoupled_weight_decay: bool = False,
                 quantization: StateQuantization | None = None):
        self.quantization = quantization or StateQuantization()
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      decoupled_weight_decay=decoupled_weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scratch: _Scratch | None = None
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise BadInputError("QuantizedAdam does not support sparse gradients")
                state = self.state[param]
                quantized = self.quantization.quantizes(param.numel())
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    if quantized:
                        self._init_codes(state, "exp_avg", param, signed=True)
                        self._init_codes(state, "exp_avg_sq", param, signed=False)
                    else:
                        state["exp_avg"] = torch.zeros_like(
                            param, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(
                            param, memory_format=torch.preserve_format)
                state["step"] += 1
                if not quantized:
                    self._step_float32(param, state, group)
                    continue
                if scratch is None:
                    scratch = _Scratch(param.device, 4)
                self._step_quantized(param, state, group, scratch)
        return loss

    @staticmethod
    def _factors(state: dict, group: dict) -> tuple[float, float]:
        beta1, beta2 = group["betas"]
        step = state["step"].item()
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        return group["lr"] / bias_correction1, bias_correction2**0.5

    @classmethod
    def _step_float32(cls, param: torch.Tensor, state: dict, group: dict) -> None:
        # torch.optim.Adam's single-tensor update (amsgrad off), operation for operation
        beta1, beta2 = group["betas"]
        grad = param.grad
        if group["weight_decay"] != 0:
            if group.get("decoupled_weight_decay", False):
                param.mul_(1 - group["lr"] * group["weight_decay"])
            else:
                grad = grad.add(param, alpha=group["weight_decay"])
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size, bias_correction2_sqrt = cls._factors(state, group)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
        param.addcdiv_(exp_avg, denom, value=-step_size)

    def _step_quantized(self, param: torch.Tensor, state: dict, group: dict,
                        scratch: _Scratch) -> None:
        beta1, beta2 = group["betas"]
        weight_decay, eps = group["weight_decay"], group["eps"]
        decoupled = group.get("decoupled_weight_decay", False)
        step_size, bias_correction2_sqrt = self._factors(state, group)
        flat_param = _flat(param, "parameter")
        flat_grad = param.grad.reshape(-1)
        grad_buf, avg_buf, sq_buf, denom_buf = scratch.buffers
        ws = scratch.workspace
        for start, end in _chunks(param.numel()):
            length = end - start
            p = flat_param[start:end]
            g = flat_grad[start:end]
            if weight_decay != 0 and decoupled:
                p.mul_(1 - group["lr"] * weight_decay)
            elif weight_decay != 0:
                g = torch.add(g, p, alpha=weight_decay, out=grad_buf[:length])
            exp_avg, exp_avg_sq = avg_buf[:length], sq_buf[:length]
            self._load(state, "exp_avg", start, end, exp_avg, True, ws)
            self._load(state, "exp_avg_sq", start, end, exp_avg_sq, False, ws)
            exp_avg.lerp_(g, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = torch.sqrt(exp_avg_sq, out=denom_buf[:length])
            denom.div_(bias_correction2_sqrt).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)
            self._store(state, "exp_avg", start, end, exp_avg, True, ws)
            self._store(state, "exp_avg_sq", start, end, exp_avg_sq, False, ws)


_UNSUPPORTED_FLAGS = ("maximize", "amsgrad", "differentiable", "capturable")


def to_quantized(optimizer: torch.optim.Optimizer, *,
                 quantization: StateQuantization | None = None) -> _QuantizedStateOptimizer:
    """The 8-bit-state counterpart of a ``torch.optim.SGD`` (momentum > 0), ``Adam`` or
    ``AdamW``: same parameters, param groups (every key, e.g. a scheduler's
    ``initial_lr``) and hyperparameters, its current state converted (momentum and
    moments quantized, ``step`` copied). The caller replaces its optimizer with the result
    (an LR scheduler must be rebuilt on it). Raises BadInputError for other optimizers and
    for flags the 8-bit optimizers do not implement (maximize, amsgrad, differentiable,
    capturable, momentum 0).
    """
    kind = type(optimizer)
    if kind not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        raise BadInputError(f"expected a torch.optim.SGD, Adam or AdamW to give 8-bit state; "
                            f"found {kind.__name__}: keep its state in 32 bits")
    for group in optimizer.param_groups:
        used = [flag for flag in _UNSUPPORTED_FLAGS if group.get(flag)]
        if kind is torch.optim.SGD and not group["momentum"] > 0:
            used.append("momentum 0")
        if used:
            raise BadInputError(f"expected {kind.__name__} without {', '.join(used)} for "
                                f"8-bit state; found it set: keep its state in 32 bits")
    groups = [{key: value for key, value in group.items() if key not in
               ("foreach", "fused", *_UNSUPPORTED_FLAGS)} for group in optimizer.param_groups]
    if kind is torch.optim.SGD:
        new = QuantizedSGD(groups, quantization=quantization)
    else:
        for group in groups:
            group["decoupled_weight_decay"] = kind is torch.optim.AdamW or \
                bool(group.get("decoupled_weight_decay", False))
        new = QuantizedAdam(groups, quantization=quantization)
    scratch = Workspace(torch.device("cpu"), UPDATE_CHUNK)
    for param, old in optimizer.state.items():
        state = new.state[param]
        quantized = new.quantization.quantizes(param.numel())
        if "step" in old:
            state["step"] = old["step"].detach().clone().to(torch.float32)
        for name, signed in (("momentum_buffer", True), ("exp_avg", True),
                             ("exp_avg_sq", False)):
            value = old.get(name)
            if value is None:
                continue
            if not quantized:
                state[name] = value.detach().clone()
                continue
            short = "momentum" if name == "momentum_buffer" else name
            new._init_codes(state, short, param, signed)
            if scratch.device != param.device:
                scratch = Workspace(param.device, UPDATE_CHUNK)
            new._store(state, short, 0, param.numel(),
                       _flat(value.detach().to(torch.float32).contiguous(), "state"),
                       signed, scratch)
    return new


def make_quantized_optimizer(name: str, params, *, lr: float | None = None,
                             quantization: StateQuantization | None = None
                             ) -> torch.optim.Optimizer:
    """The 8-bit-state counterpart of ``planner.optimizers.make_optimizer``: ``sgd`` is SGD
    with momentum 0.9 (lr 0.01), ``adam`` is Adam (lr 1e-3)."""
    check_optimizer(name)
    if name == "sgd":
        return QuantizedSGD(params, lr=0.01 if lr is None else lr, momentum=0.9,
                            quantization=quantization)
    return QuantizedAdam(params, lr=1e-3 if lr is None else lr, quantization=quantization)
