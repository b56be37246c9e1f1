"""Round policies by name, and the client side of every strategy.

``make_policy`` / ``build_policy`` return the :class:`~fedplan.fl.policy.RoundPolicy` a
federation runs: the selection-only ones (``fedhybrid``, ``oort``, ``random``,
``exclude``: one cached plan per client budget, FedAvg) or a strategy that trains part of
the model (one file each in this package). ``run_instruction`` is what a client runs for
any instruction: the whole model under its plan (:func:`fedplan.fl.client.train_client`)
when the instruction names no task, else the strategy's own client code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fedplan.modelfile import ModelSpec

from ..client import train_client
from ..messages import ClientReply, TrainInstruction
from ..plan_cache import PlanCache
from ..policy import PolicyConfig, RoundPolicy
from ..selectors import SELECTORS, make_selector

__all__ = ["STRATEGIES", "build_policy", "make_policy", "run_instruction", "strategy_names"]

STRATEGIES: dict[str, type[RoundPolicy]] = {}
"""Strategies that train part of the model, by name (filled by their modules)."""

_CLIENTS: dict[str, Callable[..., ClientReply]] = {}


def register(name: str, policy: type[RoundPolicy], client: Callable[..., ClientReply]) -> None:
    STRATEGIES[name] = policy
    _CLIENTS[name] = client


_MODULES: tuple[str, ...] = ("heterofl", "neulite", "profl", "smartsplit")
"""The strategy modules of this package (each registers itself on import)."""


def _load() -> None:
    import importlib
    for module in _MODULES:
        importlib.import_module(f"{__name__}.{module}")


def strategy_names() -> tuple[str, ...]:
    """Every name ``--strategy`` takes: the selectors, then the strategies."""
    _load()
    return tuple(SELECTORS) + tuple(sorted(STRATEGIES))


def run_instruction(instruction: TrainInstruction, train_x: torch.Tensor,
                    train_y: torch.Tensor, spec: ModelSpec) -> ClientReply:
    """Train one client on its partition as the instruction says."""
    name = instruction.task.get("strategy") if instruction.task else None
    if not name:
        return train_client(instruction, train_x, train_y, model_factory=spec.build,
                            loss_fn=spec.loss_fn)
    _load()
    if name not in _CLIENTS:
        raise ValueError(f"instruction names strategy {name!r}; this client knows "
                         f"{', '.join(sorted(_CLIENTS))}")
    return _CLIENTS[name](instruction, train_x, train_y, spec)


def build_policy(name: str, *, config: PolicyConfig, cache: PlanCache, spec: ModelSpec,
                 selector_options: dict[str, Any] | None = None,
                 options: dict[str, Any] | None = None,
                 log: Callable[[str, dict[str, Any]], None] | None = None) -> RoundPolicy:
    """The policy called ``name`` (a selector or a strategy)."""
    key = str(name).strip().lower()
    if key in SELECTORS:
        selector = make_selector(key, keep_all_bytes=cache.keep_all_bytes,
                                 **(selector_options or {}))
        return RoundPolicy(config=config, cache=cache, selector=selector,
                           model_factory=spec.build, log=log)
    _load()
    if key not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; valid names: "
                         f"{', '.join(strategy_names())}")
    return STRATEGIES[key](config=config, cache=cache, spec=spec, log=log,
                           **(options or {}))


def make_policy(federation, *, log: Callable[[str, dict[str, Any]], None] | None = None
                ) -> RoundPolicy:
    """The policy an embedded :class:`~fedplan.fl.server.Federation` runs."""
    cfg = federation.config
    config = PolicyConfig(clients_per_round=cfg.clients_per_round, epochs=cfg.epochs,
                          batch_size=federation.batch_size, lr=cfg.lr, seed=cfg.seed,
                          deadline_seconds=cfg.deadline_seconds, rounds=cfg.rounds)
    return build_policy(cfg.strategy or cfg.selector, config=config, cache=federation.cache,
                        spec=federation.spec, selector_options=cfg.selector_options,
                        options={"plan_time_limit": cfg.plan_time_limit}
                        | dict(cfg.strategy_options), log=log)
