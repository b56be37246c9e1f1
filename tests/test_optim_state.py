"""Tests of runtime.optim_state: SGD (momentum) and Adam with 8-bit block-wise state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedplan.kernels.blockwise import reference_dequantize, reference_quantize
from fedplan.planner.errors import BadInputError
from fedplan.planner.optimizers import optimizer_state_bytes
from fedplan.runtime.optim_state import (
    UPDATE_CHUNK,
    QuantizedAdam,
    QuantizedSGD,
    StateQuantization,
    compressed_state_bytes,
    make_quantized_optimizer,
    state_bytes,
    step_scratch_bytes,
    to_quantized,
)
from fedplan.runtime.step import StepOptions, train_step
from fedplan.runtime.step_measure import measure_train_step

cross_entropy = nn.functional.cross_entropy


def model(seed: int = 0) -> nn.Module:
    """Weights of 40,200 (> one update chunk, not a multiple of 256) and 2,010 elements
    (below min_8bit_numel: float32 state), biases of 201 and 10."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(200, 201), nn.ReLU(), nn.Linear(201, 10))


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 200, generator=g), torch.randint(0, 10, (16,), generator=g)


def ordinary(module, optimizer, seed):
    optimizer.zero_grad(set_to_none=True)
    cross_entropy(module(batch(seed)[0]), batch(seed)[1]).backward()
    optimizer.step()


SGD_ARGS = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
ADAM_ARGS = dict(lr=1e-2, weight_decay=1e-3)


@pytest.mark.parametrize("nesterov", [False, True])
def test_float32_state_is_torch_sgd_bit_for_bit(nesterov):
    a, b = model(), model()
    opt_a = torch.optim.SGD(a.parameters(), nesterov=nesterov, **SGD_ARGS)
    opt_b = QuantizedSGD(b.parameters(), nesterov=nesterov, **SGD_ARGS,
                         quantization=StateQuantization(bits=32))
    for step in range(3):
        ordinary(a, opt_a, step)
        ordinary(b, opt_b, step)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
        assert torch.equal(opt_a.state[pa]["momentum_buffer"], opt_b.state[pb]["momentum_buffer"])


def test_float32_state_is_torch_adam_bit_for_bit():
    a, b = model(), model()
    opt_a = torch.optim.Adam(a.parameters(), **ADAM_ARGS)
    opt_b = QuantizedAdam(b.parameters(), **ADAM_ARGS, quantization=StateQuantization(bits=32))
    for step in range(3):
        ordinary(a, opt_a, step)
        ordinary(b, opt_b, step)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a.state[pa][key], opt_b.state[pb][key])


def _reference_sgd(param, grad, state, group, block_size):
    """Whole-tensor dequantize, torch's update, whole-tensor quantize (reference kernels)."""
    g = grad.add(param, alpha=group["weight_decay"])
    if state is None:
        buf = g.clone()
    else:
        buf = reference_dequantize(*state, block_size, True).view_as(param)
        buf.mul_(group["momentum"]).add_(g, alpha=1 - group["dampening"])
    param.add_(buf, alpha=-group["lr"])
    return reference_quantize(buf, block_size, True)


def _reference_adam(param, grad, state, step, group, block_size):
    beta1, beta2 = group["betas"]
    g = grad.add(param, alpha=group["weight_decay"])
    if state is None:
        exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    else:
        exp_avg = reference_dequantize(*state[0], block_size, True).view_as(param)
        exp_avg_sq = reference_dequantize(*state[1], block_size, False).view_as(param)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    step_size = group["lr"] / (1 - beta1**step)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
    param.addcdiv_(exp_avg, denom, value=-step_size)
    return (reference_quantize(exp_avg, block_size, True),
            reference_quantize(exp_avg_sq, block_size, False))


