"""Tests of runtime.step: the whole training step with micro-batches and the optimizer
step inside backward (exactness, errors, measured peaks)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedplan.planner.errors import BadInputError, FedplanError
from fedplan.runtime.step import (
    IncompatibleStepOptionsError,
    OptimizerInBackward,
    StepOptions,
    forward_backward,
    gradient_bytes,
    split_batch,
    train_step,
)
from fedplan.runtime.step_measure import measure_train_step

cross_entropy = nn.functional.cross_entropy


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 5))


def cnn_bn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5))


def batch(model_name: str, n: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g) if model_name == "mlp" else \
        torch.randn(n, 3, 8, 8, generator=g)
    return x, torch.randint(0, 5, (n,), generator=g)


OPTIMIZERS = {
    "sgd-momentum-wd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9,
                                                      weight_decay=1e-3),
    "sgd-nesterov": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9,
                                                   nesterov=True),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "adam-wd": lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=1e-2),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2),
}
MODELS = {"mlp": mlp, "cnn_bn": cnn_bn}


def ordinary_step(model, x, y, optimizer):
    optimizer.zero_grad(set_to_none=True)
    loss = cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def assert_same_state(a: nn.Module, b: nn.Module, opt_a, opt_b) -> None:
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for key in sa["state"]:
        for field, value in sa["state"][key].items():
            assert torch.equal(value, sb["state"][key][field]), (key, field)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_in_backward_is_bit_identical_after_one_and_three_steps(model_name, opt_name):
    ref = MODELS[model_name]()
    fused = copy.deepcopy(ref)
    opt_ref, opt_fused = OPTIMIZERS[opt_name](ref.parameters()), \
        OPTIMIZERS[opt_name](fused.parameters())
    options = StepOptions(optimizer_in_backward=True)
    for step in range(3):
        x, y = batch(model_name, seed=step)
        loss_ref = ordinary_step(ref, x, y, opt_ref)
        loss = train_step(fused, x, y, cross_entropy, opt_fused, options=options)
        assert torch.equal(loss, loss_ref)
        assert all(p.grad is None for p in fused.parameters())
        if step in (0, 2):  # after one and after three steps
            assert_same_state(ref, fused, opt_ref, opt_fused)
    # the parameters moved: the comparison above is not between two untouched models
    assert not torch.equal(next(ref.parameters()), next(MODELS[model_name]().parameters()))


def test_in_backward_follows_param_groups_and_lr_changes():
    ref = mlp()
    fused = copy.deepcopy(ref)

    def make(model):  # two groups: no weight decay on biases, a smaller lr for the head
        decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
        no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
        return torch.optim.Adam([{"params": decay, "weight_decay": 1e-2},
                                 {"params": no_decay, "lr": 1e-3}], lr=1e-2)

    opt_ref, opt_fused = make(ref), make(fused)
    sched_ref = torch.optim.lr_scheduler.StepLR(opt_ref, step_size=1, gamma=0.5)
    sched_fused = torch.optim.lr_scheduler.StepLR(opt_fused, step_size=1, gamma=0.5)
    options = StepOptions(optimizer_in_backward=True)
    for step in range(3):
        x, y = batch("mlp", seed=10 + step)
        ordinary_step(ref, x, y, opt_ref)
        train_step(fused, x, y, cross_entropy, opt_fused, options=options)
        sched_ref.step()
        sched_fused.step()
        if step == 1:  # a manual change too
            for opt in (opt_ref, opt_fused):
                opt.param_groups[0]["lr"] *= 3
    assert opt_fused.param_groups[1]["lr"] == 1e-3 * 0.5**3
    assert_same_state(ref, fused, opt_ref, opt_fused)


def test_in_backward_state_dict_round_trip():
    """State lives in the caller's optimizer: save after in-backward steps, load into a
    fresh optimizer, continue with ordinary steps: same as continuing in backward."""
    a = mlp()
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-2)
    options = StepOptions(optimizer_in_backward=True)
    for step in range(2):
        train_step(a, *batch("mlp", seed=step), cross_entropy, opt_a, options=options)
    b = copy.deepcopy(a)
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-2)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    x, y = batch("mlp", seed=7)
    train_step(a, x, y, cross_entropy, opt_a, options=options)
    ordinary_step(b, x, y, opt_b)
    assert_same_state(a, b, opt_a, opt_b)


def test_default_options_are_the_ordinary_step():
    ref, other = cnn_bn(), cnn_bn()
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt_other = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    for step in range(2):
        x, y = batch("cnn_bn", seed=step)
        assert torch.equal(ordinary_step(ref, x, y, opt_ref),
                           train_step(other, x, y, cross_entropy, opt_other))
    assert_same_state(ref, other, opt_ref, opt_other)


def test_unused_parameter_is_not_stepped_in_backward():
    model = mlp()
    extra = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD(list(model.parameters()) + [extra], lr=0.1, momentum=0.9,
                          weight_decay=0.1)
    with OptimizerInBackward(opt) as fused:
        cross_entropy(model(batch("mlp")[0]), batch("mlp")[1]).backward()
    assert fused.stepped == 6  # three weights and three biases; `extra` got no gradient
    assert torch.equal(extra, torch.ones(3)) and extra not in opt.state
    # the hooks are gone after the block: an ordinary backward keeps its gradients
    cross_entropy(model(batch("mlp")[0]), batch("mlp")[1]).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_microbatched_gradients_match_full_batch():
    """Uneven chunks (10 = 4 + 3 + 3, and 10 chunks of 1); no BatchNorm."""
    x, y = batch("mlp", n=10, seed=3)
    full = mlp()
    loss_full = forward_backward(full, x, y, cross_entropy)
    grads_full = [p.grad for p in full.parameters()]
    largest = max(float(g.abs().max()) for g in grads_full)
    for k in (3, 10):
        model = mlp()
        loss = forward_backward(model, x, y, cross_entropy, microbatches=k)
        # the full-batch loss value, up to the rounding of k float32 additions
        assert abs(float(loss) - float(loss_full)) <= 4 * k * torch.finfo().eps * float(loss_full)
        worst = max(float((p.grad - g).abs().max()) for p, g in zip(model.parameters(),
                                                                     grads_full))
        assert worst <= 1e-5 * largest, (k, worst / largest)


def test_microbatches_sum_reduction_and_train_step():
    x, y = batch("mlp", n=9, seed=4)
    full, chunked = mlp(), mlp()

    def summed(out, target):
        return cross_entropy(out, target, reduction="sum")

    forward_backward(full, x, y, summed, loss_reduction="sum")
    forward_backward(chunked, x, y, summed, microbatches=4, loss_reduction="sum")
    for a, b in zip(full.parameters(), chunked.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=0, atol=1e-5 * float(a.grad.abs().max()))
    # through train_step: one SGD step (no momentum) from equal gradients
    a, b = mlp(), mlp()
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    train_step(a, x, y, cross_entropy, opt_a)
    train_step(b, x, y, cross_entropy, opt_b, options=StepOptions(microbatches=3))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert (pa - pb).abs().max() <= 1e-6
        assert pb.grad is None  # released after the step


class KeywordModel(nn.Module):
    """A Hugging Face style model: keyword tensors in, its own loss out."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 20)

    def forward(self, input_ids, attention_mask, labels=None, return_dict=True):
        hidden = self.embed(input_ids) * attention_mask[..., None]
        logits = self.head(hidden)
        loss = cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        mask = attention_mask.flatten()
        # a per-token mean: exact for micro-batches only if every sample has equal tokens
        return {"loss": (loss * mask).sum() / mask.sum(), "logits": logits}


