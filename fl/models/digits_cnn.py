"""A small inverted-bottleneck CNN for scikit-learn's 8x8 digits (the default model of
``--dataset digits``), as blocks for the block-wise strategies.

Input: (B, 1, 8, 8) float images in [0, 1]; output: logits over 10 classes.
"""

import torch
import torch.nn as nn

DEFAULT_BATCH_SIZE = 8


def _w(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _bottleneck(c: int, e: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c, c * e, 1), nn.ReLU(),
                         nn.Conv2d(c * e, c * e, 3, padding=1, groups=c * e), nn.ReLU(),
                         nn.Conv2d(c * e, c, 1))


def build_model(width: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    c = _w(8, width)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), _bottleneck(c, 4), nn.ReLU()),
        nn.Sequential(_bottleneck(c, 4), nn.ReLU()),
        nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(c * 16, 10)))


def example_batch(batch_size: int):
    g = torch.Generator().manual_seed(1)
    return (torch.rand(batch_size, 1, 8, 8, generator=g),
            torch.randint(0, 10, (batch_size,), generator=g))
