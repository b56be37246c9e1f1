"""Shared pieces of the activation-quantization kernels.

Everything here is implementation independent: the :class:`Packed` container, argument
validation, the layout helpers (group counts, per-channel byte offsets), the counter-based
random numbers for stochastic rounding (their *definition*; every implementation evaluates the
same function), and the mixed-precision bit allocation, which works on per-channel statistics
and is therefore computed once on the host for every implementation.

The packed format itself is specified in the docstring of :mod:`.reference`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 4, 8)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MODES = ("group", "channel", "mixed")

# Constants of the hash behind stochastic rounding (see reference.py, "Stochastic rounding").
MIX_C1 = 0x7FEB352D
MIX_C2 = 0x846CA68B
SEED_SALT_LO = 0x9E3779B9
SEED_SALT_HI = 0x85EBCA6B
MASK32 = 0xFFFFFFFF


@dataclass(frozen=True, eq=False)
class Packed:
    """A quantized tensor (format: see the docstring of :mod:`fedplan.kernels.reference`).

    Attributes:
        codes: 1-D uint8 tensor, the bit-packed codes (LSB first).
        scale: 1-D float32 tensor, one step size per group (mode "group") or per channel.
        zero: 1-D float32 tensor, the minimum of each group / channel (the value of code 0).
        bits: code width; an ``int`` for modes "group" and "channel", a 1-D uint8 tensor with one
            width in {2, 4, 8} per channel for mode "mixed".
        shape: shape of the original tensor.
        dtype: dtype of the original tensor (float32, float16 or bfloat16).
        group_size: elements per (scale, zero) pair: the group size for mode "group"; the
            number of elements of one channel for modes "channel" and "mixed".
        mode: "group", "channel" or "mixed".
        nonfinite_index: int64 flat indices of the NaN/+-Inf elements of the input, or None.
        nonfinite_value: their values (original dtype), or None.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int | torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    group_size: int
    mode: str
    nonfinite_index: torch.Tensor | None = None
    nonfinite_value: torch.Tensor | None = None

    def nbytes(self) -> int:
        """Bytes of packed storage: codes, scales, zeros, per-channel widths, non-finite table."""
        tensors = [self.codes, self.scale, self.zero]
        if isinstance(self.bits, torch.Tensor):
            tensors.append(self.bits)
        if self.nonfinite_index is not None:
            tensors += [self.nonfinite_index, self.nonfinite_value]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def avg_bits(self) -> float:
        """Average code width per element (excluding scales, zeros and byte padding)."""
        if isinstance(self.bits, torch.Tensor):
            return float(self.bits.double().mean()) if self.bits.numel() else 0.0
        return float(self.bits)


# ----------------------------------------------------------------------------- layout helpers


def channel_dims(shape: torch.Size | tuple[int, ...]) -> tuple[int, int, int]:
    """(N, C, inner) view used by modes "channel"/"mixed": channel dim 1 for ndim >= 2.

    Tensors with ndim <= 1 are a single channel: (1, 1, numel).
    """
    if len(shape) >= 2:
        return shape[0], shape[1], math.prod(shape[2:])
    return 1, 1, math.prod(shape)


def n_groups(numel: int, group_size: int) -> int:
    return (numel + group_size - 1) // group_size