def test_keyword_inputs_are_split_and_passed_by_name():
    g = torch.Generator().manual_seed(5)
    inputs = {"input_ids": torch.randint(0, 20, (6, 4), generator=g),
              "attention_mask": torch.ones(6, 4), "labels": torch.randint(0, 20, (6, 4),
                                                                           generator=g),
              "return_dict": True}
    chunks = split_batch(inputs, None, 4)
    assert [size for _, _, size in chunks] == [2, 2, 1, 1]
    assert chunks[2][0]["input_ids"].shape == (1, 4) and chunks[2][0]["return_dict"] is True
    full, chunked = KeywordModel(), KeywordModel()

    def own_loss(out, _):
        return out["loss"]

    loss_full = forward_backward(full, inputs, None, own_loss)
    loss = forward_backward(chunked, inputs, None, own_loss, microbatches=4)
    assert abs(float(loss) - float(loss_full)) <= 1e-6 * float(loss_full)
    for a, b in zip(full.parameters(), chunked.parameters()):
        assert (a.grad - b.grad).abs().max() <= 1e-5 * a.grad.abs().max()


def test_incompatible_options_raise_clear_errors():
    with pytest.raises(IncompatibleStepOptionsError, match="micro-batches"):
        StepOptions(optimizer_in_backward=True, microbatches=2)
    with pytest.raises(IncompatibleStepOptionsError, match="clipping"):
        StepOptions(optimizer_in_backward=True, max_grad_norm=1.0)
    assert issubclass(IncompatibleStepOptionsError, FedplanError)
    for bad in (dict(microbatches=0), dict(microbatches=True), dict(loss_reduction="median"),
                dict(max_grad_norm=0.0)):
        with pytest.raises(BadInputError):
            StepOptions(**bad)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch("mlp", n=4)
    with pytest.raises(IncompatibleStepOptionsError, match="microbatches=5 for a batch of 4"):
        train_step(model, x, y, cross_entropy, opt, options=StepOptions(microbatches=5))
    with pytest.raises(IncompatibleStepOptionsError, match="share dim 0"):
        train_step(model, x, y[:3], cross_entropy, opt, options=StepOptions(microbatches=2))
    assert all(p.grad is None for p in model.parameters())  # refused before any work
    with pytest.raises(IncompatibleStepOptionsError, match="LBFGS"):
        train_step(model, x, y, cross_entropy, torch.optim.LBFGS(model.parameters()),
                   options=StepOptions(optimizer_in_backward=True))


