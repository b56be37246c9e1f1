"""The optimizers fedplan plans for, and the bytes of state each keeps per parameter."""

from __future__ import annotations

from collections.abc import Iterable

import torch

OPTIMIZERS = ("sgd", "adam")


def check_optimizer(name: str) -> str:
    if name not in OPTIMIZERS:
        raise ValueError(f"expected optimizer one of {', '.join(OPTIMIZERS)}; found {name!r}")
    return name


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], *, lr: float | None = None
                   ) -> torch.optim.Optimizer:
    """``sgd``: SGD with momentum 0.9 (lr 0.01); ``adam``: Adam (lr 1e-3)."""
    check_optimizer(name)
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.01 if lr is None else lr, momentum=0.9)
    return torch.optim.Adam(params, lr=1e-3 if lr is None else lr)


def optimizer_state_bytes(name: str, param_sizes: Iterable[int]) -> int:
    """State held between steps: SGD momentum is one buffer per parameter; Adam two plus a
    float32 ``step`` scalar tensor per parameter."""
    check_optimizer(name)
    sizes = list(param_sizes)
    if name == "sgd":
        return sum(sizes)
    return 2 * sum(sizes) + 4 * len(sizes)
