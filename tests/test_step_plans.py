"""Whole-step plans: step-level decisions chosen with the activation plan, held to their
budgets by measurement, exact where they claim to be."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fedplan
from fedplan.planner.simulate import simulate
from fedplan.planner.step import StepChoice, parse_decisions, step_choices, step_costs
from fedplan.runtime.optim_state import to_quantized

from .test_cli_profile import assert_one_line_error, run_cli


class Wide(nn.Module):
    """Parameter-heavy: 4 MiB weights, so gradients and momentum dominate the step."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512),
                                    nn.ReLU(), nn.Linear(512, 10))

    def forward(self, x):
        return self.layers(x)


def batch(n=64):
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(n, 512, generator=generator),
            torch.randint(0, 10, (n,), generator=generator))


def test_decision_names_are_checked():
    assert parse_decisions("all") == ("recompute", "compress", "microbatch",
                                      "optimizer-in-backward", "compress-optimizer-state")
    with pytest.raises(fedplan.BadInputError, match="expected decisions from"):
        parse_decisions("recompute,paging")
    with pytest.raises(fedplan.BadInputError, match="cannot run with micro-batches"):
        StepChoice(microbatches=2, optimizer_in_backward=True)
    # the planner never offers what cannot run together
    choices = step_choices(parse_decisions("all"), 8, batch_coupled=False)
    assert all(not (c.optimizer_in_backward and c.microbatches > 1) for c in choices)
    assert {c.microbatches for c in choices} == {1, 2, 4, 8}
    assert {c.microbatches for c in step_choices(parse_decisions("all"), 8,
                                                 batch_coupled=True)} == {1}


def test_lowered_costs_agree_with_the_simulators_step_flags():
    model = Wide()
    x, y = batch()
    analysis = fedplan.analyze(model, x, y, repeats=1, compress=False)
    graph, costs = analysis.graph, analysis.costs
    inputs = costs.input_bytes
    # in backward: gradients are freed as they complete (no weight is tied here: exact)
    lowered = step_costs(costs, StepChoice(optimizer_in_backward=True),
                         full_batch_input_bytes=inputs)
    flagged = simulate(graph, costs, optimizer_in_backward=True).peak_bytes
    assert simulate(graph, lowered).peak_bytes == flagged
    # the peak moves to the largest layer's backward: its gradient alone is held there
    largest = max(size for _, size in costs.params)
    assert flagged < simulate(graph, costs).peak_bytes - (costs.grad_bytes - largest) // 2
    # a later micro-batch: every gradient held from the start, accumulated into; the
    # lowering counts the fresh gradient before the add as a transient (conservative)
    held = simulate(graph, costs, gradients_held=True).peak_bytes
    lowered = simulate(graph, step_costs(costs, StepChoice(microbatches=2),
                                         full_batch_input_bytes=inputs)).peak_bytes
    assert held <= lowered <= held + max(size for _, size in costs.params)


def plain_step(model, x, y, optimizer):
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_in_backward_plan_holds_its_budget_with_bit_identical_parameters(optimizer):
    model = Wide()
    x, y = batch()
    ordinary, analysis = fedplan.plan(model, x, y, budget=10**12, optimizer=optimizer,
                                      decisions="recompute", repeats=1, verify=False)
    # just below the ordinary keep-all peak: recomputing would cost time, the step inside
    # backward frees gradients for free
    budget = ordinary.keep_all_peak_bytes - 1
    plan, _ = fedplan.plan(model, x, y, budget=budget, optimizer=optimizer,
                           decisions="recompute,optimizer-in-backward", repeats=1)
    assert plan.step_choice.optimizer_in_backward
    assert any(note.startswith("verified") for note in plan.notes)
    reference, planned_model = copy.deepcopy(model), copy.deepcopy(model)
    planned = fedplan.apply(planned_model, plan)
    make = fedplan.planner.optimizers.make_optimizer
    opt_ref, opt_plan = make(optimizer, reference.parameters()), make(
        optimizer, planned_model.parameters())
    for _ in range(3):
        plain_step(reference, x, y, opt_ref)
        planned.train_step(x, y, opt_plan)
    for a, b in zip(reference.parameters(), planned_model.parameters()):
        assert torch.equal(a, b)
    measured = fedplan.measure(planned, x, y, optimizer=optimizer,
                               optimizer_instance=make(optimizer, planned.parameters()),
                               steps=1)
    assert measured.peak_bytes <= plan.budget_bytes
    assert abs(measured.peak_bytes - plan.predicted_peak_bytes) <= 0.05 * measured.peak_bytes