def packed_nbytes(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


def channel_byte_offsets(bits_c: torch.Tensor, m: int) -> tuple[torch.Tensor, int]:
    """Start byte of each channel's stream (int64, CPU) and the total code bytes.

    Channel c holds ``m`` codes of ``bits_c[c]`` bits, padded to a whole byte.
    """
    sizes = (bits_c.to(torch.int64).cpu() * m + 7) // 8
    offsets = torch.zeros_like(sizes)
    if sizes.numel() > 1:
        offsets[1:] = torch.cumsum(sizes, 0)[:-1]
    return offsets, int(sizes.sum())


# ----------------------------------------------------------------------------- validation


def check_quantize_args(x, bits, group_size, mode, target_bits) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"quantize supports float32, float16 and bfloat16 tensors, got {x.dtype}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "mixed" or target_bits is None:
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if mode == "group":
        if not isinstance(group_size, int) or group_size <= 0 or group_size % 4:
            raise ValueError(
                "group_size must be a positive multiple of 4 (so that every group starts on a "
                f"byte boundary at 2, 4 and 8 bits), got {group_size!r}"
            )
    if target_bits is not None:
        if mode != "mixed":
            raise ValueError("target_bits is only meaningful with mode='mixed'")
        if not 2 <= float(target_bits) <= 8:
            raise ValueError(f"target_bits must lie in [2, 8], got {target_bits!r}")


def resolve_seed(stochastic: bool, seed: int | None) -> int | None:
    """The 64-bit seed used for stochastic rounding (None for deterministic rounding).

    ``seed=None`` draws one from torch's default CPU generator, so ``torch.manual_seed``
    makes runs reproducible.
    """
    if not stochastic:
        return None
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
    return int(seed) & 0xFFFFFFFFFFFFFFFF


# ----------------------------------------------------------------------------- hash (python ints)


def mix32(h: int) -> int:
    """The 32-bit integer mixer ("lowbias32", C. Wellons) on a Python int."""
    h &= MASK32
    h ^= h >> 16
    h = (h * MIX_C1) & MASK32
    h ^= h >> 15
    h = (h * MIX_C2) & MASK32
    h ^= h >> 16
    return h


def seed_keys(seed: int) -> tuple[int, int]:
    """The two 32-bit keys derived from a 64-bit seed (see reference.py)."""
    k1 = mix32((seed & MASK32) ^ SEED_SALT_LO)
    k2 = mix32(((seed >> 32) & MASK32) ^ k1 ^ SEED_SALT_HI)
    return k1, k2


def uniform_for_index(index: int, seed: int) -> float:
    """u in [0, 1) for one flat element index (slow; documentation / tests)."""
    k1, k2 = seed_keys(seed)
    h = mix32((index & MASK32) ^ k1 ^ mix32(((index >> 32) & MASK32) ^ k2))
    return (h >> 8) * 2.0**-24


# ----------------------------------------------------------------------------- mixed precision

# Error reduction per extra bit (in units of range^2 / 12) when a channel goes 2 -> 4 bits
# (2 extra bits) and 4 -> 8 bits (4 extra bits).  GAIN_2_4 > GAIN_4_8, so a channel's 2 -> 4
# upgrade always comes before its 4 -> 8 upgrade in the greedy order.
GAIN_2_4 = (1.0 / 3**2 - 1.0 / 15**2) / 2.0
GAIN_4_8 = (1.0 / 15**2 - 1.0 / 255**2) / 4.0


def allocate_mixed_bits(ch_min: torch.Tensor, ch_max: torch.Tensor, target_bits: float):
    """Per-channel widths in {2, 4, 8} for mode "mixed" (uint8 tensor on ch_min's device).

    Rule (deterministic, greedy marginal analysis): every channel has the same number of
    elements, and the expected squared error of uniform quantization of channel c with
    ``b`` bits is proportional to ``(range_c / (2**b - 1))**2 / 12`` per element.  All
    channels start at 2 bits.  The candidate upgrades are 2 -> 4 (cost 2 bits per element
    of the channel) and 4 -> 8 (cost 4 bits); each is scored by its error reduction per extra
    bit, ``range_c**2 * GAIN``.  Upgrades are visited in decreasing score (ties: lower channel
    index first, then 2 -> 4 before 4 -> 8) and each one is taken if it still fits in the
    budget ``floor(target_bits * C) - 2 * C`` (first fit).  Upgrades of zero-range channels
    gain nothing and are never taken.  The resulting mean width is <= target_bits and, unless
    channels are constant, within 2 / C of it (or every channel is at 8 bits).
    """
    c = ch_min.numel()
    rng = (ch_max.double() - ch_min.double()).cpu()
    r2 = rng * rng
    bits = torch.full((c,), 2, dtype=torch.uint8)
    budget = math.floor(float(target_bits) * c + 1e-9) - 2 * c
    if c == 0 or budget < 2:
        return bits.to(ch_min.device)
    score = torch.cat([r2 * GAIN_2_4, r2 * GAIN_4_8])
    chan = torch.cat([torch.arange(c), torch.arange(c)])
    stage = torch.cat([torch.zeros(c, dtype=torch.int64), torch.ones(c, dtype=torch.int64)])
    cost = 2 + 2 * stage
    keep = score > 0
    score, chan, stage, cost = score[keep], chan[keep], stage[keep], cost[keep]
    # Sort by (-score, chan, stage): stable sorts from the least significant key up.
    order = torch.argsort(stage, stable=True)
    order = order[torch.argsort(chan[order], stable=True)]
    order = order[torch.argsort(-score[order], stable=True)]
    chan, stage, cost = chan[order], stage[order], cost[order]
    cum = torch.cumsum(cost, 0)
    k = int((cum <= budget).sum())  # cum is increasing: the fitting items form a prefix
    remaining = budget - (int(cum[k - 1]) if k else 0)
    taken = torch.zeros(chan.numel(), dtype=torch.bool)
    taken[:k] = True
    if remaining >= 2 and k < chan.numel():
        # Item k (cost 4) did not fit; first fit then takes the first later 2 -> 4 upgrade.
        later = torch.nonzero(stage[k:] == 0).flatten()
        if later.numel():
            taken[k + int(later[0])] = True
    up = chan[taken]
    st = stage[taken]
    bits[up[st == 0]] = 4
    bits[up[st == 1]] = 8
    return bits.to(ch_min.device)
