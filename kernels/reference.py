"""Reference implementation (plain eager torch, any device) -- and the packed format spec.

Packed format
=============

A :class:`~fedplan.kernels.Packed` holds

* ``codes``: 1-D ``uint8`` tensor.  Codes are unsigned ``bits``-bit integers packed
  **LSB first**: at 4 bits, byte ``j`` holds code ``2j`` in bits 0-3 and code ``2j+1`` in bits
  4-7; at 2 bits, byte ``j`` holds codes ``4j .. 4j+3`` in bits 0-1, 2-3, 4-5, 6-7; at 8 bits a
  byte is a code.  Unused high bits of a stream's last byte are zero.
* ``scale`` and ``zero``: 1-D ``float32``, one pair per group (mode "group") or per channel
  (modes "channel" and "mixed").  ``zero`` is the minimum, ``scale`` the step.
* ``bits``: an int (modes "group", "channel") or a ``uint8`` tensor of per-channel widths
  (mode "mixed"); ``shape`` and ``dtype`` of the input; ``group_size``; ``mode``;
  ``nonfinite_index`` / ``nonfinite_value`` (see "NaN and Inf" below).

Element order.
  *Mode "group"*: the tensor is flattened (row-major) and cut into groups of ``group_size``
  consecutive elements (the last one may be shorter).  The codes of all elements form one
  stream in flat order, so group ``g`` starts at byte ``g * group_size * bits / 8``;
  ``group_size`` must be a multiple of 4, which puts every group start on a byte boundary.
  *Modes "channel" and "mixed"*: the tensor is viewed as ``(N, C, inner)`` with the channel
  dimension 1 (``N = shape[0]``, ``C = shape[1]``, ``inner`` = product of the rest; a tensor
  with ndim <= 1 is one channel, ``(1, 1, numel)``).  Channel ``c`` owns one stream of
  ``M = N * inner`` codes in the order ``p = n * inner + s`` (i.e. ``x[:, c].flatten()``),
  packed at the channel's width and padded to a whole byte.  The streams follow each other
  in channel order: channel ``c`` starts at byte ``sum_{c' < c} ceil(M * bits[c'] / 8)``.
  Mode "channel" is exactly mode "mixed" with every channel at the same width.

Quantization (all arithmetic in float32, IEEE round-to-nearest, no fused multiply-add).
  ``x`` is converted to float32 (exact for float16 / bfloat16).  Per group / channel:
  ``min``, ``max`` over its *finite* elements (0, 0 if there are none), canonicalised with
  ``+ 0.0`` (so a zero minimum is +0.0 whatever the reduction order); ``qmax = 2**bits - 1``;
  ``scale = (max - min) / qmax`` (a true division); ``zero = min``.  For each element::

      t    = (x - zero) / scale                          # true division
      code = clamp(floor(t + 0.5), 0, qmax)              # deterministic: round half up
      code = clamp(floor(t + u),   0, qmax)              # stochastic, u in [0, 1) (below)
      code = 0    if scale == 0 or x is not finite

  ``floor(t + 0.5)`` is used instead of ``round`` (ties to even) because it is available
  everywhere (the Triton interpreter has no ``rint``).  A constant group (max == min) has
  ``scale == 0``: all its codes are 0 and it dequantizes to ``min`` exactly.  If
  ``max - min`` overflows float32 (only possible for float32/bfloat16 inputs spanning more
  than ~3.4e38), quantize raises ``ValueError``.

Dequantization.
  ``y = zero + float(code) * scale`` (float32 multiply, then add; never fused), converted to
  the original dtype with round-to-nearest-even; then the non-finite elements are written
  back (below).  For deterministic rounding ``|y - x| <= scale / 2`` up to float32 rounding
  (plus the rounding of the final dtype conversion for float16 / bfloat16).

NaN and Inf.
  Rule: *non-finite values are excluded from the statistics and restored exactly.*  ``min``
  / ``max`` use only finite elements, a non-finite element gets code 0, and quantize stores
  the flat indices (int64, ascending) and original values of all non-finite elements in
  ``nonfinite_index`` / ``nonfinite_value`` (both None when there are none, the usual case;
  the kernels report whether any exist while computing the statistics, so the check costs
  no extra pass).  Dequantize writes them back, so NaN stays NaN and +-Inf keep their sign.
  Why: quantized activations feed the backward pass.  An overflow in float16 training must
  reach the loss scaler (``torch.amp.GradScaler`` skips the step on non-finite gradients),
  and raising inside a saved-tensor hook would instead crash a run that plain PyTorch would
  survive; poisoning a whole group would turn finite neighbours into NaN, and letting one
  Inf into min/max would set every other code in its group to 0 (scale = Inf).  The rule is
  simple to implement identically everywhere: a finiteness mask in the min/max reduction and
  in the code computation, plus a ``torch.nonzero`` that only runs when the kernel flagged a
  non-finite value.

Stochastic rounding.
  ``u`` is a counter-based hash of the element's flat (row-major) index ``i`` in the original
  tensor and the 64-bit ``seed``, so every implementation, device and mode draws the same
  ``u`` for the same element::

      mix32(h): h ^= h >> 16; h *= 0x7feb352d; h ^= h >> 15; h *= 0x846ca68b; h ^= h >> 16
                (uint32 arithmetic, "lowbias32" by C. Wellons)
      k1 = mix32(seed_lo ^ 0x9e3779b9);  k2 = mix32(seed_hi ^ k1 ^ 0x85ebca6b)
      h  = mix32(i_lo ^ k1 ^ mix32(i_hi ^ k2))        # i_lo / i_hi: low / high 32 bits of i
      u  = (h >> 8) * 2**-24                           # 24 random bits, exact in float32

  ``k1 ^ mix32(i_hi ^ k2)`` is constant over 2**32 consecutive indices, so the kernels
  evaluate one ``mix32`` per element.

  ``E[floor(t + u)] = t`` up to the 2**-24 granularity of ``u``, so rounding is unbiased.
"""

