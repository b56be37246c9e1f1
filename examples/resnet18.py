"""ResNet-18 (BasicBlock, BatchNorm) for CIFAR-size images.

Input: (B, 3, 32, 32) float images; output: logits over 10 classes.
DEFAULT_BATCH_SIZE is 8, not 16: at 16 one forward+backward took ~0.55-0.75 s on 2 CPU cores.
"""

import torch
import torch.nn as nn

DEFAULT_BATCH_SIZE = 8


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu(out)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        # CIFAR stem: 3x3 stride-1 conv, no max-pool.
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        layers, in_ch = [], 64
        for out_ch, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers.append(
                nn.Sequential(BasicBlock(in_ch, out_ch, stride), BasicBlock(out_ch, out_ch))
            )
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return ResNet18()


def example_batch(batch_size: int):
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(batch_size, 3, 32, 32, generator=g)
    targets = torch.randint(0, 10, (batch_size,), generator=g)
    return inputs, targets