def test_microbatch_plan_gradients_match_the_full_batch():
    torch.manual_seed(0)
    # activation-heavy: 2 MiB per activation at batch 2048, 0.25 MiB per weight
    model = nn.Sequential(nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                          nn.Linear(256, 10))
    x, y = batch(2048)
    keep, analysis = fedplan.plan(model, x, y, budget=10**12, decisions="recompute",
                                  repeats=1, verify=False)
    fixed = analysis.costs.fixed_bytes + analysis.costs.grad_bytes
    budget = fixed + (keep.keep_all_peak_bytes - fixed) // 3
    plan, _ = fedplan.plan(model, x, y, budget=budget, decisions="microbatch", repeats=1)
    assert plan.step_choice.microbatches > 1 and not plan.recomputed
    planned_model, reference = copy.deepcopy(model), copy.deepcopy(model)
    planned = fedplan.apply(planned_model, plan, x)
    from fedplan.runtime.step import StepOptions, forward_backward
    forward_backward(planned, x, y, nn.functional.cross_entropy,
                     microbatches=StepOptions(microbatches=plan.step_choice.microbatches
                                              ).microbatches)
    nn.functional.cross_entropy(reference(x), y).backward()
    scale = max(float(p.grad.abs().max()) for p in reference.parameters())
    worst = max(float((a.grad - b.grad).abs().max())
                for a, b in zip(reference.parameters(), planned_model.parameters()))
    assert worst <= 1e-5 * scale
    measured = fedplan.measure(planned, x, y, steps=1)
    assert measured.peak_bytes <= plan.budget_bytes


def test_budget_min_is_held_and_a_smaller_budget_is_refused(capsys, tmp_path):
    model = Wide()
    x, y = batch()
    plan, _ = fedplan.plan(model, x, y, budget="min", decisions="recompute,microbatch",
                           repeats=1)
    measured = fedplan.measure(fedplan.apply(copy.deepcopy(model), plan, x), x, y, steps=1)
    assert measured.peak_bytes <= plan.budget_bytes
    with pytest.raises(fedplan.BudgetInfeasibleError, match="smallest peak"):
        fedplan.plan(model, x, y, budget=plan.predicted_peak_bytes - 1,
                     decisions="recompute,microbatch", repeats=1)
    with pytest.raises(fedplan.BudgetInfeasibleError, match="fixed costs"):
        fedplan.plan(model, x, y, budget=plan.predicted_peak_bytes // 4,
                     decisions="recompute,microbatch", repeats=1)


def test_eight_bit_state_plan_needs_the_quantized_optimizer():
    model = Wide()
    x, y = batch()
    ordinary, analysis = fedplan.plan(model, x, y, budget=10**12, decisions="recompute",
                                      repeats=1, verify=False)
    budget = ordinary.keep_all_peak_bytes - analysis.costs.optimizer_state_bytes // 2
    plan, _ = fedplan.plan(model, x, y, budget=budget,
                           decisions="recompute,compress-optimizer-state", repeats=1)
    assert plan.step_choice.state_bits == 8
    planned = fedplan.apply(copy.deepcopy(model), plan)
    plain = torch.optim.SGD(planned.parameters(), lr=0.01, momentum=0.9)
    with pytest.raises(fedplan.BadInputError, match="8 bits"):
        planned.train_step(x, y, plain)
    loss = planned.train_step(x, y, to_quantized(plain))
    assert torch.isfinite(loss)


