"""VGG-11 with BatchNorm for CIFAR-size images.

Input: (B, 3, 32, 32) float images; five max-pools reduce to 512x1x1; output: 10-class logits.
The classifier is 512-512-512-10 with Dropout(0.5) (the usual CIFAR adaptation).
"""

import torch
import torch.nn as nn

DEFAULT_BATCH_SIZE = 16

CFG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


class VGG11(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        layers, in_ch = [], 3
        for v in CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(True)]
                in_ch = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(512, 512),
            nn.ReLU(True),
            nn.Dropout(0.5),
            nn.Linear(512, 512),
            nn.ReLU(True),
            nn.Linear(512, num_classes),
        )

    def forward(self, x):
        x = torch.flatten(self.features(x), 1)
        return self.classifier(x)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return VGG11()


def example_batch(batch_size: int):
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(batch_size, 3, 32, 32, generator=g)
    targets = torch.randint(0, 10, (batch_size,), generator=g)
    return inputs, targets
