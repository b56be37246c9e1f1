"""A small CNN for 28x28 single-channel images whose memory a keep/recompute plan can shrink.

``examples/mnist_cnn.py`` (conv-pool, conv-pool, two linear layers) is the FL layer's
default model, but its keep-all peak is set by the backward of its first ReLU (the
largest activation and its gradients are live together there), so no plan goes below
keep-all: neither recomputation nor compression (checked with ``compress=True,
min_bits=2`` at batch 32 for 0.2 to 0.9 of its keep-all peak of 4,933,880 B: every
budget is infeasible, the smallest reachable peak is keep-all). With budgets below
keep-all it cannot train at all; the memory-wall experiment uses this model instead.

This model has the shape that makes recomputation pay, MobileNetV2's inverted
bottleneck: a stride-2 stem to 14x14, then four blocks that expand 16 channels to 64
(1x1), filter them depthwise (3x3) and project back to 16 (1x1) with a residual add.
Each block saves two 64-channel tensors but its boundary is one 16-channel tensor, so a
recomputed block frees about eight times what it keeps. Measured here at batch 16 with
SGD: keep-all peak 10,075,576 B predicted (10,075,584 B measured), smallest planned peak
4,883,512 B (0.48 of keep-all) with recomputation alone, 4,879,736 B (0.48) with
compression (4-bit codes at least) as well (planner at commit 6aac8f7). 19,082
parameters; 78 % accuracy on 500 mnist5k test images after 100 centralised steps (batch
16, SGD lr 0.05, momentum 0.9).
"""

import torch
import torch.nn as nn

DEFAULT_BATCH_SIZE = 16


class InvertedBottleneck(nn.Module):
    def __init__(self, channels: int, expansion: int):
        super().__init__()
        hidden = channels * expansion
        self.expand = nn.Conv2d(channels, hidden, 1)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.project = nn.Conv2d(hidden, channels, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        return x + self.project(self.act(self.depthwise(self.act(self.expand(x)))))


class MnistMBConv(nn.Module):
    def __init__(self, width: int = 16, expansion: int = 4, blocks: int = 4,
                 num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, stride=2, padding=1)  # 28 -> 14
        self.blocks = nn.Sequential(*[InvertedBottleneck(width, expansion)
                                      for _ in range(blocks)])
        self.act = nn.ReLU()
        # 14 -> 7, then a linear head on all 784 features: it learns in a few dozen steps,
        # where global pooling (tried first) sat at chance for about 75 steps
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(width * 49, num_classes)

    def forward(self, x):
        x = self.blocks(self.act(self.stem(x)))
        return self.head(torch.flatten(self.pool(x), 1))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return MnistMBConv()


def example_batch(batch_size: int):
    g = torch.Generator().manual_seed(1)
    inputs = torch.rand(batch_size, 1, 28, 28, generator=g)
    targets = torch.randint(0, 10, (batch_size,), generator=g)
    return inputs, targets