from __future__ import annotations

import torch

from ._common import MASK32, MIX_C1, MIX_C2, n_groups, packed_nbytes

NAME = "reference"


def is_available() -> bool:
    return True


# ----------------------------------------------------------------------------- helpers


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2**32 for int64 h in [0, 2**32) without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (h * lo + (((h * hi) & 0xFFFF) << 16)) & MASK32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, MIX_C1)
    h = h ^ (h >> 15)
    h = _mul32(h, MIX_C2)
    return h ^ (h >> 16)


def uniform(index: torch.Tensor, keys: tuple[int, int]) -> torch.Tensor:
    """u in [0, 1) (float32) for int64 flat element indices (see the module docstring)."""
    k1, k2 = keys
    key = _mix32(((index >> 32) & MASK32) ^ k2) ^ k1
    h = _mix32((index & MASK32) ^ key)
    return (h >> 8).to(torch.float32) * 2.0**-24


def _finite(x: torch.Tensor) -> torch.Tensor:
    return x.abs() < float("inf")


def _minmax_rows(rows: torch.Tensor):
    """min / max of the finite values of each row of a float32 (R, L) tensor, canonicalised."""
    fin = _finite(rows)
    if rows.shape[1] == 0:
        z = torch.zeros(rows.shape[0], dtype=torch.float32, device=rows.device)
        return z, z.clone(), fin
    mn = torch.where(fin, rows, float("inf")).amin(1)
    mx = torch.where(fin, rows, float("-inf")).amax(1)
    empty = mn > mx
    mn = torch.where(empty, 0.0, mn) + 0.0
    mx = torch.where(empty, 0.0, mx) + 0.0
    return mn, mx, fin


def _codes_rows(rows, fin, zero, scale, qmax, u):
    """uint8 codes (unpacked) of a float32 (R, L) tensor with per-row zero / scale."""
    s = scale[:, None]
    safe = torch.where(s == 0, torch.ones_like(s), s)
    t = (rows - zero[:, None]) / safe
    q = torch.floor(t + (0.5 if u is None else u))
    q = torch.clamp(q, 0.0, qmax)
    q = torch.where(fin & (s != 0), q, 0.0)
    return q.to(torch.uint8)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (R, L) LSB first -> (R, ceil(L * bits / 8)) bytes."""
    k = 8 // bits
    r, length = codes.shape
    nb = packed_nbytes(length, bits)
    if k == 1:
        return codes.contiguous()
    if nb * k != length:
        codes = torch.cat([codes, codes.new_zeros(r, nb * k - length)], 1)
    c = codes.view(r, nb, k).to(torch.int32)
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=codes.device)
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_rows(data: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: (R, nbytes) uint8 -> (R, length) uint8 codes."""
    k = 8 // bits
    if k == 1:
        return data[:, :length]
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=data.device)
    c = (data.to(torch.int32)[:, :, None] >> shifts) & ((1 << bits) - 1)
    return c.reshape(data.shape[0], -1)[:, :length].to(torch.uint8)


# ----------------------------------------------------------------------------- group mode


