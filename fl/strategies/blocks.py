"""Blocks of a model, their output modules, their memory, and the client side of
block-wise training (shared by ProFL and NeuLite; SmartSplit cuts at the same places).

**Where blocks are.** A model built as an ``nn.Sequential`` of at least two children is
split at its top-level children: each boundary passes exactly one tensor from one child to
the next, so it is an articulation point of the graph. Any other model (a residual CNN
whose ``forward`` is written by hand, say) is cut at the articulation points of its
traced graph, grouped by top-level module (:mod:`.partition`): a cut inside a skip
connection is never offered. Either way a block is a module that shares the user's
parameters and buffers, so the global state keeps the model's own names.

**Output modules.** Block ``k`` (not the last) gets an output module mapping its output to
the model's output space: global average pooling and a linear layer for image features
``(B, C, H, W)``; a LayerNorm and a linear layer per position for sequence features
``(B, T, D)`` of a model that predicts per position (its outputs ``(B, T, V)``), and a
LayerNorm, the mean over positions and a linear layer for one that predicts per sample (a
ViT). The last block ends with the model's own head.

**The global state** of a block-wise federation is the model's ``state_dict`` (names
``model.<name in the model>``) plus the output modules' (``heads.<k>...``): one flat dict
of named arrays, as every message carries.

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

from ..client import no_collection
from ..messages import ClientReply, TrainInstruction, state_from_arrays

__all__ = ["BlockModel", "block_profile", "blocks_of", "output_module"]


def blocks_of(model: nn.Module, strategy: str = "block-wise training",
              example: torch.Tensor | None = None) -> list[nn.Module]:
    """The model's blocks (see the module doc): the children of an ``nn.Sequential`` of
    two or more, else the graph's blocks (:func:`.partition.graph_blocks`), which need an
    ``example`` input to trace shapes."""
    if isinstance(model, nn.Sequential) and len(model) >= 2:
        return list(model)
    if example is None:
        raise BadInputError(f"{strategy}: cutting {type(model).__name__} into blocks needs "
                            "an example input")
    from .partition import graph_blocks
    return graph_blocks(model, example, strategy)


def output_module(features: torch.Tensor, num_outputs: int, *,
                  per_position: bool = True) -> nn.Module:
    """An output module from a block's output to the model's outputs (module doc); its
    initial weights are the same on every call (the caller's RNG is left as it was).
    ``per_position``: for sequence features, the model predicts per position (a next-token
    model); else one prediction per sample (a ViT's class)."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return _output_module(features, num_outputs, per_position)


class _MeanOverPositions(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def _output_module(features: torch.Tensor, num_outputs: int, per_position: bool
                   ) -> nn.Module:
    if features.dim() == 4:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(features.shape[1], num_outputs))
    if features.dim() == 3 and per_position:
        return nn.Sequential(nn.LayerNorm(features.shape[-1]),
                             nn.Linear(features.shape[-1], num_outputs))
    if features.dim() == 3:
        return nn.Sequential(nn.LayerNorm(features.shape[-1]), _MeanOverPositions(),
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
        # a plain list: the blocks share the model's tensors, and the state keeps the
        # model's own names (``model.<name>``)
        self.blocks: list[nn.Module] = blocks_of(self.model, strategy, example)
        heads = []
        with torch.no_grad():
            x = example
            for block in self.blocks:
                x = block(x)
                heads.append(x)
        outputs = heads[-1]
        num_outputs = outputs.shape[-1]
        per_position = outputs.dim() == 3
        self.heads = nn.ModuleList(output_module(h, num_outputs, per_position=per_position)
                                   for h in heads[:-1])
        self.num_blocks = len(self.blocks)

    def stage(self, k: int) -> nn.Module:
        """Blocks 0..k and block k's output (the model scored after stage k)."""
        parts = self.blocks[:k + 1]
        if k < self.num_blocks - 1:
            parts.append(self.heads[k])
        return nn.Sequential(*parts)

    def prefix(self, k: int) -> nn.Module | None:
        return nn.Sequential(*self.blocks[:k]) if k > 0 else None

    def trainable(self, k: int, *, previous_tail: int = 0) -> nn.Module:
        """What stage ``k`` trains: block k and its output module; with ``previous_tail``
        the last ``previous_tail`` children of block k-1 too (NeuLite's co-adaptation)."""
        parts = []
        if previous_tail and k > 0:
            prev = self.blocks[k - 1]
            if not isinstance(prev, nn.Sequential):
                raise BadInputError("co-adapting the previous block's tail needs blocks "
                                    "that are nn.Sequential themselves")
            # a block of no more children than the tail is co-adapted whole
            parts.extend(list(prev)[max(0, len(prev) - previous_tail):])
        parts.append(self.blocks[k])
        if k < self.num_blocks - 1:
            parts.append(self.heads[k])
        return nn.Sequential(*parts)

    def frozen(self, k: int, *, previous_tail: int = 0) -> nn.Module | None:
        """The blocks before the trained part (run under no_grad on the device)."""
        parts = self.blocks[:k]
        if previous_tail and k > 0:
            prev = parts.pop()
            parts.extend(list(prev)[:max(0, len(prev) - previous_tail)])
        return nn.Sequential(*parts) if parts else None

    def name_map(self, part: nn.Module) -> dict[str, str]:
        """``part``'s state names -> global state names, for the tensors of ``part`` that
        are global state (a block's own persistent copies of a model's non-persistent
        buffer are not)."""
        ours = {id(t): n for n, t in self.state_dict(keep_vars=True).items()}
        return {local: ours[id(t)] for local, t in part.state_dict(keep_vars=True).items()
                if id(t) in ours}

    def names(self, part: nn.Module) -> list[str]:
        """Global state names of ``part``'s state (each once, in ``part``'s order)."""
        return list(dict.fromkeys(self.name_map(part).values()))


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
        with no_collection():  # measured bytes (client.py's no_collection)
            plan, _ = fedplan.plan(part, x, targets, budget=10**13, loss_fn=spec.loss_fn,
                                   repeats=1, compress=False, verify=False)
        with torch.no_grad():
            x = whole.blocks[k](x)
        out.append({"block": k, "parameters": sum(p.numel() for p in part.parameters()),
                    "output_shape": list(x.shape[1:]),
                    "keep_all_bytes": int(plan.predicted_peak_bytes)})
    return out


def train_block(instruction: TrainInstruction, train_x: torch.Tensor, train_y: torch.Tensor,
                spec: ModelSpec, *, strategy: str, previous_tail: int = 0,
                loss_fn: Callable | None = None,
                wrap: Callable[[BlockModel, int, nn.Module], nn.Module] | None = None
                ) -> ClientReply:
    """A client's round of block-wise training: the frozen blocks before stage k run under
    no_grad; block k (and its output module, and with ``previous_tail`` the tail of block
    k-1) trains under the plan sent (``wrap(whole, k, part)``, when given, is the module the
    plan was made for around it). The reply carries the trained part's tensors under their
    global names."""
    from ..client import train_client

    k = int(instruction.task["block"])
    inputs, _ = example_input(spec, 2)
    whole = BlockModel(spec, inputs, strategy)
    state = whole.state_dict()
    for name, array in state_from_arrays(instruction.weights).items():
        state[name] = array
    whole.load_state_dict(state)
    trainable = whole.trainable(k, previous_tail=previous_tail)
    if wrap is not None:
        trainable = wrap(whole, k, trainable)
    names = whole.name_map(trainable)
    prefix = whole.frozen(k, previous_tail=previous_tail)

    def rename(local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {names[key]: value for key, value in local.items() if key in names}

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
