"""A DenseNet-style classifier whose layers concatenate every earlier feature map.

Input: (B, 3, 32, 32) float images; targets: (B,) long labels in [0, 10); output: (B, 10).
A 3x3 stem to 24 channels, then three dense blocks of 6 layers (growth rate 12): each
layer is BN-ReLU-Conv3x3 over ``torch.cat`` of the block's input and every earlier layer's
output, so each layer saves a new, wider concatenation (the memory pattern of the original
DenseNet, before its memory-efficient variant). Transitions halve channels (1x1 conv) and
resolution (2x2 average pool); a BN-ReLU, global average pool and linear head close it.
"""

import torch
import torch.nn as nn

DEFAULT_BATCH_SIZE = 32

NUM_CLASSES = 10
STEM, GROWTH, LAYERS_PER_BLOCK, BLOCKS = 24, 12, 6, 3


class DenseLayer(nn.Module):
    def __init__(self, in_ch: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_ch, GROWTH, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.conv(self.relu(self.norm(torch.cat(features, dim=1))))


class DenseBlock(nn.Module):
    def __init__(self, in_ch: int):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(in_ch + i * GROWTH)
                                    for i in range(LAYERS_PER_BLOCK))
        self.out_channels = in_ch + LAYERS_PER_BLOCK * GROWTH

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, dim=1)


def transition(in_ch: int, out_ch: int) -> nn.Module:
    return nn.Sequential(nn.BatchNorm2d(in_ch), nn.ReLU(),
                         nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.AvgPool2d(2))


class DenseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, STEM, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        channels = STEM
        for index in range(BLOCKS):
            block = DenseBlock(channels)
            stages.append(block)
            channels = block.out_channels
            if index < BLOCKS - 1:
                stages.append(transition(channels, channels // 2))
                channels //= 2
        self.features = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(channels, NUM_CLASSES))

    def forward(self, x):
        return self.head(self.features(self.stem(x)))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return DenseNet()


def example_batch(batch_size: int):
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(batch_size, 3, 32, 32, generator=g)
    targets = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
    return inputs, targets
