"""Shared fixtures: paths to the example zoo and a writer for throwaway model files."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# `python -m pytest` puts the repository root first on sys.path, where fedplan's source
# folders (kernels/, planner/, runtime/, fl/) would shadow installed packages of the same
# name: transformers finds our kernels/ and takes it for Hugging Face's `kernels` library.
# fedplan itself is imported from its installed mapping (fedplan.kernels, ...), so the
# root is not needed on the path.
# pytest puts the root back when it imports a test module of the tests package, so the
# Hugging Face imports happen here, once, while it is off the path (transformers decides at
# import time whether the `kernels` library is installed).
sys.path[:] = [entry for entry in sys.path
               if Path(entry or ".").resolve() != ROOT]
import peft  # noqa: E402, F401
import transformers.modeling_utils  # noqa: E402, F401


@pytest.fixture
def write_model(tmp_path):
    """Write a model file from source text and return its path."""

    def write(source: str, name: str = "model.py") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(source))
        return path

    return write


# A tiny inverted-bottleneck CNN for 8x8 digits: the FL and Flower tests' model file.
TINY_MODEL = '''
import torch, torch.nn as nn
DEFAULT_BATCH_SIZE = 8

class Block(nn.Module):
    def __init__(self, c, e):
        super().__init__()
        self.expand = nn.Conv2d(c, c * e, 1)
        self.depthwise = nn.Conv2d(c * e, c * e, 3, padding=1, groups=c * e)
        self.project = nn.Conv2d(c * e, c, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        return x + self.project(self.act(self.depthwise(self.act(self.expand(x)))))

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.blocks = nn.Sequential(Block(8, 4), Block(8, 4), Block(8, 4))
        self.head = nn.Linear(8 * 16, 10)

    def forward(self, x):
        x = self.blocks(torch.relu(self.stem(x)))
        return self.head(torch.flatten(nn.functional.avg_pool2d(x, 2), 1))

def build_model():
    torch.manual_seed(0)
    return Tiny()

def example_batch(n):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
'''