def test_cli_decisions_and_budget_min(capsys, tmp_path):
    from .conftest import EXAMPLES
    model = str(EXAMPLES / "mnist_cnn.py")
    code, _, err = run_cli(capsys, "compile", model, "--budget", "1GB", "--decisions", "fly")
    assert_one_line_error(code, err, "expected decisions from")
    out = tmp_path / "p.json"
    code, stdout, _ = run_cli(capsys, "compile", model, "--budget", "min", "--batch-size", "8",
                              "--decisions", "recompute,microbatch", "--repeats", "1",
                              "--json", "-o", str(out))
    assert code == 0
    import json
    result = json.loads(stdout)
    assert result["step"]["microbatches"] >= 1 and out.exists()
    code, stdout, _ = run_cli(capsys, "measure", model, "--plan", str(out), "--steps", "1",
                              "--json")
    assert code == 0 and json.loads(stdout)["within_budget"]


def test_budget_min_with_step_decisions_only():
    """No activation decisions: the smallest peak is the keep-all peak of the best step."""
    model = Wide()
    x, y = batch()
    plan, _ = fedplan.plan(model, x, y, budget="min", decisions="optimizer-in-backward",
                           repeats=1)
    assert plan.step_choice.optimizer_in_backward and not plan.recomputed
    # the budget: the predicted peak and the margin every plan keeps (64 KiB + 1 % of
    # what is above the fixed costs)
    assert plan.predicted_peak_bytes + 64 * 1024 <= plan.budget_bytes <= \
        plan.predicted_peak_bytes + 64 * 1024 + plan.predicted_peak_bytes // 50
    planned = fedplan.apply(copy.deepcopy(model), plan)
    measured = fedplan.measure(planned, x, y, steps=1).peak_bytes
    assert measured <= plan.budget_bytes


class ConvBN(nn.Module):
    """Activation-heavy with BatchNorm: micro-batches change its numbers."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16),
                                  nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                  nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.body(x)


def image_batch(n=8):
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(n, 3, 32, 32, generator=generator),
            torch.randint(0, 10, (n,), generator=generator))


def test_budget_min_all_micro_batches_a_batchnorm_model_and_repeats():
    """"all" names every decision, micro-batches on BatchNorm models included; the default
    set leaves them out. The minimum plan is held by a real step, and planning it again
    gives the same budget and the same plan (the least-peak search is deterministic)."""
    torch.manual_seed(0)
    model = ConvBN()
    x, y = image_batch()
    plan, _ = fedplan.plan(model, x, y, budget="min", decisions="all", min_bits=2,
                           repeats=1)
    assert plan.step_choice.microbatches == 8  # one sample per chunk: the least activation
    # every weight has fewer than 4,096 elements (float32 state either way): the 8-bit
    # step's scratch would only add bytes
    assert plan.step_choice.state_bits == 32
    measured = fedplan.measure(fedplan.apply(copy.deepcopy(model), plan, x), x, y,
                               steps=1).peak_bytes
    assert measured <= plan.budget_bytes
    assert abs(plan.predicted_peak_bytes - measured) <= 0.05 * measured
    again, _ = fedplan.plan(model, x, y, budget="min", decisions="all", min_bits=2,
                            repeats=1, verify=False)
    # the same least peak, so the same budget (which of the plans of that peak the
    # refine gives back to can follow the measured timings)
    assert (again.budget_bytes, again.step) == (plan.budget_bytes, plan.step)
    default, _ = fedplan.plan(model, x, y, budget="min", decisions="default", repeats=1,
                              verify=False)
    assert default.step_choice.microbatches == 1
    assert default.budget_bytes > plan.budget_bytes


def test_lower_bound_is_below_every_plan():
    from fedplan.planner.solvers.greedy import greedy_min_peak
    from fedplan.stepplan import least_peak_plan, lower_bound
    model = ConvBN()
    x, y = image_batch()
    analysis = fedplan.analyze(model, x, y, repeats=1, compress=True)
    graph = analysis.graph
    options = fedplan.SolverOptions(compress=True, min_bits=2)
    for choice in (StepChoice(), StepChoice(optimizer_in_backward=True),
                   StepChoice(microbatches=2)):
        costs = step_costs(analysis.costs, choice,
                           full_batch_input_bytes=analysis.costs.input_bytes)
        bound = lower_bound(costs)
        lowest = least_peak_plan(graph, costs, options)
        peaks = [simulate(graph, costs, d).peak_bytes
                 for d in ({}, greedy_min_peak(graph, costs), lowest)]
        assert bound <= min(peaks)
        assert peaks[2] == min(peaks)  # the search never ends above the greedy or keep-all


class TiedLM(nn.Module):
    """A language model whose output layer reuses the embedding (tied weights)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(1000, 64)
        self.hidden = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))

    def forward(self, tokens):
        return nn.functional.linear(self.hidden(self.embed(tokens)), self.embed.weight)


