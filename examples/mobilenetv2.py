"""MobileNetV2 (width 1.0, inverted residuals, ReLU6) with CIFAR-style strides.

Input: (B, 3, 32, 32) float images; first conv has stride 1; output: logits over 10 classes.
"""

import torch
import torch.nn as nn

DEFAULT_BATCH_SIZE = 16


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int, groups: int = 1):
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int):
        super().__init__()
        hidden = in_ch * expand
        self.use_res = stride == 1 and in_ch == out_ch
        layers = [] if expand == 1 else [conv_bn_relu(in_ch, hidden, 1, 1)]
        layers += [
            conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    # (expansion t, channels c, repeats n, first stride s); strides adapted to 32x32 inputs.
    CONFIG = [
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]

    def __init__(self, num_classes: int = 10):
        super().__init__()
        layers, in_ch = [conv_bn_relu(3, 32, 3, 1)], 32
        for t, c, n, s in self.CONFIG:
            for i in range(n):
                layers.append(InvertedResidual(in_ch, c, s if i == 0 else 1, t))
                in_ch = c
        layers.append(conv_bn_relu(in_ch, 1280, 1, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.classifier(x)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return MobileNetV2()


def example_batch(batch_size: int):
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(batch_size, 3, 32, 32, generator=g)
    targets = torch.randint(0, 10, (batch_size,), generator=g)
    return inputs, targets
