"""Load a user's model file: ``build_model()``, ``example_batch(batch_size)``, ``loss_fn``.

The contract (also in the README):

* ``build_model() -> nn.Module``
* ``example_batch(batch_size) -> (inputs, targets)``; ``inputs`` is a tensor, a tuple of
  tensors passed positionally, or a dict of keyword inputs (``input_ids=...``) to the model.
* optionally ``loss_fn(outputs, targets) -> scalar tensor`` (default: cross-entropy),
  and ``DEFAULT_BATCH_SIZE``. ``LEAF_MODULES`` (from the torch.fx days) is accepted and
  ignored: torch.export follows every module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelFileError


def default_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, the default loss of a model file."""
    return F.cross_entropy(outputs, targets)


@dataclass(frozen=True)
class ModelSpec:
    """What a model file provides, loaded and checked."""

    path: Path
    build_model: Callable[[], nn.Module]
    example_batch: Callable[[int], tuple[Any, Any]]
    loss_fn: Callable[[Any, Any], torch.Tensor]
    default_batch_size: int = 8
    leaf_modules: tuple[Any, ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        return self.path.stem

    def batch(self, batch_size: int) -> tuple[Any, Any]:
        """Call ``example_batch`` and check its shape: ``(inputs, targets)``."""
        try:
            result = self.example_batch(batch_size)
        except Exception as exc:  # the user's code failed: say where, one line
            raise ModelFileError(
                f"{self.path}: example_batch({batch_size}) raised "
                f"{type(exc).__name__}: {exc}") from exc
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise ModelFileError(
                f"{self.path}: example_batch must return (inputs, targets); found "
                f"{_describe(result)}; return a 2-tuple")
        inputs, targets = result
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        keyword = isinstance(inputs, dict) and inputs and all(
            isinstance(key, str) for key in inputs)
        positional = isinstance(inputs, (tuple, list)) and inputs
        if not (keyword or positional) or not any(
                isinstance(t, torch.Tensor) for t in (
                    inputs.values() if isinstance(inputs, dict) else inputs)):
            raise ModelFileError(
                f"{self.path}: example_batch's inputs must be a tensor, a tuple of tensors or "
                f"a dict of keyword inputs; found {_describe(inputs)}")
        first = next(t for t in (inputs.values() if keyword else inputs)
                     if isinstance(t, torch.Tensor))
        if first.dim() == 0 or first.shape[0] != batch_size:
            raise ModelFileError(
                f"{self.path}: example_batch({batch_size}) returned inputs of shape "
                f"{tuple(first.shape)}; expected the batch dimension first with size "
                f"{batch_size}")
        return (dict(inputs) if keyword else tuple(inputs)), targets

    def build(self) -> nn.Module:
        try:
            model = self.build_model()
        except Exception as exc:
            raise ModelFileError(
                f"{self.path}: build_model() raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise ModelFileError(
                f"{self.path}: build_model() must return an nn.Module; found "
                f"{type(model).__name__}")
        return model

    def fingerprint_source(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]


def call_model(module: nn.Module, inputs: Any) -> Any:
    """Call ``module`` with a model file's inputs: a tuple positionally, a dict by keyword."""
    if isinstance(inputs, dict):
        return module(**inputs)
    if isinstance(inputs, torch.Tensor):
        return module(inputs)
    return module(*inputs)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def load_model_file(path: str | Path) -> ModelSpec:
    """Import a model file by path and check it defines the contract."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(
            f"model file {str(path)!r} not found; expected a Python file defining "
            f"build_model() and example_batch(batch_size)")
    if path.suffix != ".py":
        raise ModelFileError(f"expected a Python model file (.py); found {str(path)!r}")
    module_name = f"fedplan_model_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise ModelFileError(
            f"{path}: importing the model file raised {type(exc).__name__}: {exc}") from exc
    missing = [name for name in ("build_model", "example_batch")
               if not callable(getattr(module, name, None))]
    if missing:
        raise ModelFileError(
            f"{path}: expected functions build_model() and example_batch(batch_size); "
            f"missing {', '.join(missing)}")
    loss_fn = getattr(module, "loss_fn", None) or default_loss
    batch_size = getattr(module, "DEFAULT_BATCH_SIZE", 8)
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ModelFileError(f"{path}: DEFAULT_BATCH_SIZE must be a positive int; "
                             f"found {batch_size!r}")
    leaves = tuple(getattr(module, "LEAF_MODULES", ()) or ())
    return ModelSpec(path=path, build_model=module.build_model,
                     example_batch=module.example_batch, loss_fn=loss_fn,
                     default_batch_size=batch_size, leaf_modules=leaves)
