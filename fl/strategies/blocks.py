"""Blocks of a model, their output modules, their memory, and the client side of
block-wise training (shared by ProFL and NeuLite; SmartSplit cuts at the same places).

**Where blocks are.** A model built as an ``nn.Sequential`` is split at its top-level
children: each boundary passes exactly one tensor from one child to the next, so it is an
articulation point of the captured graph (every path from the input to the loss goes
through it). The packaged models (:mod:`fedplan.fl.models`) are built that way; a user's
model file that is not an ``nn.Sequential`` is refused with a message saying so. Finding
articulation points in an arbitrary captured graph was not built: the planner's IR is
being moved from torch.fx to torch.export, and the FL layer reads only fedplan's public
face.

**Output modules.** Block ``k`` (not the last) gets an output module mapping its output to
the model's output space: global average pooling and a linear layer for image features
``(B, C, H, W)``; a LayerNorm and a linear layer per position for sequence features
``(B, T, D)``. The last block ends with the model's own head.

**The global state** of a block-wise federation is the model's ``state_dict`` (names
``model.<child>...``) plus the output modules' (``heads.<k>...``): one flat dict of named
arrays, as every message carries.

**Memory.** :func:`block_profile` measures every block's keep-all training peak with
fedplan's planner (the predicted peak of ``fedplan.plan`` at an unlimited budget: weights,
gradients, optimizer state, saved activations and temporaries of that block and its
output module, on the example batch pushed through the blocks before it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

import fedplan
from fedplan.errors import BadInputError
from fedplan.modelfile import ModelSpec

from ..messages import ClientReply, TrainInstruction, state_from_arrays

__all__ = ["BlockModel", "block_profile", "blocks_of", "output_module"]


def blocks_of(model: nn.Module, strategy: str = "block-wise training") -> list[nn.Module]:
    """The top-level children of an ``nn.Sequential`` model (see the module doc)."""
    if not isinstance(model, nn.Sequential) or len(model) < 2:
        raise BadInputError(
            f"{strategy} splits the model into blocks at the top-level children of an "
            f"nn.Sequential; found {type(model).__name__}"
            + (f" with {len(model)} child" if isinstance(model, nn.Sequential) else "")
            + "; build the model as nn.Sequential(block1, block2, ...) (the packaged "
            "models in fedplan.fl.models are)")
    return list(model)


def output_module(features: torch.Tensor, num_outputs: int) -> nn.Module:
    """An output module from a block's output to the model's outputs (module doc); its
    initial weights are the same on every call (the caller's RNG is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return _output_module(features, num_outputs)


def _output_module(features: torch.Tensor, num_outputs: int) -> nn.Module:
    if features.dim() == 4:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(features.shape[1], num_outputs))
    if features.dim() == 3:
        return nn.Sequential(nn.LayerNorm(features.shape[-1]),
                             nn.Linear(features.shape[-1], num_outputs))
    if features.dim() == 2:
        return nn.Linear(features.shape[1], num_outputs)
    raise BadInputError(f"no output module for block features of shape "
                        f"{tuple(features.shape)}")


