"""U-Net for semantic segmentation: 4 resolution levels (16, 32, 64, 128) and a 256 bottleneck.

Input: (B, 3, 64, 64) float images; targets: (B, 64, 64) long labels; output: (B, 5, 64, 64).
Double conv-BN-ReLU blocks, max-pool down, ConvTranspose2d up, skips concatenated on channels.
"""

import torch
import torch.nn as nn

DEFAULT_BATCH_SIZE = 4

NUM_CLASSES = 5
WIDTHS = [16, 32, 64, 128]


def double_conv(in_ch: int, out_ch: int):
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, in_ch: int = 3, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.downs = nn.ModuleList()
        for w in WIDTHS:
            self.downs.append(double_conv(in_ch, w))
            in_ch = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = double_conv(WIDTHS[-1], 2 * WIDTHS[-1])
        self.ups = nn.ModuleList()
        self.up_convs = nn.ModuleList()
        for w in reversed(WIDTHS):
            self.ups.append(nn.ConvTranspose2d(2 * w, w, 2, stride=2))
            self.up_convs.append(double_conv(2 * w, w))
        self.head = nn.Conv2d(WIDTHS[0], num_classes, 1)

    def forward(self, x):
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, conv, skip in zip(self.ups, self.up_convs, reversed(skips)):
            x = conv(torch.cat([skip, up(x)], dim=1))
        return self.head(x)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return UNet()


def example_batch(batch_size: int):
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(batch_size, 3, 64, 64, generator=g)
    targets = torch.randint(0, NUM_CLASSES, (batch_size, 64, 64), generator=g)
    return inputs, targets