@pytest.mark.parametrize("block_size", [256, 2048])
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_chunked_8bit_step_equals_whole_tensor_reference(name, block_size):
    """The fused chunked update (chunks of 32,768 elements over a 40,200-element weight)
    equals dequantize-update-quantize on the whole tensor with the reference kernels."""
    assert model()[0].weight.numel() > UPDATE_CHUNK
    module = model()
    quantization = StateQuantization(block_size=block_size)
    opt = QuantizedSGD(module.parameters(), **SGD_ARGS, quantization=quantization) \
        if name == "sgd" else QuantizedAdam(module.parameters(), **ADAM_ARGS,
                                            quantization=quantization)
    weight = module[0].weight
    expected = weight.detach().clone()
    state = None
    for step in range(1, 4):
        ordinary(module, opt, step)
        grad = weight.grad
        if name == "sgd":
            state = _reference_sgd(expected, grad, state, opt.param_groups[0], block_size)
            codes = [(opt.state[weight]["momentum_codes"], opt.state[weight]["momentum_absmax"])]
            want = [state]
        else:
            state = _reference_adam(expected, grad, state, step, opt.param_groups[0],
                                    block_size)
            codes = [(opt.state[weight][k + "_codes"], opt.state[weight][k + "_absmax"])
                     for k in ("exp_avg", "exp_avg_sq")]
            want = list(state)
        assert torch.equal(weight, expected), step
        for (c, a), (wc, wa) in zip(codes, want):
            assert torch.equal(c, wc) and torch.equal(a, wa), step


def test_state_bytes_exact_against_32_bit():
    """Weight 40,200 -> 40,200 codes + 158 blocks x 4 B = 40,832 B; weight 2,010 and the
    biases stay float32 (below 4,096 elements)."""
    sizes = [40_200, 201, 2_010, 10]
    small = 4 * (201 + 2_010 + 10)
    quantized = 40_200 + 4 * 158
    assert quantized == 40_832
    for name, tensors in (("sgd", 1), ("adam", 2)):
        module = model()
        opt = make_quantized_optimizer(name, module.parameters())
        ordinary(module, opt, 0)
        steps = 4 * len(sizes) if name == "adam" else 0
        assert state_bytes(opt) == opt.state_bytes() == tensors * (quantized + small) + steps
        assert compressed_state_bytes(name, sizes) == state_bytes(opt)
        assert compressed_state_bytes(name, sizes, quantization=StateQuantization(bits=32)) \
            == optimizer_state_bytes(name, [4 * n for n in sizes]) \
            == tensors * 4 * sum(sizes) + steps
    assert compressed_state_bytes("adam", sizes) == 2 * (40_832 + 8_884) + 16 == 99_448
    assert optimizer_state_bytes("adam", [4 * n for n in sizes]) == 2 * 4 * 42_421 + 16 \
        == 339_384


def test_held_bytes_drop_by_the_state_saving():
    """measure_train_step's start bytes (parameters + state + batch) differ by exactly the
    state saving; the step itself still runs."""
    x, y = batch(0)
    held = {}
    for bits in (32, 8):
        module = model()
        opt = make_quantized_optimizer("adam", module.parameters(),
                                       quantization=StateQuantization(bits=bits))
        held[bits] = measure_train_step(module, x, y, cross_entropy, opt, steps=1).start_bytes
    sizes = [40_200, 201, 2_010, 10]
    assert held[32] - held[8] == optimizer_state_bytes("adam", [4 * n for n in sizes]) \
        - compressed_state_bytes("adam", sizes) == 339_384 - 99_448


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_state_dict_round_trip(name):
    a = model()
    opt_a = make_quantized_optimizer(name, a.parameters())
    for step in range(2):
        ordinary(a, opt_a, step)
    saved = copy.deepcopy(opt_a.state_dict())
    assert all(isinstance(v, torch.Tensor) for s in saved["state"].values() for v in s.values())
    b = copy.deepcopy(a)
    opt_b = make_quantized_optimizer(name, b.parameters())
    opt_b.load_state_dict(saved)
    weight_state = opt_b.state[b[0].weight]
    codes_key = "momentum_codes" if name == "sgd" else "exp_avg_codes"
    assert weight_state[codes_key].dtype == torch.uint8
    ordinary(a, opt_a, 5)
    ordinary(b, opt_b, 5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_8bit_state_inside_backward_is_bit_identical(name):
    a, b = model(), model()
    opt_a = make_quantized_optimizer(name, a.parameters())
    opt_b = make_quantized_optimizer(name, b.parameters())
    for step in range(3):
        ordinary(a, opt_a, step)
        train_step(b, *batch(step), cross_entropy, opt_b,
                   options=StepOptions(optimizer_in_backward=True))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_8bit_state_tracks_32_bit_state_closely():
    """Three Adam steps: 8-bit moments move the parameters by nearly the same amount as
    32-bit ones (a loose sanity bound; accuracy is benchmarked in bench_optim_state.py)."""
    start = model()
    a, b = model(), model()
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-3)
    opt_b = QuantizedAdam(b.parameters(), lr=1e-3)
    for step in range(3):
        ordinary(a, opt_a, step)
        ordinary(b, opt_b, step)
    moved = (a[0].weight - start[0].weight).norm()
    differ = (a[0].weight - b[0].weight).norm()
    assert differ <= 0.05 * moved, float(differ / moved)


