"""HeteroFL (Diao et al., ICLR'21): width-scaled nested sub-models, the baseline the seed
papers compare against (reference: Flower's ``baselines/heterofl``).

A client trains the model at width rate ``r`` (every hidden width times ``r``): its
tensors are the leading slices of the global tensors (the first ``r`` of the output
channels and of the input channels of every layer; the input image channels and the
class outputs stay whole). The server averages every element over the clients that hold
it, weighted by their sample counts (:func:`fedplan.fl.policy.fedavg` on slices); an
element nobody trained keeps its value.

Choices, and why:

* **Rates** ``1, 1/2, 1/4, 1/8`` (HeteroFL's levels a-d; its e = 1/16 leaves the packaged
  models' narrowest layers at one channel). A client gets the **widest** rate for which a
  fedplan plan fits its own budget (one plan cache per rate), so HeteroFL composes with
  recompute and compression here: a client a little below the full model's keep-all peak
  trains the full width with a plan, rather than half the width (the paper assigns rates
  from a fixed capacity table). Nobody trains below 1/8: a client that no plan at 1/8
  fits is skipped.
* **Static BN**: the packaged Fashion-MNIST model uses BatchNorm without running
  statistics (batch statistics in training and evaluation), HeteroFL's sBN.
* **Masked loss** (``masked_loss=True``; off by default, as ``BENCHMARKS.md`` was
  measured): as in HeteroFL's reference code, a client's outputs for the classes its own
  data does not hold are set to 0 before the loss (``masked_fill``), so its update
  leaves those classes' output weights alone (for label-skewed splits). The client reads
  its label set from its own data; nothing about it is sent. The plans are made and
  measured with the same masked loss over every class (the same operations, so the same
  memory). Evaluation is unmasked.
* The model needs ``build_model(width=...)``; the packaged models have it; a model file
  without it is refused with a message.
* Clients are chosen uniformly among those some rate fits. The model scored is the full
  width (rate 1) global model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fedplan.errors import BadInputError
from fedplan.modelfile import ModelSpec

from ..client import local_steps, train_client
from ..messages import ClientReply
from ..plan_cache import CachedPlan, Infeasible, PlanCache
from ..policy import (
    Assignment,
    ClientInfo,
    PolicyConfig,
    RoundPolicy,
    make_candidate,
    plan_digest,
)
from ..selectors import Candidate, FeasibleRandomSelector
from . import register
from .blocks import shared, spec_key

__all__ = ["RATES", "HeteroFLPolicy", "masked_loss", "slice_to"]

RATES = (1.0, 0.5, 0.25, 0.125)


def _builder(spec: ModelSpec, rate: float) -> Callable[[], torch.nn.Module]:
    build = spec.build_model
    try:
        takes_width = "width" in inspect.signature(build).parameters
    except (TypeError, ValueError):
        takes_width = False
    if not takes_width:
        raise BadInputError(f"heterofl builds width-scaled models: {spec.path} needs "
                            "build_model(width=1.0); found build_model without 'width'")
    return lambda: build(width=rate)


def slice_to(weights: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]
             ) -> dict[str, np.ndarray]:
    """The leading slices of ``weights`` with the given shapes (a sub-model's tensors)."""
    out = {}
    for name, shape in shapes.items():
        full = weights[name]
        if len(shape) != full.ndim or any(s > f for s, f in zip(shape, full.shape)):
            raise ValueError(f"{name}: a sub-model tensor of shape {shape} is not a leading "
                             f"slice of the global {full.shape}")
        out[name] = np.ascontiguousarray(full[tuple(slice(0, s) for s in shape)])
    return out


def masked_loss(base_loss: Callable, labels: torch.Tensor | None = None) -> Callable:
    """``base_loss`` of the outputs with every class not in ``labels`` (class ids; None:
    every class) set to 0 along the last dimension (the module doc)."""
    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        classes = outputs.shape[-1]
        held = torch.arange(classes) if labels is None else labels
        mask = torch.zeros(classes, dtype=torch.bool)
        mask[held] = True
        return base_loss(outputs.masked_fill(~mask, 0.0), targets)
    return loss


class HeteroFLPolicy(RoundPolicy):
    """HeteroFL: see the module doc."""

    name = "heterofl"

    def __init__(self, *, config: PolicyConfig, cache: PlanCache, spec: ModelSpec,
                 log: Callable[[str, dict[str, Any]], None] | None = None,
                 rates: tuple[float, ...] = RATES, plan_time_limit: float = 10.0,
                 masked_loss: bool = False):
        self.spec = spec
        self.masked = bool(masked_loss)
        self.rates = tuple(sorted((float(r) for r in rates), reverse=True))
        if not self.rates or self.rates[0] != 1.0 or any(not 0 < r <= 1 for r in self.rates):
            raise ValueError(f"heterofl: expected rates in (0, 1] starting at 1; found {rates}")
        self.builders = {r: _builder(spec, r) for r in self.rates}
        super().__init__(config=config, cache=cache, selector=FeasibleRandomSelector(),
                         model_factory=self.builders[1.0], log=log)
        self.plan_time_limit = float(plan_time_limit)
        self.shapes = {r: {n: tuple(t.shape) for n, t in self.builders[r]().state_dict()
                           .items()} for r in self.rates}
        # the federation's cache plans the full width with the plain loss
        self._caches: dict[float, PlanCache] = {} if self.masked else {1.0: cache}

    def rate_cache(self, rate: float) -> PlanCache:
        if rate not in self._caches:
            import fedplan
            (inputs, *_), targets = self.spec.batch(self.config.batch_size)
            key = ("width", spec_key(self.spec), rate, self.config.batch_size,
                   self.config.lr, self.cache.bucket_fraction, self.plan_time_limit,
                   self.masked)
            loss = masked_loss(self.spec.loss_fn) if self.masked else self.spec.loss_fn
            self._caches[rate] = shared(key, lambda: PlanCache(
                self.builders[rate], inputs, targets, lr=self.config.lr,
                loss_fn=loss, bucket_fraction=self.cache.bucket_fraction,
                options=fedplan.SolverOptions(workers=1,
                                              time_limit_seconds=self.plan_time_limit)))
        return self._caches[rate]

    def rate_for(self, budget_bytes: int) -> tuple[float, CachedPlan | Infeasible]:
        """The widest rate a plan for ``budget_bytes`` exists at (or the narrowest's
        Infeasible)."""
        entry: CachedPlan | Infeasible | None = None
        for rate in self.rates:
            entry = self.rate_cache(rate).lookup(budget_bytes)
            if isinstance(entry, CachedPlan):
                return rate, entry
        return self.rates[-1], entry

    def candidate(self, client: ClientInfo) -> Candidate:
        rate, entry = self.rate_for(client.budget_bytes)
        steps = local_steps(client.num_samples, self.config.batch_size, self.config.epochs)
        return make_candidate(client, entry, steps=steps,
                              keep_all_bytes=self.cache.keep_all_bytes,
                              keep_all_step_seconds=self.cache.base_step_seconds)

    def assign(self, round_index: int, client: ClientInfo, weights: dict[str, np.ndarray]
               ) -> Assignment | str:
        rate, entry = self.rate_for(client.budget_bytes)
        if not isinstance(entry, CachedPlan):
            return (f"no plan fits its budget of {client.budget_bytes} B even at width "
                    f"{rate:g}")
        sent = slice_to(weights, self.shapes[rate])
        return Assignment(
            client_id=client.client_id,
            instruction=self.instruction(round_index, client, entry.plan_json, sent,
                                         {"strategy": self.name, "width": rate,
                                          "masked": self.masked}),
            digest=plan_digest(entry.plan_json), expected=sent,
            budget_bytes=client.budget_bytes, speed=client.speed,
            step_seconds=entry.step_seconds, info={"width": rate})


def _client(instruction, train_x, train_y, spec: ModelSpec) -> ClientReply:
    rate = float(instruction.task["width"])
    loss = spec.loss_fn
    if instruction.task.get("masked"):
        loss = masked_loss(spec.loss_fn, torch.unique(train_y.reshape(-1)))
    return train_client(instruction, train_x, train_y, model_factory=_builder(spec, rate),
                        loss_fn=loss)


register("heterofl", HeteroFLPolicy, _client)
