"""A parameter-heavy MLP with BatchNorm and Dropout: 784-2048-2048-10 on flattened images.

Input: (B, 784) float (a flattened 28x28 image); targets: (B,) long labels in [0, 10);
output: (B, 10). Two hidden blocks of Linear-BatchNorm1d-ReLU-Dropout(0.2) and a linear
head: 5.8 M parameters (23.3 MB, the two hidden weights 6.4 and 16.8 MB), so at batch 512
parameters, gradients and SGD momentum outweigh the activations. BatchNorm couples the
samples of a batch: splitting it into micro-batches changes the numbers a step computes.
"""

import torch
import torch.nn as nn

DEFAULT_BATCH_SIZE = 512

NUM_CLASSES = 10
IN_FEATURES, HIDDEN, DROPOUT = 784, 2048, 0.2


def hidden_block(in_features: int, out_features: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, out_features), nn.BatchNorm1d(out_features),
                         nn.ReLU(), nn.Dropout(DROPOUT))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(hidden_block(IN_FEATURES, HIDDEN), hidden_block(HIDDEN, HIDDEN),
                         nn.Linear(HIDDEN, NUM_CLASSES))


def example_batch(batch_size: int):
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(batch_size, IN_FEATURES, generator=g)
    targets = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
    return inputs, targets
