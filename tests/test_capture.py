"""Capture with torch.export: models symbolic tracing could not follow, keyword inputs,
structured outputs, frozen parameters, and the one-line errors for what cannot be captured.

Hugging Face models are built from small configs (no download, random weights).
"""

from __future__ import annotations

import collections
import copy

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import fedplan
from fedplan.analysis import trace
from fedplan.planner.capture import ModelCall
from fedplan.planner.simulate import simulate

SEQ = 16
VOCAB = 100


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=SEQ, num_labels=3)
    return transformers.BertForSequenceClassification(config)


def bert_batch(batch=4):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=generator)
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    mask[:, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}, torch.tensor([0, 1, 2, 1][:batch])


def logits_loss(outputs, targets):
    return F.cross_entropy(outputs.logits, targets)


def lm_loss(outputs, targets):
    logits = outputs.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def llama_lora():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ, use_cache=False)
    base = transformers.LlamaForCausalLM(config)
    return peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                     target_modules=["q_proj", "v_proj"]))


def lm_batch(batch=4):
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (batch, SEQ + 1), generator=generator)
    return {"input_ids": tokens[:, :-1]}, tokens[:, 1:]


def step(module, inputs, targets, loss_fn):
    """Loss and gradients (trainable parameters) of one step from a fixed RNG state."""
    torch.manual_seed(1234)
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss = loss_fn(module(**inputs), targets)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


def relative_difference(grads_a, grads_b) -> float:
    scale = max(float(g.abs().max()) for g in grads_a)
    return max(float((a - b).abs().max()) for a, b in zip(grads_a, grads_b)) / scale


def test_bert_keyword_inputs_and_model_output_plan_bit_identically():
    model = bert()
    inputs, targets = bert_batch()
    analysis = fedplan.analyze(model, inputs, targets, loss_fn=logits_loss, repeats=1,
                               compress=False)
    # module paths and source lines name what the user wrote
    linears = [n for n in analysis.graph.nodes if n.target == "aten.linear.default"]
    assert any(n.module_path == "bert.encoder.layer.0.attention.self.query" for n in linears)
    assert all(n.source for n in linears)
    plan, _ = fedplan.plan(model, inputs, targets, loss_fn=logits_loss, budget=10**12,
                           solver="sqrt", analysis=analysis, verify=False)
    assert plan.recomputed
    eager_loss, eager_grads = step(copy.deepcopy(model), inputs, targets, logits_loss)
    unplanned = copy.deepcopy(model)
    captured_loss, captured_grads = step(
        fedplan.PlannedModule(unplanned, trace(unplanned, inputs)[0], _keep_all(plan)),
        inputs, targets, logits_loss)
    planned_model = copy.deepcopy(model)
    planned = fedplan.PlannedModule(planned_model, trace(planned_model, inputs)[0], plan)
    assert planned.regions > 0
    loss, grads = step(planned, inputs, targets, logits_loss)
    # recompute (with dropout replayed) is bit-identical to the captured module ...
    assert torch.equal(loss, captured_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, captured_grads))
    # ... and the captured module is eager PyTorch up to 1e-5 of the largest gradient
    assert torch.allclose(captured_loss, eager_loss, rtol=0, atol=1e-6)
    assert relative_difference(eager_grads, captured_grads) <= 1e-5
    # evaluation runs the user's module (dropout off): the same logits as the model's own
    planned.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(planned(**inputs).logits, model(**inputs).logits)


def _keep_all(plan):
    from dataclasses import replace
    return replace(plan, decisions=tuple((name, "keep") for name, _ in plan.decisions))


def test_lora_counts_gradients_and_optimizer_state_of_the_adapters_only():
    model = llama_lora()
    inputs, targets = lm_batch()
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trainable and frozen
    adapter_bytes = sum(p.numel() * p.element_size() for p in trainable)
    for optimizer in ("sgd", "adam"):
        analysis = fedplan.analyze(model, inputs, targets, loss_fn=lm_loss, repeats=1,
                                   compress=False, optimizer=optimizer)
        costs = analysis.costs
        assert costs.grad_bytes == adapter_bytes
        # SGD: momentum; Adam: two moments and a 4-byte step count per adapter tensor
        assert costs.optimizer_state_bytes == (adapter_bytes if optimizer == "sgd" else
                                               2 * adapter_bytes + 4 * len(trainable))
        assert costs.param_bytes == sum(p.numel() * p.element_size()
                                        for p in model.parameters())



def test_lora_keep_all_prediction_matches_the_captured_module_within_two_percent():
    """What fedplan runs (the captured graph, keep-all) is predicted within 2 %."""
    model = llama_lora()
    inputs, targets = lm_batch()
    plan, analysis = fedplan.plan(model, inputs, targets, loss_fn=lm_loss, compress=False,
                                  budget=10**12, solver="none", repeats=1, verify=False)
    predicted = simulate(analysis.graph, analysis.costs).peak_bytes
    unplanned = copy.deepcopy(model)
    measured = fedplan.measure(
        fedplan.PlannedModule(unplanned, trace(unplanned, inputs)[0], _keep_all(plan)),
        inputs, targets, loss_fn=lm_loss, steps=1).peak_bytes
    assert abs(predicted - measured) <= 0.02 * measured, (predicted, measured)


