"""A small CNN for 28x28 grey images (MNIST digits): two conv-ReLU-maxpool stages, a
64-unit hidden layer. The packaged copy of ``examples/mnist_cnn.py`` (the default model of
``--dataset mnist5k``), as blocks for the block-wise strategies.

Input: (B, 1, 28, 28) float images in [0, 1]; output: logits over 10 classes.
"""

import torch
import torch.nn as nn

DEFAULT_BATCH_SIZE = 32


def _w(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def build_model(width: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    c1, c2, h = _w(16, width), _w(32, width), _w(64, width)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, c1, 3), nn.ReLU(), nn.MaxPool2d(2)),      # 28 -> 13
        nn.Sequential(nn.Conv2d(c1, c2, 3), nn.ReLU(), nn.MaxPool2d(2)),     # 13 -> 5
        nn.Sequential(nn.Flatten(), nn.Linear(c2 * 25, h), nn.ReLU(), nn.Linear(h, 10)))


def example_batch(batch_size: int):
    g = torch.Generator().manual_seed(1)
    return (torch.rand(batch_size, 1, 28, 28, generator=g),
            torch.randint(0, 10, (batch_size,), generator=g))