def test_micro_batched_tied_weights_are_predicted():
    """A tied weight's first gradient contribution (from the output layer) is held until
    the embedding's backward adds the second: the micro-batch lowering counts it."""
    torch.manual_seed(0)
    model = TiedLM()
    tokens = torch.randint(0, 1000, (8, 32))

    def loss_fn(logits, targets):
        return nn.functional.cross_entropy(logits.reshape(-1, 1000), targets.reshape(-1))

    plan, _ = fedplan.plan(model, tokens, tokens, budget="min", decisions="microbatch",
                           loss_fn=loss_fn, repeats=1, verify=False)
    assert plan.step_choice.microbatches == 8
    planned = fedplan.apply(copy.deepcopy(model), plan, tokens)
    measured = fedplan.measure(planned, tokens, tokens, loss_fn=loss_fn, steps=1).peak_bytes
    assert measured <= plan.budget_bytes
    assert abs(plan.predicted_peak_bytes - measured) <= 0.01 * measured


def test_micro_batch_lowering_of_a_tied_weight_is_exact():
    """Per node, the backward transient the micro-batch lowering adds: the node's own
    fresh parameter gradients; for the tied embedding, its first contribution held from
    the output layer's backward (the last user) through the embedding's (the first), and
    the out-of-place sum at the embedding."""
    model = TiedLM()
    tokens = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))

    def loss_fn(logits, targets):
        return nn.functional.cross_entropy(logits.reshape(-1, 1000), targets.reshape(-1))

    costs = fedplan.analyze(model, tokens, tokens, loss_fn=loss_fn, repeats=1,
                            compress=False).costs
    lowered = step_costs(costs, StepChoice(microbatches=2),
                         full_batch_input_bytes=costs.input_bytes)
    params = dict(costs.params)
    tied = params["embed.weight"]
    assert tied == 1000 * 64 * 4
    order = [cost.name for cost in costs.nodes]
    first, last = order.index("embedding"), order.index("linear_2")
    for position, (before, after) in enumerate(zip(costs.nodes, lowered.nodes)):
        own = sum(params[param] for param in before.params)
        held = tied if first <= position < last else 0
        summed = tied if position == first else 0
        assert after.backward_temp_bytes - before.backward_temp_bytes == own + held + summed
    # every gradient is held from the first micro-batch on: a fixed cost
    assert lowered.params == ()
    assert lowered.buffer_bytes - costs.buffer_bytes == sum(params.values())


def test_budget_min_skips_a_micro_batch_count_the_model_cannot_run():
    """BatchNorm1d in training refuses one sample per channel: the chunk of 1 cannot be
    analysed, so the minimum searches the largest count that runs (4 chunks of 2)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.BatchNorm1d(512), nn.ReLU(),
                          nn.Linear(512, 10))
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 10
    messages = []
    plan, _ = fedplan.plan(model, x, y, budget="min", decisions="recompute,microbatch",
                           repeats=1, progress=messages.append)
    assert any("a micro-batch of 1 cannot run" in message for message in messages)
    # 4 chunks of 2 were searched; the ordinary step is lower still on this small model
    # (micro-batches hold every gradient from the start and add each fresh one)
    assert any("smallest peak for 4 micro-batches" in message for message in messages)
    assert plan.step_choice.microbatches == 1
    measured = fedplan.measure(fedplan.apply(copy.deepcopy(model), plan, x), x, y,
                               steps=1).peak_bytes
    assert measured <= plan.budget_bytes
