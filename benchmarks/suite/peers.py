"""The peers, each built the way its users run it, as a module that trains like any other.

* ``compiled``: ``torch.compile`` (inductor, CPU) with
  ``torch._functorch.config.activation_memory_budget`` patched in a scoped way for the
  first call, which is when the partitioner runs; ``torch._dynamo.reset()`` before each
  point, because dynamo's cache is keyed on the forward's code object and would otherwise
  hand a second instance the first one's compiled graph;
* ``SelectiveCheckpoint``: the whole forward under ``torch.utils.checkpoint`` with
  ``create_selective_checkpoint_contexts``: matmuls, convolutions and attention are
  saved, everything else is recomputed (PyTorch's documented SAC recipe);
* ``ActNNCompressed``: every floating-point tensor autograd saves (parameters excepted)
  is packed at 2 bits through ``saved_tensors_hooks`` and unpacked in backward: ActNN's
  per-group (256) min-max quantisation with stochastic rounding, on fedplan's kernels;
  nothing is recomputed.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

aten = torch.ops.aten
# Ops whose outputs selective checkpointing saves (torchtitan's and PyTorch's SAC examples).
SAVE_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
            aten.convolution.default, aten.cudnn_convolution.default,
            aten._scaled_dot_product_flash_attention.default,
            aten._scaled_dot_product_efficient_attention.default,
            aten._scaled_dot_product_flash_attention_for_cpu.default,
            aten.linear.default, aten.matmul.default}


def _sac_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


class SelectiveCheckpoint(nn.Module):
    """``model`` under one selective checkpoint: save matmuls/convolutions, recompute the rest."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        context = functools.partial(create_selective_checkpoint_contexts, _sac_policy)
        return checkpoint(self.model, *inputs, use_reentrant=False, context_fn=context)


class ActNNCompressed(nn.Module):
    """``model`` with every saved activation packed at ``bits`` bits (ActNN's scheme)."""

    def __init__(self, model: nn.Module, bits: int = 2, group_size: int = 256,
                 min_elements: int = 256):
        super().__init__()
        from fedplan.kernels.api import dequantize, quantize

        self.model = model
        self._quantize = functools.partial(quantize, bits=bits, group_size=group_size,
                                           mode="group", stochastic=True)
        self._dequantize = dequantize
        self.min_elements = min_elements
        self.packed_tensors = 0
        # parameters (and their views, e.g. a Linear's transposed weight) stay as they are
        self._param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def _pack(self, tensor: torch.Tensor):
        if (not tensor.is_floating_point() or tensor.numel() < self.min_elements
                or tensor.untyped_storage().data_ptr() in self._param_storages):
            return tensor
        self.packed_tensors += 1
        return self._quantize(tensor)

    def _unpack(self, packed):
        return packed if isinstance(packed, torch.Tensor) else self._dequantize(packed)

    def forward(self, *inputs):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return self.model(*inputs)


@contextlib.contextmanager
def memory_budget(fraction: float):
    """Patch the partitioner's activation memory budget for the duration (restored after)."""
    import torch._functorch.config as functorch_config

    with functorch_config.patch(activation_memory_budget=fraction):
        yield


def compiled(model: nn.Module, fraction: float, first_call) -> nn.Module:
    """``torch.compile(model)`` whose first call (compile) runs under ``fraction``.

    ``first_call(module)`` runs one training step, inside the scoped patch, so the
    forward and backward graphs are both partitioned with the budget.
    """
    import torch._dynamo

    torch._dynamo.reset()
    module = torch.compile(model, backend="inductor")
    with memory_budget(fraction):
        first_call(module)
    return module
