"""The rewritten module: bit-identical training, shared parameters, budgets held."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fedplan
from fedplan.analysis import trace
from fedplan.modelfile import load_model_file
from fedplan.planner.simulate import regions_of

from .conftest import EXAMPLES

MODELS = ["resnet18", "mobilenetv2", "vgg11", "gpt", "vit_tiny", "unet", "mnist_cnn"]


def one_step(module, spec, inputs, targets):
    """One SGD step from a fixed RNG state; returns the loss."""
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    loss = spec.loss_fn(module(*inputs), targets)
    loss.backward()
    grads = [p.grad.clone() for p in module.parameters()]
    optimizer.step()
    return loss.detach(), grads


@pytest.mark.parametrize("name,solver", [(name, "sqrt") for name in MODELS] + [
    ("resnet18", "all"), ("gpt", "all"), ("unet", "all"), ("mobilenetv2", "all")])
def test_recompute_plans_are_bit_identical(name, solver):
    """Loss, gradients, updated weights and BatchNorm statistics equal keep-all's exactly."""
    spec = load_model_file(EXAMPLES / f"{name}.py")
    inputs, targets = spec.batch(2)
    base = spec.build()
    analysis = fedplan.analyze(base, inputs, targets, loss_fn=spec.loss_fn, repeats=1,
                               compress=False)
    # a baseline is a fixed scheme: it recomputes whatever the budget (a large one here)
    plan, _ = fedplan.plan(base, inputs, targets, budget=10**12, solver=solver,
                           loss_fn=spec.loss_fn, analysis=analysis, verify=False)
    reference, model = copy.deepcopy(base), copy.deepcopy(base)
    planned = fedplan.PlannedModule(model, trace(model, inputs)[0], plan)
    if name != "mnist_cnn" or solver == "sqrt":
        assert planned.regions > 0 or not plan.recomputed
    loss_ref, grads_ref = one_step(reference, spec, inputs, targets)
    loss_plan, grads_plan = one_step(planned, spec, inputs, targets)
    assert torch.equal(loss_ref, loss_plan)
    for a, b in zip(grads_ref, grads_plan):
        assert torch.equal(a, b)
    for (key, a), (_, b) in zip(reference.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), key  # weights after the step and BatchNorm statistics


def test_some_plans_do_recompute():
    """Guard for the test above: the baselines really checkpoint on these models."""
    spec = load_model_file(EXAMPLES / "resnet18.py")
    inputs, targets = spec.batch(2)
    base = spec.build()
    plan, analysis = fedplan.plan(base, inputs, targets, budget=10**12, solver="sqrt",
                                  loss_fn=spec.loss_fn, repeats=1)
    assert len(regions_of(analysis.graph, plan.decision_map)) >= 2


def test_planned_module_shares_parameters_and_state_dict_keys():
    spec = load_model_file(EXAMPLES / "gpt.py")
    inputs, targets = spec.batch(2)
    model = spec.build()
    planned = fedplan.compile(model, inputs, targets, loss_fn=spec.loss_fn,
                              budget=fedplan.Budget(fraction=0.8), repeats=1)
    assert list(planned.state_dict()) == list(model.state_dict())
    assert all(a is b for a, b in zip(planned.parameters(), model.parameters()))
    # weight tying survives: the head uses the embedding's weight
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # built on the original
    before = model.wte.weight.detach().clone()
    spec.loss_fn(planned(*inputs), targets).backward()
    optimizer.step()
    assert not torch.equal(before, model.wte.weight)
    assert planned.plan.budget_bytes > 0


@pytest.mark.parametrize("name", ["unet", "vit_tiny"])
def test_measured_peak_within_budget_and_prediction(name):
    spec = load_model_file(EXAMPLES / f"{name}.py")
    inputs, targets = spec.batch(spec.default_batch_size)
    base = spec.build()
    analysis = fedplan.analyze(base, inputs, targets, loss_fn=spec.loss_fn, repeats=1)
    for fraction in (0.6,):
        try:
            plan, _ = fedplan.plan(base, inputs, targets, loss_fn=spec.loss_fn,
                                   budget=fedplan.Budget(fraction=fraction), analysis=analysis,
                                   options=fedplan.SolverOptions(time_limit_seconds=10))
        except fedplan.BudgetInfeasibleError:
            continue
        model = copy.deepcopy(base)
        planned = fedplan.PlannedModule(model, trace(model, inputs)[0], plan)
        measured = fedplan.measure(planned, inputs, targets, loss_fn=spec.loss_fn, steps=1)
        assert measured.peak_bytes <= plan.budget_bytes
        assert abs(plan.predicted_peak_bytes - measured.peak_bytes) <= 0.05 * measured.peak_bytes


def test_apply_checks_the_fingerprint(tmp_path):
    spec = load_model_file(EXAMPLES / "mnist_cnn.py")
    inputs, targets = spec.batch(4)
    model = spec.build()
    plan, _ = fedplan.plan(model, inputs, targets, budget=10**12, solver="sqrt", repeats=1)
    path = plan.save(tmp_path / "plan.json")
    fedplan.apply(spec.build(), path)  # same architecture: fine
    with pytest.raises(fedplan.PlanMismatchError, match="fingerprint"):
        fedplan.apply(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), path)


def test_batchnorm_statistics_updated_once_per_step():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    inputs = torch.randn(4, 3, 8, 8)
    plan, analysis = fedplan.plan(model, inputs, budget=10**12, solver="all", repeats=1)
    decisions = {name: "recompute" for name in plan.decision_map}
    decisions["linear"] = "keep"  # the head stays outside: one region before it
    import dataclasses
    plan = dataclasses.replace(plan, decisions=tuple(decisions.items()))
    planned = fedplan.PlannedModule(model, analysis.captured, plan)
    assert planned.regions == 1
    planned(inputs).sum().backward()
    assert int(model[1].num_batches_tracked) == 1
    assert int(model[4].num_batches_tracked) == 1