def test_bad_options_raise():
    with pytest.raises(BadInputError, match="bits"):
        StateQuantization(bits=4)
    with pytest.raises(BadInputError, match="block_size"):
        StateQuantization(block_size=100)
    with pytest.raises(BadInputError, match="momentum > 0"):
        QuantizedSGD(model().parameters(), momentum=0.0)
    with pytest.raises(ValueError, match="expected optimizer"):
        make_quantized_optimizer("rmsprop", model().parameters())


def test_adamw_float32_state_is_torch_adamw_bit_for_bit():
    a, b = model(), model()
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1)
    opt_b = QuantizedAdam(b.parameters(), lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True,
                          quantization=StateQuantization(bits=32))
    for step in range(2):
        ordinary(a, opt_a, step)
        ordinary(b, opt_b, step)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_to_quantized_keeps_groups_and_converts_state(kind):
    """Two steps with torch's optimizer, convert, one more step: equal to converting the
    state by hand (quantize torch's state) and stepping an 8-bit optimizer from it, and at
    32 bits equal to torch's own third step."""
    def torch_optimizer(module):
        groups = [{"params": [module[0].weight, module[2].weight], "lr": 0.02},
                  {"params": [module[0].bias, module[2].bias], "weight_decay": 0.0}]
        if kind == "sgd":
            return torch.optim.SGD(groups, lr=0.05, momentum=0.9, weight_decay=1e-3,
                                   nesterov=True)
        cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
        return cls(groups, lr=1e-2, weight_decay=1e-3)

    a, b, c = model(), model(), model()
    opt_a, opt_b, opt_c = torch_optimizer(a), torch_optimizer(b), torch_optimizer(c)
    for step in range(2):
        for module, opt in ((a, opt_a), (b, opt_b), (c, opt_c)):
            ordinary(module, opt, step)
    float32 = to_quantized(opt_c, quantization=StateQuantization(bits=32))
    eight = to_quantized(opt_b)
    assert [g["lr"] for g in eight.param_groups] == [g["lr"] for g in opt_b.param_groups]
    assert eight.param_groups[1]["weight_decay"] == 0.0
    weight = b[0].weight
    if kind == "sgd":
        assert eight.state[weight]["momentum_codes"].dtype == torch.uint8
    else:
        assert torch.equal(eight.state[weight]["step"], opt_b.state[weight]["step"])
        assert eight.param_groups[0]["decoupled_weight_decay"] == (kind == "adamw")
    ordinary(a, opt_a, 2)  # torch's third step
    ordinary(c, float32, 2)  # the converted 32-bit optimizer's: the same, bit for bit
    ordinary(b, eight, 2)  # the 8-bit one runs from the quantized state: close, not equal
    for pa, pc in zip(a.parameters(), c.parameters()):
        assert torch.equal(pa, pc)
    assert not torch.equal(b[0].weight, a[0].weight)
    # within a tenth of one step's lr (0.02) of torch's: the converted state is used
    assert (b[0].weight - a[0].weight).abs().max() <= 0.1 * 0.02


def test_to_quantized_refuses_what_it_cannot_convert():
    with pytest.raises(BadInputError, match="RMSprop"):
        to_quantized(torch.optim.RMSprop(model().parameters()))
    with pytest.raises(BadInputError, match="amsgrad"):
        to_quantized(torch.optim.Adam(model().parameters(), amsgrad=True))
    with pytest.raises(BadInputError, match="momentum 0"):
        to_quantized(torch.optim.SGD(model().parameters(), lr=0.1))


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_step_scratch_is_constant_and_predicted(name):
    """The 8-bit step's own allocations do not grow with the parameter: measured by the
    profiler for 40,000 and 400,000 elements, equal to step_scratch_bytes."""
    from fedplan.runtime.measure import profiled_peak

    assert step_scratch_bytes("sgd") == 786_944 and step_scratch_bytes("adam") == 1_049_088
    for numel in (40_000, 400_000):
        param = nn.Parameter(torch.randn(numel))
        param.grad = torch.randn(numel)
        opt = make_quantized_optimizer(name, [param])
        opt.step()  # state allocated
        peak, _ = profiled_peak(opt.step)
        assert peak == step_scratch_bytes(name), (numel, peak)
