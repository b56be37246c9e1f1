"""Public entry points: :func:`quantize`, :func:`dequantize`, :func:`available_impls`.

The host side is shared by all implementations (argument checks, seeds, the mixed-precision
bit allocation, per-channel scales, the non-finite side table); an implementation only
provides the element-wise kernels (see reference.py for their signatures).
"""

from __future__ import annotations

import torch

from . import cpu, reference, triton_impl
from ._common import (
    Packed,
    allocate_mixed_bits,
    channel_byte_offsets,
    channel_dims,
    check_quantize_args,
    n_groups,
    resolve_seed,
    seed_keys,
)

IMPLS = ("reference", "cpu", "triton")


def available_impls() -> list[str]:
    """Names of the implementations usable in this process, among reference / cpu / triton.

    "cpu" is listed unless its prerequisites (a C++ compiler, ninja) are missing or its
    one-off build already failed; the build itself happens on first use.  "triton" is listed
    when triton imports (it needs CUDA tensors, or ``TRITON_INTERPRET=1`` set before triton
    was first imported, in which case it runs on CPU tensors).
    """
    names = ["reference"]
    if cpu.is_available():
        names.append("cpu")
    if triton_impl.is_available():
        names.append("triton")
    return names


def _backend(impl: str, device: torch.device):
    if impl == "auto":
        if device.type == "cuda" and triton_impl.is_available():
            return triton_impl
        if device.type == "cpu":
            be = cpu.backend()  # None (after a one-off warning) if the build failed
            if be is not None:
                return be
        return reference
    if impl == "reference":
        return reference
    if impl == "cpu":
        if device.type != "cpu":
            raise ValueError(f"impl='cpu' needs CPU tensors, got a tensor on {device}")
        return cpu.backend() or reference
    if impl == "triton":
        if not triton_impl.is_available():
            raise RuntimeError(
                "impl='triton' requested but triton is not importable "
                "(pip install 'fedplan[triton]')"
            )
        triton_impl.check_device(device)
        return triton_impl
    raise ValueError(f"impl must be 'auto' or one of {IMPLS}, got {impl!r}")


def quantize(
    x: torch.Tensor,
    bits: int = 8,
    *,
    group_size: int = 256,
    mode: str = "group",
    stochastic: bool = False,
    seed: int | None = None,
    impl: str = "auto",
    target_bits: float | None = None,
) -> Packed:
    """Quantize ``x`` (float32 / float16 / bfloat16) into a :class:`Packed`.

    Args:
        bits: code width, 8, 4 or 2 (mode "mixed": the default ``target_bits``).
        group_size: elements per group in mode "group" (a positive multiple of 4).
        mode: "group" (min/max per ``group_size`` consecutive elements), "channel" (per
            channel, dim 1; ndim <= 1 is one channel) or "mixed" (per channel, with per-channel
            widths in {2, 4, 8} chosen to meet ``target_bits``, see
            :func:`fedplan.kernels._common.allocate_mixed_bits`).
        stochastic: unbiased stochastic rounding instead of round-half-up.
        seed: seed of the stochastic rounding (None: drawn from torch's default generator).
        impl: "auto" (triton for CUDA tensors when available, else the fast CPU kernels for CPU
            tensors, else reference), "reference", "cpu" or "triton".
        target_bits: mode "mixed" only: the average bits per element to meet (in [2, 8]).

    Non-finite inputs are excluded from the statistics and restored exactly by
    :func:`dequantize` (rule and rationale: :mod:`fedplan.kernels.reference`).
    """
    check_quantize_args(x, bits, group_size, mode, target_bits)
    be = _backend(impl, x.device)
    s = resolve_seed(stochastic, seed)
    keys = None if s is None else seed_keys(s)
    xc = x.detach().contiguous()
    flat = xc.view(-1)
    numel = flat.numel()
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)

    if mode == "group":
        if numel == 0:
            codes = torch.empty(0, dtype=torch.uint8, device=dev)
            scale, zero, flags = torch.empty(0, **f32), torch.empty(0, **f32), 0
        else:
            codes, scale, zero, flags = be.group_quantize(flat, bits, group_size, keys)
        p_bits, p_group = bits, group_size
    else:
        n, c, inner = channel_dims(x.shape)
        m = n * inner
        if numel == 0:
            zero, ch_max, nonfinite = torch.zeros(c, **f32), torch.zeros(c, **f32), False
        else:
            zero, ch_max, nonfinite = be.channel_minmax(xc.view(n, c, inner))
        if mode == "mixed":
            tb = float(bits if target_bits is None else target_bits)
            bits_c = allocate_mixed_bits(zero, ch_max, tb)
            p_bits = bits_c
        else:
            bits_c = torch.full((c,), bits, dtype=torch.uint8, device=dev)
            p_bits = bits
        qmax = ((1 << bits_c.to(torch.int32)) - 1).to(torch.float32)
        scale = (ch_max - zero) / qmax
        if (~torch.isfinite(scale)).any():  # C values: cheap (and mixed mode synced already)
            raise _overflow_error()
        offsets, total = channel_byte_offsets(bits_c, m)
        if numel == 0:
            codes = torch.zeros(total, dtype=torch.uint8, device=dev)
        else:
            codes = be.channel_quantize(
                xc.view(n, c, inner), bits_c, scale, zero, offsets, total, keys
            )
        p_group = m
        flags = nonfinite

    flags = int(flags)  # bit 0: non-finite input; bit 1: range overflow (one host sync)
    if flags & 2:
        raise _overflow_error()
    nf_index = nf_value = None
    if flags & 1:
        nf_index = torch.nonzero(~torch.isfinite(flat)).flatten()
        nf_value = flat[nf_index].clone()
    return Packed(
        codes=codes,
        scale=scale,
        zero=zero,
        bits=p_bits,
        shape=torch.Size(x.shape),
        dtype=x.dtype,
        group_size=p_group,
        mode=mode,
        nonfinite_index=nf_index,
        nonfinite_value=nf_value,
    )


