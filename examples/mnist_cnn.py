"""A small CNN for MNIST digits: two conv-ReLU-maxpool stages, then a 64-unit hidden layer.

Input: (B, 1, 28, 28) float images in [0, 1]; output: logits over 10 classes.
"""

import torch
import torch.nn as nn

DEFAULT_BATCH_SIZE = 32


class MnistCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3)  # 28 -> 26, pool -> 13
        self.conv2 = nn.Conv2d(16, 32, 3)  # 13 -> 11, pool -> 5
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 5 * 5, 64)
        self.dropout = nn.Dropout(0.2)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.dropout(self.relu(self.fc1(x)))
        return self.fc2(x)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return MnistCNN()


def example_batch(batch_size: int):
    g = torch.Generator().manual_seed(1)
    inputs = torch.rand(batch_size, 1, 28, 28, generator=g)
    targets = torch.randint(0, 10, (batch_size,), generator=g)
    return inputs, targets