def test_clipping_matches_clip_grad_norm():
    a, b = mlp(), mlp()
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    x, y = batch("mlp")
    opt_a.zero_grad()
    cross_entropy(a(x), y).backward()
    norm = torch.nn.utils.clip_grad_norm_(a.parameters(), 0.01)
    assert norm > 0.01  # the clip is active
    opt_a.step()
    train_step(b, x, y, cross_entropy, opt_b, options=StepOptions(max_grad_norm=0.01))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


# ----------------------------------------------------------------------------- measured peaks


def test_in_backward_peak_drops_by_the_gradients_but_the_largest():
    """Eight 256x256 layers (256 KiB of weight gradient each), batch 4. The ordinary SGD
    step peaks at the end of backward holding every gradient; in backward at most one weight
    gradient is alive, and the peak is at the first one, while the 32 KiB of saved
    activations (8 layers x 4 x 256 float32) are still held. The drop is exactly all
    gradients but one weight gradient, less those activations."""
    torch.manual_seed(0)
    layers = []
    for _ in range(8):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    model = nn.Sequential(*layers)
    x, y = torch.randn(4, 256), torch.randint(0, 256, (4,))
    peaks = {}
    for fused in (False, True):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        peaks[fused] = measure_train_step(
            m, x, y, cross_entropy, opt, steps=1,
            options=StepOptions(optimizer_in_backward=fused)).peak_bytes
    grads = gradient_bytes(opt)
    assert grads == 8 * (256 * 256 + 256) * 4
    largest = (256 * 256 + 256) * 4
    drop = peaks[False] - peaks[True]
    saved = 8 * 4 * 256 * 4
    assert drop == grads - largest - saved, (drop, grads)


def test_microbatches_lower_the_peak_of_an_activation_heavy_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 4, (16,))
    peaks = []
    for k in (1, 2, 4):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        peaks.append(measure_train_step(m, x, y, cross_entropy, opt, steps=1,
                                        options=StepOptions(microbatches=k)).step_peak_bytes)
    # one conv output at batch 16 is 1 MiB; the step's working set is several of them and
    # scales with the chunk: each halving of the chunk must save at least 1.5 MiB/2^i
    assert peaks[0] - peaks[1] >= 1.5 * 2**20, peaks
    assert peaks[1] - peaks[2] >= 0.75 * 2**20, peaks


class CheckpointedMLP(nn.Module):
    """Blocks run under non-reentrant checkpoint (as PlannedModule's recompute regions):
    their forward is replayed during backward, after the step inside backward may already
    have updated parameters of later blocks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(12, 12), nn.Tanh())
                                    for _ in range(3))
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return self.head(x)


@pytest.mark.parametrize("opt_name", ["sgd-momentum-wd", "adam"])
def test_in_backward_with_recomputed_regions_is_bit_identical(opt_name):
    ref, fused = CheckpointedMLP(), CheckpointedMLP()
    opt_ref = OPTIMIZERS[opt_name](ref.parameters())
    opt_fused = OPTIMIZERS[opt_name](fused.parameters())
    for step in range(3):
        x, y = batch("mlp", seed=20 + step)
        ordinary_step(ref, x, y, opt_ref)
        train_step(fused, x, y, cross_entropy, opt_fused,
                   options=StepOptions(optimizer_in_backward=True))
    assert_same_state(ref, fused, opt_ref, opt_fused)
