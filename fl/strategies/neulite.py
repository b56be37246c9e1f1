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
* **Curriculum Mentor**: the stage loss adds an information-bottleneck term estimated
  with HSIC: ``loss = CE - lambda * nHSIC(outputs, onehot(labels))`` with linear
  kernels (normalised HSIC, centred), ``lambda = 0.1``. The paper's second term,
  compressing what the block keeps of its input (HSIC between the block's input and its
  activation), needs the block's input and activation inside the loss; fedplan's loss
  contract sees only ``(outputs, targets)``, so that term is **not built**: a known gap.
* Stages last ``max_stage_rounds`` rounds each (the authors train each stage a fixed
  number of rounds; default: the run's rounds divided by the number of blocks), not until
  a convergence metric fires.

Clients are chosen uniformly among those whose budget holds the current stage.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fedplan.modelfile import ModelSpec

from ..messages import ClientReply
from . import register
from .blocks import train_block
from .profl import BlockwisePolicy

__all__ = ["HSIC_WEIGHT", "NeuLitePolicy", "mentor_loss"]

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


def mentor_loss(base_loss):
    """``base_loss - HSIC_WEIGHT * nHSIC(outputs, onehot(targets))``."""
    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        flat = outputs.reshape(-1, outputs.shape[-1])
        labels = F.one_hot(targets.reshape(-1), flat.shape[-1]).to(flat.dtype)
        return base_loss(outputs, targets) - HSIC_WEIGHT * normalized_hsic(flat, labels)
    return loss


class NeuLitePolicy(BlockwisePolicy):
    """NeuLite: see the module doc."""

    name = "neulite"
    previous_tail = 1

    def stage_loss(self, k: int):
        return mentor_loss(self.spec.loss_fn)

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
    return train_block(instruction, train_x, train_y, spec, strategy="neulite",
                       previous_tail=NeuLitePolicy.previous_tail,
                       loss_fn=mentor_loss(spec.loss_fn))


register("neulite", NeuLitePolicy, _client)
