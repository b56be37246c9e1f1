"""Triton kernels (imported lazily by :mod:`.triton_impl`; needs triton).

Same packed format as reference.py.  Written for the Triton interpreter as well as for GPUs:
no autotuning, no ``rint`` (``floor(t + 0.5)``), no block pointers (plain pointer arithmetic
with masks), IEEE division via ``tl.math.div_rn``, and the host launches every kernel with
``enable_fp_fusion=False`` so that ``zero + code * scale`` is never contracted into an FMA.

Codes are produced byte by byte: a block is laid out as ``[bytes, codes_per_byte]`` and the
shifted codes of a row are summed (their bits are disjoint, so the sum is an OR).
"""

import triton
import triton.language as tl


@triton.jit
def _mix32(h):
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x846CA68B
    return h ^ (h >> 16)


@triton.jit
def _uniform(idx, k1, k2):
    """u in [0, 1) for int64 flat indices (see reference.py, "Stochastic rounding")."""
    lo = (idx & 0xFFFFFFFF).to(tl.uint32)
    hi = (idx >> 32).to(tl.uint32)
    key = _mix32(hi ^ k2.to(tl.uint32)) ^ k1.to(tl.uint32)
    h = _mix32(lo ^ key)
    return (h >> 8).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def _codes(x, fin, zero, scale, r, QMAX: tl.constexpr):
    """Unpacked codes (float32) of x; fin: finite and in bounds; r: 0.5 or u."""
    safe = tl.where(scale == 0.0, 1.0, scale)
    t = tl.math.div_rn(x - zero, safe)
    q = tl.floor(t + r)
    q = tl.minimum(tl.maximum(q, 0.0), QMAX * 1.0)
    q = tl.where(fin, q, 0.0)
    return tl.where(scale != 0.0, q, 0.0)


@triton.jit
def _pack_rows(q, BITS: tl.constexpr, K: tl.constexpr):
    """[B, K] float codes -> [B] uint8 bytes, LSB first."""
    shift = (tl.arange(0, K) * BITS).to(tl.uint32)
    return tl.sum(q.to(tl.uint32) << shift[None, :], axis=1).to(tl.uint8)


@triton.jit
def _out_value(y, OUT_BF16: tl.constexpr):
    """float32 y -> the value to store (round to nearest even happens here or in the cast).

    bfloat16 is rounded by hand and stored through an int16 view of the output: the
    interpreter's own float32 -> bfloat16 cast truncates.  y is finite here.
    """
    if OUT_BF16:
        u = y.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return u.to(tl.uint16).to(tl.int16, bitcast=True)
    else:
        return y


# ----------------------------------------------------------------------------- group mode


@triton.jit
def group_quant_kernel(
    x_ptr,
    codes_ptr,
    scale_ptr,
    zero_ptr,
    bad_ptr,
    n,
    n_bytes,
    k1,
    k2,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    CHUNK: tl.constexpr,
    N_CHUNKS: tl.constexpr,
    STOCH: tl.constexpr,
):
    """One program per group: finite min/max, scale, then the group's code bytes."""
    K: tl.constexpr = 8 // BITS
    GB: tl.constexpr = GROUP * BITS // 8
    QMAX: tl.constexpr = (1 << BITS) - 1
    g = tl.program_id(0).to(tl.int64)
    jj = tl.arange(0, CHUNK)
    kk = tl.arange(0, K)
    vmin = tl.full([CHUNK, K], float("inf"), tl.float32)
    vmax = tl.full([CHUNK, K], float("-inf"), tl.float32)
    vbad = tl.zeros([CHUNK, K], tl.int32)
    for ci in tl.static_range(N_CHUNKS):
        pos = (ci * CHUNK + jj)[:, None] * K + kk[None, :]
        idx = g * GROUP + pos
        mask = (pos < GROUP) & (idx < n)
        x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        fin = mask & (tl.abs(x) < float("inf"))
        vmin = tl.minimum(vmin, tl.where(fin, x, float("inf")))
        vmax = tl.maximum(vmax, tl.where(fin, x, float("-inf")))
        vbad += (mask & ~fin).to(tl.int32)
    mn = tl.min(tl.min(vmin, axis=1), axis=0)
    mx = tl.max(tl.max(vmax, axis=1), axis=0)
    empty = mn > mx
    mn = tl.where(empty, 0.0, mn) + 0.0
    mx = tl.where(empty, 0.0, mx) + 0.0
    scale = tl.math.div_rn(mx - mn, QMAX * 1.0)
    tl.store(scale_ptr + g, scale)
    tl.store(zero_ptr + g, mn)
    tl.store(bad_ptr + g, tl.sum(tl.sum(vbad, axis=1), axis=0))
    for ci in tl.static_range(N_CHUNKS):
        j = ci * CHUNK + jj
        pos = j[:, None] * K + kk[None, :]
        idx = g * GROUP + pos
        mask = (pos < GROUP) & (idx < n)
        x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        fin = mask & (tl.abs(x) < float("inf"))
        if STOCH:
            r = _uniform(idx, k1, k2)
        else:
            r = 0.5
        q = _codes(x, fin, mn, scale, r, QMAX)
        b = g * GB + j
        tl.store(codes_ptr + b, _pack_rows(q, BITS, K), mask=(j < GB) & (b < n_bytes))


