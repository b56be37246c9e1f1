"""A small wide CIFAR ResNet whose ReLUs and residual adds run in place.

Input: (B, 3, 32, 32) float images; targets: (B,) long labels in [0, 10); output: (B, 10).
A 3x3 stem to 64 channels (no max-pool, as for CIFAR), three stages of two basic blocks
(64, 128, 256 channels at 32x32, 16x16, 8x8; 1x1 projection shortcuts where the shape
changes), global average pool and a linear head: 2.8 M parameters. Every ReLU is
``nn.ReLU(inplace=True)`` and each block adds its shortcut with ``out += identity``, the
in-place idioms of torchvision's ResNet. The full-resolution first stage holds most of the
activations.
"""

import torch
import torch.nn as nn

DEFAULT_BATCH_SIZE = 16

NUM_CLASSES = 10
WIDTHS = (64, 128, 256)
BLOCKS_PER_STAGE = 2


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_ch))

    def forward(self, x):
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, WIDTHS[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(WIDTHS[0]), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        in_ch = WIDTHS[0]
        for index, width in enumerate(WIDTHS):
            for block in range(BLOCKS_PER_STAGE):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(in_ch, width, stride))
                in_ch = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, NUM_CLASSES)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return ResNet()


def example_batch(batch_size: int):
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(batch_size, 3, 32, 32, generator=g)
    targets = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
    return inputs, targets