class BlockModel(nn.Module):
    """The model and one output module per block but the last (the global state)."""

    def __init__(self, spec: ModelSpec, example: torch.Tensor, strategy: str):
        super().__init__()
        self.model = spec.build()
        blocks = blocks_of(self.model, strategy)
        heads = []
        with torch.no_grad():
            x = example
            for block in blocks:
                x = block(x)
                heads.append(x)
        outputs = heads[-1]
        num_outputs = outputs.shape[-1]
        self.heads = nn.ModuleList(output_module(h, num_outputs) for h in heads[:-1])
        self.num_blocks = len(blocks)

    def stage(self, k: int) -> nn.Module:
        """Blocks 0..k and block k's output (the model scored after stage k)."""
        parts = list(self.model)[:k + 1]
        if k < self.num_blocks - 1:
            parts.append(self.heads[k])
        return nn.Sequential(*parts)

    def prefix(self, k: int) -> nn.Module | None:
        return nn.Sequential(*list(self.model)[:k]) if k > 0 else None

    def trainable(self, k: int, *, previous_tail: int = 0) -> nn.Module:
        """What stage ``k`` trains: block k and its output module; with ``previous_tail``
        the last ``previous_tail`` children of block k-1 too (NeuLite's co-adaptation)."""
        parts = []
        if previous_tail and k > 0:
            prev = list(self.model)[k - 1]
            if not isinstance(prev, nn.Sequential):
                raise BadInputError("co-adapting the previous block's tail needs blocks "
                                    "that are nn.Sequential themselves")
            parts.extend(list(prev)[len(prev) - previous_tail:])
        parts.append(self.model[k])
        if k < self.num_blocks - 1:
            parts.append(self.heads[k])
        return nn.Sequential(*parts)

    def frozen(self, k: int, *, previous_tail: int = 0) -> nn.Module | None:
        """The blocks before the trained part (run under no_grad on the device)."""
        parts = list(self.model)[:k]
        if previous_tail and k > 0:
            prev = parts.pop()
            parts.extend(list(prev)[:len(prev) - previous_tail])
        return nn.Sequential(*parts) if parts else None

    def names(self, part: nn.Module) -> list[str]:
        """Global state names of ``part``'s state (a module made of our modules)."""
        ours = {id(t): n for n, t in self.state_dict(keep_vars=True).items()}
        return [ours[id(t)] for t in part.state_dict(keep_vars=True).values()]


def example_input(spec: ModelSpec, batch_size: int) -> tuple[torch.Tensor, Any]:
    (inputs, *rest), targets = spec.batch(batch_size)
    if rest:
        raise BadInputError("block-wise strategies need a model with one input tensor")
    return inputs, targets


def block_profile(spec: ModelSpec, batch_size: int, strategy: str = "block-wise training"
                  ) -> list[dict[str, Any]]:
    """Per block: its index, parameter count, output shape and keep-all training peak
    (fedplan's planner; see the module doc)."""
    inputs, targets = example_input(spec, batch_size)
    whole = BlockModel(spec, inputs, strategy)
    out = []
    x = inputs
    for k in range(whole.num_blocks):
        part = whole.trainable(k)
        plan, _ = fedplan.plan(part, x, targets, budget=10**13, loss_fn=spec.loss_fn,
                               repeats=1, compress=False, verify=False)
        with torch.no_grad():
            x = whole.model[k](x)
        out.append({"block": k, "parameters": sum(p.numel() for p in part.parameters()),
                    "output_shape": list(x.shape[1:]),
                    "keep_all_bytes": int(plan.predicted_peak_bytes)})
    return out


def train_block(instruction: TrainInstruction, train_x: torch.Tensor, train_y: torch.Tensor,
                spec: ModelSpec, *, strategy: str, previous_tail: int = 0,
                loss_fn: Callable | None = None) -> ClientReply:
    """A client's round of block-wise training: the frozen blocks before stage k run under
    no_grad; block k (and its output module, and with ``previous_tail`` the tail of block
    k-1) trains under the plan sent. The reply carries the trained part's tensors under
    their global names."""
    from ..client import train_client

    k = int(instruction.task["block"])
    inputs, _ = example_input(spec, 2)
    whole = BlockModel(spec, inputs, strategy)
    state = whole.state_dict()
    for name, array in state_from_arrays(instruction.weights).items():
        state[name] = array
    whole.load_state_dict(state)
    trainable = whole.trainable(k, previous_tail=previous_tail)
    names = whole.names(trainable)
    prefix = whole.frozen(k, previous_tail=previous_tail)

    def rename(local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, local.values(), strict=True))

    return train_client(instruction, train_x, train_y, model_factory=lambda: trainable,
                        loss_fn=loss_fn or spec.loss_fn, prefix=prefix, names=rename)


_SHARED: dict[tuple, Any] = {}


def shared(key: tuple, build: Callable[[], Any]) -> Any:
    """One value per key in this process: the strategies' per-stage, per-width and per-cut
    plan caches (and edge facts) are deterministic functions of the model file, batch
    size, learning rate, bucket width and solver limit, so policies built again for the
    same federation (a resume, another seed, a test) reuse them instead of solving again."""
    if key not in _SHARED:
        _SHARED[key] = build()
    return _SHARED[key]


def spec_key(spec: ModelSpec) -> tuple:
    """Identifies a model file's content (path and modification time)."""
    path = spec.path
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        stamp = 0
    return (str(path), stamp)
