"""A two-input classifier: an image and a vector of side features, passed positionally.

Inputs: ``model(image, side)`` with image (B, 3, 64, 64) float and side (B, 16) float
(for example metadata beside a photo); targets: (B,) long labels in [0, 10); output:
(B, 10). The image branch is three conv-BN-ReLU stages (16, 32, 64 channels; 2x2 max-pool
after the first two) and a global average pool; the side branch is a two-layer MLP to 32
features; the two are concatenated and classified by a linear layer. Most of the step's
memory is the full-resolution first stage.
"""

import torch
import torch.nn as nn

DEFAULT_BATCH_SIZE = 64

NUM_CLASSES = 10
SIDE_FEATURES = 16
IMAGE_SIZE = 64


def conv_bn_relu(in_ch: int, out_ch: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU())


class TwoInputNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(
            conv_bn_relu(3, 16), nn.MaxPool2d(2),
            conv_bn_relu(16, 32), nn.MaxPool2d(2),
            conv_bn_relu(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.side = nn.Sequential(nn.Linear(SIDE_FEATURES, 64), nn.ReLU(),
                                  nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(64 + 32, NUM_CLASSES)

    def forward(self, image, side):
        return self.head(torch.cat([self.image(image), self.side(side)], dim=1))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return TwoInputNet()


def example_batch(batch_size: int):
    g = torch.Generator().manual_seed(1)
    image = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    side = torch.randn(batch_size, SIDE_FEATURES, generator=g)
    targets = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
    return (image, side), targets
