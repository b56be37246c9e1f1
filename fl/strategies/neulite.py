"""NeuLite / ScaleFL (Wu et al., arXiv 2408.10826): block-wise training with a Curriculum
Mentor and a Training Harmonizer.

Stages as in ProFL (:mod:`.profl`, :class:`~.profl.BlockwisePolicy`): stage ``k`` trains
block ``k`` and an output module with blocks ``0..k-1`` frozen on the device, under a
fedplan plan for the client's own budget (measured for the whole device step). What
differs:

* **Training Harmonizer**: stage ``k`` also trains the last child of block ``k-1``
  (``previous_tail = 1``; the authors' code unfreezes "the last sub-layers" of the
  previous block), so the boundary between an already trained block and the new one is
  co-adapted, and the output module of block ``k`` starts from that of block ``k-1``
  where shapes allow (the code copies output modules between stages).
* **Curriculum Mentor**: the stage loss adds information-bottleneck terms estimated
  with HSIC (normalised, centred, linear kernels): ``loss = CE - lambda *
  nHSIC(outputs, onehot(labels)) + mu * nHSIC(X, Z)``, ``lambda = 0.1``. The second
  term compresses what the block keeps of its input: ``X`` is the trained part's input
  (the frozen blocks' output, no gradient) and ``Z`` block ``k``'s output (before its
  output module; the model's output in the last stage), both flattened per sample.
  fedplan's loss contract sees only ``(outputs, targets)``, so the trained part is
  wrapped (:class:`MentorModule`) to return ``(outputs, nHSIC(X, Z))``, computed in its
  forward from the two ``B x B`` Gram matrices; the plan is made for the wrapped part,
  so its memory is planned and measured. ``mu`` is the option ``compression_weight``,
  **0 by default** (the term off: the figures in ``BENCHMARKS.md`` were measured without
  it); the authors use Gaussian kernels with a median-distance bandwidth, computed in
  numpy, which fedplan's capture cannot follow, so the kernels here are linear (the same
  normalised HSIC as the label term, i.e. linear CKA).
* Stages last ``max_stage_rounds`` rounds each (the authors train each stage a fixed
  number of rounds; default: the run's rounds divided by the number of blocks), not until
  a convergence metric fires.

Clients are chosen uniformly among those whose budget holds the current stage.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedplan.modelfile import ModelSpec

from ..messages import ClientReply
from . import register
from .blocks import train_block
from .profl import BlockwisePolicy

__all__ = ["HSIC_WEIGHT", "MentorModule", "NeuLitePolicy", "mentor_loss",
           "normalized_hsic", "normalized_hsic_gram"]

HSIC_WEIGHT = 0.1
"""lambda of the label-relevance HSIC term (chosen before any run; not tuned)."""


def _centred(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(dim=0, keepdim=True)


def normalized_hsic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear-kernel HSIC of ``x`` and ``y`` (rows are samples), normalised to [0, 1]."""
    xc, yc = _centred(x), _centred(y)
    cross = (xc.T @ yc).pow(2).sum()
    return cross / ((xc.T @ xc).pow(2).sum().sqrt() * (yc.T @ yc).pow(2).sum().sqrt()
                    + 1e-12)


def _centred_gram(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(x.shape[0], -1)
    flat = flat - flat.mean(dim=0, keepdim=True)
    return flat @ flat.T


def normalized_hsic_gram(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """:func:`normalized_hsic` of ``x`` and ``z`` flattened per sample, from their ``B x B``
    centred Gram matrices (the same value; cheap when a sample has many features)."""
    kx, kz = _centred_gram(x), _centred_gram(z)
    return (kx * kz).sum() / (kx.pow(2).sum().sqrt() * kz.pow(2).sum().sqrt() + 1e-12)


class MentorModule(nn.Module):
    """A stage's trained part that also returns ``nHSIC(input, block output)`` (module
    doc): ``body`` is the part up to block ``k``'s output, ``head`` its output module (None
    in the last stage)."""

    def __init__(self, body: nn.Module, head: nn.Module | None):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.body(x)
        outputs = self.head(z) if self.head is not None else z
        return outputs, normalized_hsic_gram(x.detach(), z)


def mentor_loss(base_loss, compression_weight: float = 0.0):
    """``base_loss - HSIC_WEIGHT * nHSIC(outputs, onehot(targets))``, plus
    ``compression_weight * nHSIC(X, Z)`` when the outputs are a :class:`MentorModule`'s
    ``(outputs, nHSIC(X, Z))``."""
    def loss(outputs, targets: torch.Tensor) -> torch.Tensor:
        compression = None
        if isinstance(outputs, (tuple, list)):
            outputs, compression = outputs
        flat = outputs.reshape(-1, outputs.shape[-1])
        labels = F.one_hot(targets.reshape(-1), flat.shape[-1]).to(flat.dtype)
        total = base_loss(outputs, targets) - HSIC_WEIGHT * normalized_hsic(flat, labels)
        if compression is not None:
            total = total + compression_weight * compression
        return total
    return loss


def wrap_mentor(whole, k: int, part: nn.Module) -> nn.Module:
    """``part`` (block k's trained part, an ``nn.Sequential`` ending in block k's output
    module unless k is the last block) as a :class:`MentorModule`."""
    children = list(part)
    if k < whole.num_blocks - 1:
        return MentorModule(nn.Sequential(*children[:-1]), children[-1])
    return MentorModule(nn.Sequential(*children), None)


class NeuLitePolicy(BlockwisePolicy):
    """NeuLite: see the module doc."""

    name = "neulite"
    previous_tail = 1

    def __init__(self, *, compression_weight: float = 0.0, **kw: Any):
        super().__init__(**kw)
        if not (compression_weight >= 0 and compression_weight < float("inf")):
            raise ValueError(f"neulite: expected compression_weight >= 0; found "
                             f"{compression_weight!r}")
        self.compression_weight = float(compression_weight)

    def stage_loss(self, k: int):
        return mentor_loss(self.spec.loss_fn, self.compression_weight)

    def wrap_trainable(self, whole, k: int, part: nn.Module) -> nn.Module:
        return wrap_mentor(whole, k, part) if self.compression_weight else part

    def cache_key_extra(self) -> tuple:
        return ("compression", self.compression_weight) if self.compression_weight else ()

    def task(self) -> dict[str, Any]:
        out = super().task()
        if self.compression_weight:
            out["compression_weight"] = self.compression_weight
        return out

    def configure(self, round_index, clients, weights):
        """In the first round of stage k >= 1 (none of its rounds counted yet), block k's
        output module starts from block k-1's where the shapes agree."""
        k = self.stage
        if 0 < k < self.whole.num_blocks - 1 and self.stage_rounds == 0:
            weights = dict(weights)
            prefix_old, prefix_new = f"heads.{k - 1}.", f"heads.{k}."
            for name in [n for n in weights if n.startswith(prefix_new)]:
                source = prefix_old + name[len(prefix_new):]
                if source in weights and weights[source].shape == weights[name].shape:
                    weights[name] = weights[source].copy()
        return super().configure(round_index, clients, weights)

    def round_info(self, round_index: int) -> dict[str, Any]:
        return {"stage": self.stage}


def _client(instruction, train_x, train_y, spec: ModelSpec) -> ClientReply:
    weight = float(instruction.task.get("compression_weight", 0.0))
    return train_block(instruction, train_x, train_y, spec, strategy="neulite",
                       previous_tail=NeuLitePolicy.previous_tail,
                       loss_fn=mentor_loss(spec.loss_fn, weight),
                       wrap=wrap_mentor if weight else None)


register("neulite", NeuLitePolicy, _client)