def test_lora_captured_graph_saves_the_mask_and_repeated_keys_eager_does_not():
    """Why the eager Llama's peak is lower than the captured one's: under torch.export
    Hugging Face takes its tracing path, which repeats the grouped keys and values to every
    head for SDPA (saved as (B, heads, T, d)) where eager uses SDPA's grouped-query mode
    (no copy); on examples/llama_lora.py it also materialises the causal mask per layer
    ((B, 1, T, T), which eager replaces by is_causal): BENCHMARKS.md has the bytes."""
    model = llama_lora()
    inputs, _ = lm_batch()
    captured, _ = trace(model, inputs)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved(run):
        found = {}

        def pack(tensor):
            pointer = tensor.untyped_storage().data_ptr()
            if pointer not in params:
                found[pointer] = tuple(tensor.shape)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
        return collections.Counter(found.values())

    eager = saved(lambda: model(**inputs))
    exported = saved(lambda: captured.graph_module(*captured.flatten(**inputs)))
    batch, seq = inputs["input_ids"].shape
    # 2 layers, 2 heads sharing 1 key/value head of width 16
    assert exported - eager == {(batch, 2, seq, 16): 4}
    assert eager - exported == {(batch, 1, seq, 16): 2}


@pytest.mark.xfail(strict=True, reason="known miss (issue 13): the eager Llama + LoRA keeps "
                   "less than the captured graph fedplan runs (see the test above), so its "
                   "measured keep-all peak is ~5 % below the prediction")
def test_lora_keep_all_prediction_within_two_percent_of_eager():
    model = llama_lora()
    inputs, targets = lm_batch()
    analysis = fedplan.analyze(model, inputs, targets, loss_fn=lm_loss, repeats=1,
                               compress=False)
    predicted = simulate(analysis.graph, analysis.costs).peak_bytes
    measured = fedplan.measure(copy.deepcopy(model), inputs, targets, loss_fn=lm_loss,
                               steps=1).peak_bytes
    assert abs(predicted - measured) <= 0.02 * measured, (predicted, measured)


def test_lora_plan_holds_its_budget_and_matches_the_captured_module():
    model = llama_lora()
    inputs, targets = lm_batch()
    plan, analysis = fedplan.plan(model, inputs, targets, loss_fn=lm_loss, compress=False,
                                  budget=fedplan.Budget(fraction=0.8), repeats=1)
    assert plan.recomputed
    planned_model = copy.deepcopy(model)
    measured = fedplan.measure(fedplan.apply(planned_model, plan), inputs, targets,
                               loss_fn=lm_loss, steps=1).peak_bytes
    assert measured <= plan.budget_bytes
    unplanned = copy.deepcopy(model)
    reference = step(fedplan.PlannedModule(unplanned, trace(unplanned, inputs)[0],
                                           _keep_all(plan)), inputs, targets, lm_loss)
    other = copy.deepcopy(model)
    result = step(fedplan.apply(other, plan), inputs, targets, lm_loss)
    assert torch.equal(result[0], reference[0])
    assert all(torch.equal(a, b) for a, b in zip(result[1], reference[1]))


def test_gpt2_captures_with_loss_equal_to_eager():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2,
                                     n_head=2, use_cache=False)
    model = transformers.GPT2LMHeadModel(config)
    inputs, targets = lm_batch()
    captured, graph = trace(model, inputs)
    assert len(graph) > 100
    eager = copy.deepcopy(model)
    torch.manual_seed(5)
    eager_loss = lm_loss(eager(**inputs), targets)
    torch.manual_seed(5)
    flat = captured.flatten(**inputs)
    captured_loss = lm_loss(captured.unflatten(captured.graph_module(*flat)), targets)
    assert torch.equal(eager_loss, captured_loss)


class TupleAndDict(nn.Module):
    """Positional and keyword inputs; a dict holding a tuple comes out."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x, *, scale=None):
        h = torch.relu(self.a(x))
        if scale is not None:
            h = h * scale
        return {"pair": (self.b(h), h.sum()), "hidden": h}


def test_structured_outputs_reach_the_loss_as_the_model_returns_them():
    seen = []

    def loss_fn(outputs, targets):
        seen.append(type(outputs).__name__)
        logits, total = outputs["pair"]
        return F.cross_entropy(logits, targets) + 0 * total

    model = TupleAndDict()
    x, scale = torch.randn(4, 8), torch.full((4, 1), 2.0)
    targets = torch.tensor([0, 1, 2, 0])
    inputs = ModelCall((x,), {"scale": scale})
    plan, analysis = fedplan.plan(model, inputs, targets, loss_fn=loss_fn, budget=10**12,
                                  solver="all", repeats=1, verify=False)
    assert set(seen) == {"dict"}
    relu = next(n for n in analysis.graph.nodes if n.target == "aten.relu.default")
    line = TupleAndDict.forward.__code__.co_firstlineno + 1  # h = torch.relu(self.a(x))
    assert relu.source == f"test_capture.py:{line}" and relu.module_path == ""
    planned = fedplan.apply(copy.deepcopy(model), plan)  # re-captured from the signature
    out = planned(x, scale=scale)
    assert set(out) == {"pair", "hidden"} and isinstance(out["pair"], tuple)
    assert torch.equal(out["pair"][0], model(x, scale=scale)["pair"][0])


def test_inputs_that_do_not_match_forward_are_one_line_errors():
    with pytest.raises(fedplan.BadInputError, match="does not accept the example inputs"):
        fedplan.analyze(nn.Linear(4, 2), {"inputs": torch.zeros(2, 4)}, torch.zeros(2).long(),
                        repeats=1)
    with pytest.raises(fedplan.BadInputError, match="does not accept the example inputs"):
        fedplan.analyze(nn.Linear(4, 2), (torch.zeros(2, 4), torch.zeros(2, 4)),
                        torch.zeros(2).long(), repeats=1)


def test_a_loss_that_is_not_a_scalar_is_a_one_line_error():
    model = nn.Linear(4, 2)
    with pytest.raises(fedplan.BadInputError, match="loss_fn must return a scalar tensor"):
        fedplan.analyze(model, torch.randn(3, 4), torch.zeros(3).long(),
                        loss_fn=lambda out, _t: out, repeats=1)
