"""Tests of fedplan.kernels.blockwise: the 8-bit block-wise dynamic format of optimizer
state (Dettmers et al.): the map, round-trip error bounds per block, exact bytes, and the
fast path against the reference."""

from __future__ import annotations

import pytest
import torch

from fedplan.kernels.blockwise import (
    CHUNK_ELEMENTS,
    Workspace,
    blockwise_nbytes,
    dequantize_blockwise,
    dequantize_into,
    dynamic_map,
    quantize_blockwise,
    quantize_into,
)

SHAPES = [(1,), (255,), (256,), (257,), (3, 5, 7), (64, 129), (CHUNK_ELEMENTS + 300,)]


def make(shape, signed: bool, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Values spread over several decades per block, as optimizer state is."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(4 * torch.randn(shape, generator=g))
    return (x if signed else x * x).to(dtype)


def test_dynamic_maps():
    signed, unsigned = dynamic_map(True), dynamic_map(False)
    for table in (signed, unsigned):
        assert table.dtype == torch.float32 and table.numel() == 256
        assert bool((table[1:] > table[:-1]).all())
        assert table[-1] == 1.0 and 0.0 in table
    assert signed[0] == -signed[-2] and signed[0] > -1  # the tree has +1 but not -1
    assert unsigned[0] == 0.0
    # 2**i values per decade for the signed map (i = 0..6), 2**(i+1) for the unsigned one
    positive = signed[signed > 0]
    for i in range(7):
        low, high = 0.1 * 10.0 ** (i - 6), 10.0 ** (i - 6)
        assert int(((positive > low) & (positive < high)).sum()) == 2**i
    assert float((signed[1:] - signed[:-1]).max()) == pytest.approx(0.9 / 64, rel=1e-5)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("block_size", [256, 2048, 64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fast_path_matches_reference(shape, block_size, signed):
    x = make(shape, signed, seed=len(shape) + block_size)
    ref = quantize_blockwise(x, block_size=block_size, signed=signed, impl="reference")
    fast = quantize_blockwise(x, block_size=block_size, signed=signed, impl="fast")
    assert torch.equal(ref.codes, fast.codes) and torch.equal(ref.absmax, fast.absmax)
    assert torch.equal(dequantize_blockwise(ref, impl="reference"), dequantize_blockwise(fast))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("block_size", [256, 2048])
def test_round_trip_error_bound_per_block_and_exact_bytes(block_size, signed):
    n = 5 * block_size + 77
    x = make((n,), signed, seed=3)
    q = quantize_blockwise(x, block_size=block_size, signed=signed)
    assert q.codes.dtype == torch.uint8 and q.absmax.dtype == torch.float32
    blocks = -(-n // block_size)
    assert q.nbytes() == n + 4 * blocks == blockwise_nbytes(n, block_size)
    y = dequantize_blockwise(q)
    assert y.shape == x.shape and y.dtype == torch.float32
    table = dynamic_map(signed).double()
    absmax = q.absmax.double().repeat_interleave(block_size)[:n]
    # absmax is the block's max |x|
    for b in range(blocks):
        assert q.absmax[b] == x[b * block_size:(b + 1) * block_size].abs().max()
    # every code is a nearest map value to x / absmax: the error is at most half the gap
    # between the two map values around x / absmax, plus float32 rounding (of x / absmax,
    # of the midpoints and of the product: 2**-23 of |x| + |y|); below the signed map's
    # lowest value (-0.993: -1 is not in the tree) it is the distance to that value
    v = x.double() / absmax
    upper = torch.searchsorted(table, v).clamp(1, 255)
    bound = torch.where(v < table[0], table[0] - v, (table[upper] - table[upper - 1]) / 2)
    if not signed:  # positive values below the smallest positive entry round up to it
        bound = torch.where((v > 0) & (v < table[1]), table[1] - v, bound)
    error = (y.double() - x.double()).abs()
    rounding = (x.double().abs() + y.double().abs()) * 2.0**-23
    assert bool((error <= absmax * bound + rounding).all())
    # per block: at most absmax * (the widest gap, 0.9 / 64 signed) / 2; the extreme is exact
    widest = float((table[1:] - table[:-1]).max())
    worst = float((error / absmax).max())
    limit = max(widest / 2, float(1 + table[0])) if signed else widest / 2  # -1 -> -0.993
    assert worst <= limit + 2.0**-22
    assert worst > limit / 4  # the bound is not vacuous on this data
    top = x.abs().argmax()
    if x[top] > 0:
        assert y[top] == x[top]


def test_dynamic_range_keeps_small_values_relative():
    """A block with absmax 1 keeps entries from 1e-3 to 1e-1 within the map's relative
    half-gap there (0.22 signed, 0.124 unsigned, from the map's entries), where a linear
    8-bit code (step 1/127) would store everything below 0.0039 as 0: the point of the
    dynamic map for Adam's second moment."""
    x = torch.zeros(256)
    x[0] = 1.0
    x[1:100] = torch.logspace(-3, -1, 99)
    for signed, bound in ((True, 0.22), (False, 0.124)):
        y = dequantize_blockwise(quantize_blockwise(x, signed=signed))
        relative = ((y[1:100] - x[1:100]).abs() / x[1:100])
        assert float(relative.max()) <= bound, signed
        assert torch.equal(y[100:], x[100:])  # zeros stay exactly zero


def test_unsigned_map_never_stores_a_positive_value_as_zero():
    """Adam's second moment: a block with absmax 1 keeps 1e-12 as 3.25e-7 (not 0, which
    would turn the update into m / eps); exact zeros stay zero; the signed map rounds to
    nearest (1e-12 -> 0)."""
    x = torch.tensor([1.0, 1e-12, 1.6e-7, 0.0] + [0.5] * 60)
    unsigned = dequantize_blockwise(quantize_blockwise(x, block_size=64, signed=False))
    smallest = float(dynamic_map(False)[1])
    assert smallest == pytest.approx(3.25e-7, rel=1e-6)
    assert unsigned[1] == unsigned[2] == smallest and unsigned[3] == 0.0
    signed = dequantize_blockwise(quantize_blockwise(x, block_size=64, signed=True))
    assert signed[1] == 0.0


def test_zero_block_and_non_finite_blocks():
    x = torch.zeros(1024)
    x[300] = float("nan")
    x[600] = float("inf")
    x[900] = 2.0
    q = quantize_blockwise(x, block_size=256)
    ref = quantize_blockwise(x, block_size=256, impl="reference")
    assert torch.equal(q.codes, ref.codes)  # NaN / Inf blocks: the same codes as well
    torch.testing.assert_close(q.absmax, ref.absmax, rtol=0, atol=0, equal_nan=True)
    assert q.absmax[1].isnan() and q.absmax[2].isinf()
    y = dequantize_blockwise(q)
    assert torch.equal(y[:256], torch.zeros(256))  # all-zero block: absmax 0, exact zeros
    assert not bool(torch.isfinite(y[256:768]).any())  # not finite in, not finite out
    assert y[900] == 2.0 and torch.equal(y[768:900], torch.zeros(132))


def test_half_precision_inputs_and_errors():
    x = make((3000,), True, dtype=torch.bfloat16)
    a = quantize_blockwise(x)
    b = quantize_blockwise(x.float())
    assert a.dtype == torch.bfloat16 and torch.equal(a.codes, b.codes)
    with pytest.raises(ValueError, match="block_size"):
        quantize_blockwise(x, block_size=100)
    with pytest.raises(TypeError, match="float32"):
        quantize_blockwise(torch.arange(10))
    with pytest.raises(ValueError, match="impl"):
        quantize_blockwise(x, impl="gpu")


def test_into_primitives_on_block_aligned_slices_with_a_small_workspace():
    """The optimizer's use: quantize / dequantize a slice into slices of existing storage,
    with a workspace smaller than the slice (several chunks)."""
    x = make((10_000,), True, seed=9)
    whole = quantize_blockwise(x, block_size=256)
    codes = torch.empty(10_000, dtype=torch.uint8)
    absmax = torch.empty(40)
    ws = Workspace("cpu", chunk=1024)
    quantize_into(x[:5120], codes[:5120], absmax[:20], block_size=256, signed=True, workspace=ws)
    quantize_into(x[5120:], codes[5120:], absmax[20:], block_size=256, signed=True, workspace=ws)
    assert torch.equal(codes, whole.codes) and torch.equal(absmax, whole.absmax)
    out = torch.empty(10_000)
    dequantize_into(codes, absmax, out, block_size=256, signed=True, workspace=ws)
    assert torch.equal(out, dequantize_blockwise(whole))
    with pytest.raises(ValueError, match="expected codes of 10"):
        quantize_into(x[:10], codes[:9], absmax[:1], block_size=256, signed=True)


# ----------------------------------------------------------------------------- triton

TRITON_SCRIPT = r"""
import json, torch
from fedplan.kernels import blockwise, blockwise_triton
from fedplan.kernels.blockwise import quantize_blockwise, dequantize_blockwise
results = {"available": blockwise_triton.is_available()}
for name, n, block_size, signed, dtype in json.loads(__import__("sys").argv[1]):
    try:
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, generator=g) * torch.exp(3 * torch.randn(n, generator=g))
        x = (x if signed else x * x).to(getattr(torch, dtype))
        if name == "nonfinite":
            x[5], x[n - 3] = float("nan"), float("inf")
        a = quantize_blockwise(x, block_size=block_size, signed=signed, impl="reference")
        b = quantize_blockwise(x, block_size=block_size, signed=signed, impl="triton")
        assert torch.equal(a.codes, b.codes), "codes differ"
        torch.testing.assert_close(a.absmax, b.absmax, rtol=0, atol=0, equal_nan=True)
        ya = dequantize_blockwise(a, impl="reference")
        yb = dequantize_blockwise(b, impl="triton")
        torch.testing.assert_close(ya, yb, rtol=0, atol=0, equal_nan=True)
        results[name] = "ok"
    except Exception as e:
        results[name] = f"{type(e).__name__}: {e}"
checks = {}
mid = blockwise._Tables.get(True, torch.device("cpu")).mid_padded
for label, call in [
    ("noncontiguous", lambda: blockwise_triton.quantize(torch.randn(8, 4).t(), 64, mid)),
    ("dtype", lambda: blockwise_triton.quantize(torch.randn(8).double(), 64, mid)),
    ("size", lambda: blockwise_triton.dequantize(torch.zeros(70, dtype=torch.uint8),
                                                 torch.zeros(1), mid, 64, torch.empty(70))),
]:
    try:
        call()
        checks[label] = "no error"
    except (TypeError, ValueError) as e:
        checks[label] = "raised " + type(e).__name__
results["wrapper_checks"] = checks
print("RESULTS " + json.dumps(results))
"""

TRITON_CASES = [
    # name, numel, block size, signed, dtype
    ("s256_1000", 1000, 256, True, "float32"),
    ("u256_1000", 1000, 256, False, "float32"),
    ("s64_1", 1, 64, True, "float32"),
    ("s2048_3000", 3000, 2048, True, "float32"),
    ("u64_257_bf16", 257, 64, False, "bfloat16"),
    ("s128_300_f16", 300, 128, True, "float16"),
    ("nonfinite", 600, 256, True, "float32"),
]


@pytest.fixture(scope="module")
def triton_results():
    import importlib.util
    import json
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not importable (pip install 'fedplan[triton]')")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, json.dumps(TRITON_CASES)],
                          env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"triton subprocess failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=[c[0] for c in TRITON_CASES])
def test_triton_matches_reference(triton_results, case):
    assert triton_results["available"] is True
    assert triton_results[case[0]] == "ok", triton_results[case[0]]


@pytest.mark.triton
def test_triton_wrapper_checks(triton_results):
    checks = triton_results["wrapper_checks"]
    assert checks and all(v.startswith("raised") for v in checks.values()), checks