def group_quantize(x: torch.Tensor, bits: int, group_size: int, keys):
    """x: contiguous 1-D float tensor.  Returns codes, scale, zero, flags.

    flags (int or 0-d integer tensor): bit 0 set if some input is not finite, bit 1 if some
    ``max - min`` overflowed float32 (scale is Inf).
    """
    n = x.numel()
    ng = n_groups(n, group_size)
    pad = ng * group_size - n
    xf = x.to(torch.float32)
    if pad:  # NaN padding is non-finite, hence ignored by the statistics (and gets code 0)
        xf = torch.cat([xf, xf.new_full((pad,), float("nan"))])
    rows = xf.view(ng, group_size)
    mn, mx, fin = _minmax_rows(rows)
    qmax = float((1 << bits) - 1)
    scale = (mx - mn) / torch.full_like(mx, qmax)
    u = None
    if keys is not None:
        idx = torch.arange(ng * group_size, device=x.device, dtype=torch.int64)
        u = uniform(idx, keys).view(ng, group_size)
    codes = _codes_rows(rows, fin, mn, scale, qmax, u).view(-1)[:n]
    packed = pack_rows(codes.view(1, -1), bits).view(-1)
    flags = (~fin).view(-1)[:n].any().to(torch.int64) | ((~torch.isfinite(scale)).any() << 1)
    return packed, scale, mn, flags


def group_dequantize(codes, scale, zero, bits: int, group_size: int, out: torch.Tensor) -> None:
    """Write the dequantized values into ``out`` (contiguous 1-D, any supported dtype)."""
    n = out.numel()
    ng = scale.numel()
    c = unpack_rows(codes.view(1, -1), bits, n).view(-1)
    pad = ng * group_size - n
    if pad:
        c = torch.cat([c, c.new_zeros(pad)])
    y = zero[:, None] + c.view(ng, group_size).to(torch.float32) * scale[:, None]
    out.copy_(y.view(-1)[:n])


# ----------------------------------------------------------------------------- channel modes


def _channel_rows(x3: torch.Tensor) -> torch.Tensor:
    n, c, inner = x3.shape
    return x3.to(torch.float32).transpose(0, 1).reshape(c, n * inner)


def channel_minmax(x3: torch.Tensor):
    """Per-channel finite min / max of a contiguous (N, C, inner) tensor, has_nonfinite.

    has_nonfinite: a bool or a 0-d bool tensor.
    """
    mn, mx, fin = _minmax_rows(_channel_rows(x3))
    return mn, mx, (~fin).any()


def channel_quantize(x3, bits_c, scale, zero, offsets, total_bytes: int, keys):
    """Codes of a contiguous (N, C, inner) tensor, channel c at width bits_c[c]."""
    n, c, inner = x3.shape
    m = n * inner
    rows = _channel_rows(x3)
    fin = _finite(rows)
    u = None
    if keys is not None:
        idx = torch.arange(x3.numel(), device=x3.device, dtype=torch.int64).view(n, c, inner)
        u = uniform(idx.transpose(0, 1).reshape(c, m), keys)
    out = torch.zeros(total_bytes, dtype=torch.uint8, device=x3.device)
    bits_cpu = bits_c.cpu()
    offsets = offsets.to(x3.device)
    for b in (2, 4, 8):
        sel = torch.nonzero(bits_cpu == b).flatten()
        if sel.numel() == 0:
            continue
        sel_d = sel.to(x3.device)
        uu = None if u is None else u[sel_d]
        q = _codes_rows(rows[sel_d], fin[sel_d], zero[sel_d], scale[sel_d], float(2**b - 1), uu)
        data = pack_rows(q, b)  # (len(sel), nbytes)
        pos = offsets[sel_d][:, None] + torch.arange(data.shape[1], device=x3.device)
        out[pos.reshape(-1)] = data.reshape(-1)
    return out


def channel_dequantize(codes, bits_c, scale, zero, offsets, out3: torch.Tensor) -> None:
    n, c, inner = out3.shape
    m = n * inner
    y = torch.empty(c, m, dtype=torch.float32, device=out3.device)
    bits_cpu = bits_c.cpu()
    offsets = offsets.to(out3.device)
    for b in (2, 4, 8):
        sel = torch.nonzero(bits_cpu == b).flatten()
        if sel.numel() == 0:
            continue
        sel_d = sel.to(out3.device)
        nb = packed_nbytes(m, b)
        pos = offsets[sel_d][:, None] + torch.arange(nb, device=out3.device)
        q = unpack_rows(codes[pos], b, m)
        y[sel_d] = zero[sel_d][:, None] + q.to(torch.float32) * scale[sel_d][:, None]
    out3.copy_(y.view(c, n, inner).transpose(0, 1))