def _overflow_error() -> ValueError:
    return ValueError(
        "quantize: the range max - min of a group/channel overflows float32 "
        "(finite values spanning more than ~3.4e38 cannot be quantized)"
    )


def _check_packed(p: Packed) -> None:
    if not isinstance(p, Packed):
        raise TypeError(f"dequantize expects a Packed, got {type(p).__name__}")
    if p.codes.dtype != torch.uint8 or p.codes.dim() != 1 or not p.codes.is_contiguous():
        raise ValueError("Packed.codes must be a contiguous 1-D uint8 tensor")
    for name in ("scale", "zero"):
        t = getattr(p, name)
        if t.dtype != torch.float32 or t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"Packed.{name} must be a contiguous 1-D float32 tensor")
    if p.mode == "group":
        expect = n_groups(p.numel, p.group_size)
        if p.scale.numel() != expect or p.codes.numel() != (p.numel * p.bits + 7) // 8:
            raise ValueError("Packed (mode 'group'): sizes do not match shape / group_size")


def dequantize(p: Packed, *, impl: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """Reconstruct the tensor (original shape and dtype) from a :class:`Packed`.

    ``out``: optional preallocated contiguous tensor of the original shape, dtype and device
    to write into (avoids a fresh large allocation); it is returned.
    """
    _check_packed(p)
    dev = p.codes.device
    if out is None:
        out = torch.empty(p.shape, dtype=p.dtype, device=dev)
    elif (
        out.shape != p.shape or out.dtype != p.dtype or out.device != dev or not out.is_contiguous()
    ):
        raise ValueError(
            f"out must be a contiguous {p.dtype} tensor of shape {tuple(p.shape)} on {dev}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
            + ("" if out.is_contiguous() else " (not contiguous)")
        )
    if p.numel == 0:
        return out
    be = _backend(impl, dev)
    flat = out.view(-1)
    if p.mode == "group":
        be.group_dequantize(p.codes, p.scale, p.zero, p.bits, p.group_size, flat)
    else:
        n, c, inner = channel_dims(p.shape)
        if isinstance(p.bits, torch.Tensor):
            bits_c = p.bits
        else:
            bits_c = torch.full((c,), p.bits, dtype=torch.uint8, device=dev)
        offsets, total = channel_byte_offsets(bits_c, n * inner)
        if p.codes.numel() != total or p.scale.numel() != c:
            raise ValueError("Packed (channel modes): sizes do not match shape / bits")
        be.channel_dequantize(p.codes, bits_c, p.scale, p.zero, offsets, out.view(n, c, inner))
    if p.nonfinite_index is not None:
        flat[p.nonfinite_index] = p.nonfinite_value
    return out
