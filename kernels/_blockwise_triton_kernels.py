"""Triton kernels of the block-wise 8-bit format (imported lazily by :mod:`.blockwise_triton`).

One program per block. Written for the Triton interpreter as well as for GPUs: plain pointer
arithmetic with masks, IEEE division via ``tl.math.div_rn``, launched with
``enable_fp_fusion=False``. The code is found by a branch-free binary search over the 255
midpoints (padded with +inf to 256): 8 gathers per element, which gives the count of
midpoints below ``v`` exactly as the reference defines it (NaN compares false: code 0).
"""

import triton
import triton.language as tl


@triton.jit
def blockwise_quant_kernel(x_ptr, mid_ptr, codes_ptr, absmax_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    magnitude = tl.abs(x)
    amax = tl.max(magnitude, axis=0)
    # torch's amax propagates NaN; a hardware max may not: make it explicit
    has_nan = tl.sum((x != x).to(tl.int32), axis=0) > 0
    amax = tl.where(has_nan, float("nan"), amax)
    safe = tl.where(amax == 0.0, 1.0, amax)
    v = tl.math.div_rn(x, tl.zeros_like(x) + safe)
    code = tl.zeros([BLOCK], dtype=tl.int32)
    for i in tl.static_range(8):
        step = 128 >> i
        probe = tl.load(mid_ptr + code + (step - 1))
        code = tl.where(probe < v, code + step, code)
    tl.store(codes_ptr + offs, code.to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + pid, amax)


@triton.jit
def blockwise_dequant_kernel(codes_ptr, table_ptr, absmax_ptr, out_ptr, n,
                             BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    codes = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    value = tl.load(table_ptr + codes, mask=mask, other=0.0)
    amax = tl.load(absmax_ptr + pid)
    tl.store(out_ptr + offs, value * amax, mask=mask)
