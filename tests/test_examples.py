"""Smoke tests for the model zoo in examples/: each model file honours the model-file contract."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

from fedplan.modelfile import call_model
from fedplan.planner.capture import capture

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_FILES = sorted(p for p in EXAMPLES_DIR.glob("*.py") if not p.name.startswith("_"))


def load_model_file(path: Path):
    spec = importlib.util.spec_from_file_location(f"fedplan_example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_same(a, b):
    a, spec_a = tree_flatten(a)
    b, spec_b = tree_flatten(b)
    assert spec_a == spec_b
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y)


def test_examples_found():
    assert EXAMPLE_FILES, f"no model files in {EXAMPLES_DIR}"


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.stem)
def test_model_file(path):
    mod = load_model_file(path)
    assert mod.__doc__ and mod.__doc__.strip(), "model file needs a module docstring"
    batch_size = getattr(mod, "DEFAULT_BATCH_SIZE", 2)
    assert isinstance(batch_size, int) and batch_size > 0

    model = mod.build_model()
    assert isinstance(model, torch.nn.Module)
    capture(model, mod.example_batch(2)[0])

    # Deterministic construction and data.
    assert_same(mod.example_batch(2), mod.example_batch(2))
    other = mod.build_model().state_dict()
    state = model.state_dict()
    assert state.keys() == other.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, other[name]), name

    # Forward + backward on a small batch.
    model.train()
    inputs, targets = mod.example_batch(2)
    outputs = call_model(model, inputs)
    loss_fn = getattr(mod, "loss_fn", F.cross_entropy)
    loss = loss_fn(outputs, targets)
    assert loss.dim() == 0
    assert torch.isfinite(loss)
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