@triton.jit
def group_dequant_kernel(
    codes_ptr,
    scale_ptr,
    zero_ptr,
    out_ptr,
    n,
    n_bytes,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    CHUNK: tl.constexpr,
    N_CHUNKS: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    K: tl.constexpr = 8 // BITS
    GB: tl.constexpr = GROUP * BITS // 8
    QMAX: tl.constexpr = (1 << BITS) - 1
    g = tl.program_id(0).to(tl.int64)
    jj = tl.arange(0, CHUNK)
    kk = tl.arange(0, K)
    s = tl.load(scale_ptr + g)
    z = tl.load(zero_ptr + g)
    for ci in tl.static_range(N_CHUNKS):
        j = ci * CHUNK + jj
        b = g * GB + j
        byte = tl.load(codes_ptr + b, mask=(j < GB) & (b < n_bytes), other=0).to(tl.int32)
        q = (byte[:, None] >> (kk * BITS)[None, :]) & QMAX
        y = z + q.to(tl.float32) * s
        pos = j[:, None] * K + kk[None, :]
        idx = g * GROUP + pos
        mask = (pos < GROUP) & (idx < n)
        v = _out_value(y, OUT_BF16)
        tl.store(out_ptr + idx, v.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- channel modes
# A channel c of an (N, C, inner) tensor owns the stream positions p = n * inner + s,
# i.e. the flat elements (n * C + c) * inner + s.


@triton.jit
def channel_minmax_kernel(
    x_ptr, pmin_ptr, pmax_ptr, pbad_ptr, C, inner, M, n_tiles, TILE: tl.constexpr
):
    """Grid (C, n_tiles): partial finite min / max / non-finite count of one tile."""
    c = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    p = t * TILE + tl.arange(0, TILE)
    mask = p < M
    nn = p // inner
    idx = (nn * C + c) * inner + (p - nn * inner)
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    fin = mask & (tl.abs(x) < float("inf"))
    o = c * n_tiles + t
    tl.store(pmin_ptr + o, tl.min(tl.where(fin, x, float("inf")), axis=0))
    tl.store(pmax_ptr + o, tl.max(tl.where(fin, x, float("-inf")), axis=0))
    tl.store(pbad_ptr + o, tl.sum((mask & ~fin).to(tl.int32), axis=0))


@triton.jit
def channel_quant_kernel(
    x_ptr,
    codes_ptr,
    chan_ptr,
    scale_ptr,
    zero_ptr,
    off_ptr,
    C,
    inner,
    M,
    k1,
    k2,
    BITS: tl.constexpr,
    NB: tl.constexpr,
    STOCH: tl.constexpr,
):
    """Grid (channels of width BITS, byte tiles): NB code bytes of one channel's stream."""
    K: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    c = tl.load(chan_ptr + tl.program_id(0)).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    j = t * NB + tl.arange(0, NB)
    p = j[:, None] * K + tl.arange(0, K)[None, :]
    mask = p < M
    nn = p // inner
    idx = (nn * C + c) * inner + (p - nn * inner)
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    fin = mask & (tl.abs(x) < float("inf"))
    scale = tl.load(scale_ptr + c)
    zero = tl.load(zero_ptr + c)
    if STOCH:
        r = _uniform(idx, k1, k2)
    else:
        r = 0.5
    q = _codes(x, fin, zero, scale, r, QMAX)
    off = tl.load(off_ptr + c)
    tl.store(codes_ptr + off + j, _pack_rows(q, BITS, K), mask=j < (M * BITS + 7) // 8)


@triton.jit
def channel_dequant_kernel(
    codes_ptr,
    chan_ptr,
    scale_ptr,
    zero_ptr,
    off_ptr,
    out_ptr,
    C,
    inner,
    M,
    BITS: tl.constexpr,
    NB: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    K: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    c = tl.load(chan_ptr + tl.program_id(0)).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    j = t * NB + tl.arange(0, NB)
    off = tl.load(off_ptr + c)
    byte = tl.load(codes_ptr + off + j, mask=j < (M * BITS + 7) // 8, other=0).to(tl.int32)
    q = (byte[:, None] >> (tl.arange(0, K) * BITS)[None, :]) & QMAX
    y = tl.load(zero_ptr + c) + q.to(tl.float32) * tl.load(scale_ptr + c)
    p = j[:, None] * K + tl.arange(0, K)[None, :]
    nn = p // inner
    idx = (nn * C + c) * inner + (p - nn * inner)
    v = _out_value(y, OUT_BF16)
    tl.store(out_ptr + idx, v.to(out_ptr.dtype.element_ty), mask=p < M)
