"""Triton implementation: host wrappers around the kernels in :mod:`._triton_kernels`.

For CUDA tensors; with ``TRITON_INTERPRET=1`` set before triton is first imported the same
kernels run in Triton's interpreter on CPU tensors (slow: for tests only).  triton is imported
lazily, so ``import fedplan.kernels`` works without it ("triton" is then simply not in
``available_impls()``).  The wrappers check dtype, device, contiguity and shape of their
arguments (as Liger-Kernel does) before launching anything.
"""

from __future__ import annotations

import os

import torch

from ._common import SUPPORTED_DTYPES, n_groups, packed_nbytes

NAME = "triton"

_state: dict = {"kernels": None, "error": None}
_LAUNCH = {"enable_fp_fusion": False, "num_warps": 4}
_MAX_CHUNK_BYTES = 1024  # bytes of codes per block (=> up to 4096 elements at 2 bits)


def _kernels():
    if _state["kernels"] is None and _state["error"] is None:
        try:
            from . import _triton_kernels

            _state["kernels"] = _triton_kernels
        except Exception as e:  # noqa: BLE001 - ImportError, or a broken triton install
            _state["error"] = e
    return _state["kernels"]


def is_available() -> bool:
    return _kernels() is not None


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(device: torch.device) -> None:
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreter_active():
        return
    raise ValueError(
        f"impl='triton' needs CUDA tensors (got {device}); CPU tensors only work under the "
        "Triton interpreter (TRITON_INTERPRET=1 set before triton is imported)"
    )


def _check(t: torch.Tensor, name: str, dtypes, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {t.dtype} not in {tuple(dtypes)}")
    check_device(t.device)
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-d, got shape {tuple(t.shape)}")


def _same_device(*ts: torch.Tensor) -> None:
    devs = {t.device for t in ts}
    if len(devs) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devs))}")


def _chunking(nbytes_per_group: int) -> tuple[int, int]:
    chunk = min(_MAX_CHUNK_BYTES, triton_next_pow2(nbytes_per_group))
    return chunk, (nbytes_per_group + chunk - 1) // chunk


def triton_next_pow2(v: int) -> int:
    return 1 if v <= 1 else 1 << (int(v) - 1).bit_length()


def _keys(keys):
    return (0, 0, False) if keys is None else (keys[0], keys[1], True)


# ----------------------------------------------------------------------------- group mode


def group_quantize(x: torch.Tensor, bits: int, group_size: int, keys):
    k = _kernels()
    _check(x, "x", SUPPORTED_DTYPES, 1)
    if bits not in (2, 4, 8) or group_size <= 0 or group_size % 4:
        raise ValueError("bits must be 2/4/8 and group_size a positive multiple of 4")
    n = x.numel()
    ng = n_groups(n, group_size)
    nb = packed_nbytes(n, bits)
    codes = torch.empty(nb, dtype=torch.uint8, device=x.device)
    scale = torch.empty(ng, dtype=torch.float32, device=x.device)
    zero = torch.empty(ng, dtype=torch.float32, device=x.device)
    bad = torch.empty(ng, dtype=torch.int32, device=x.device)
    chunk, n_chunks = _chunking(group_size * bits // 8)
    k1, k2, stoch = _keys(keys)
    k.group_quant_kernel[(ng,)](
        x, codes, scale, zero, bad, n, nb, k1, k2,
        GROUP=group_size, BITS=bits, CHUNK=chunk, N_CHUNKS=n_chunks, STOCH=stoch, **_LAUNCH,
    )  # fmt: skip
    flags = bad.any().to(torch.int64) | ((~torch.isfinite(scale)).any().to(torch.int64) << 1)
    return codes, scale, zero, flags


def group_dequantize(codes, scale, zero, bits: int, group_size: int, out: torch.Tensor) -> None:
    k = _kernels()
    _check(codes, "codes", (torch.uint8,), 1)
    _check(scale, "scale", (torch.float32,), 1)
    _check(zero, "zero", (torch.float32,), 1)
    _check(out, "out", SUPPORTED_DTYPES, 1)
    _same_device(codes, scale, zero, out)
    n = out.numel()
    ng = n_groups(n, group_size)
    nb = packed_nbytes(n, bits)
    if codes.numel() != nb or scale.numel() != ng or zero.numel() != ng:
        raise ValueError("codes / scale / zero sizes do not match out, bits and group_size")
    chunk, n_chunks = _chunking(group_size * bits // 8)
    bf16 = out.dtype == torch.bfloat16
    k.group_dequant_kernel[(ng,)](
        codes, scale, zero, out.view(torch.int16) if bf16 else out, n, nb,
        GROUP=group_size, BITS=bits, CHUNK=chunk, N_CHUNKS=n_chunks, OUT_BF16=bf16, **_LAUNCH,
    )  # fmt: skip


# ----------------------------------------------------------------------------- channel modes

_MINMAX_TILE = 1024
_TILE_BYTES = 256


def channel_minmax(x3: torch.Tensor):
    k = _kernels()
    _check(x3, "x", SUPPORTED_DTYPES, 3)
    n, c, inner = x3.shape
    m = n * inner
    tile = max(_MINMAX_TILE, triton_next_pow2((m + 65534) // 65535))
    n_tiles = (m + tile - 1) // tile
    f32 = dict(dtype=torch.float32, device=x3.device)
    pmin = torch.empty(c, n_tiles, **f32)
    pmax = torch.empty(c, n_tiles, **f32)
    pbad = torch.empty(c, n_tiles, dtype=torch.int32, device=x3.device)
    k.channel_minmax_kernel[(c, n_tiles)](
        x3, pmin, pmax, pbad, c, inner, m, n_tiles, TILE=tile, **_LAUNCH
    )
    mn = pmin.amin(1)
    mx = pmax.amax(1)
    empty = mn > mx
    mn = torch.where(empty, 0.0, mn) + 0.0
    mx = torch.where(empty, 0.0, mx) + 0.0
    return mn, mx, pbad.any()


def _tile_bytes(nbytes: int) -> int:
    # grid dim 1 stays <= 65535 (a CUDA limit) however long a channel is
    nb = max(_TILE_BYTES, triton_next_pow2((nbytes + 65534) // 65535))
    return min(nb, triton_next_pow2(nbytes))


def _by_width(bits_c: torch.Tensor):
    bits_cpu = bits_c.cpu()
    for b in (2, 4, 8):
        sel = torch.nonzero(bits_cpu == b).flatten()
        if sel.numel():
            yield b, sel.to(device=bits_c.device, dtype=torch.int64)


def _check_channel_args(x3, bits_c, scale, zero, offsets):
    _check(bits_c, "bits", (torch.uint8,), 1)
    _check(scale, "scale", (torch.float32,), 1)
    _check(zero, "zero", (torch.float32,), 1)
    c = x3.shape[1]
    if not (bits_c.numel() == scale.numel() == zero.numel() == offsets.numel() == c):
        raise ValueError("per-channel tensors must have one entry per channel")


def channel_quantize(x3, bits_c, scale, zero, offsets, total_bytes: int, keys):
    k = _kernels()
    _check(x3, "x", SUPPORTED_DTYPES, 3)
    offsets = offsets.to(x3.device)
    _check_channel_args(x3, bits_c, scale, zero, offsets)
    _same_device(x3, bits_c, scale, zero, offsets)
    n, c, inner = x3.shape
    m = n * inner
    codes = torch.empty(total_bytes, dtype=torch.uint8, device=x3.device)  # all written
    k1, k2, stoch = _keys(keys)
    for b, sel in _by_width(bits_c):
        nbytes = packed_nbytes(m, b)
        nb = _tile_bytes(nbytes)
        grid = (sel.numel(), (nbytes + nb - 1) // nb)
        k.channel_quant_kernel[grid](
            x3, codes, sel, scale, zero, offsets, c, inner, m, k1, k2,
            BITS=b, NB=nb, STOCH=stoch, **_LAUNCH,
        )  # fmt: skip
    return codes


def channel_dequantize(codes, bits_c, scale, zero, offsets, out3) -> None:
    k = _kernels()
    _check(codes, "codes", (torch.uint8,), 1)
    _check(out3, "out", SUPPORTED_DTYPES, 3)
    offsets = offsets.to(out3.device)
    _check_channel_args(out3, bits_c, scale, zero, offsets)
    _same_device(codes, out3, bits_c, scale, zero, offsets)
    n, c, inner = out3.shape
    m = n * inner
    bf16 = out3.dtype == torch.bfloat16
    out_arg = out3.view(torch.int16) if bf16 else out3
    for b, sel in _by_width(bits_c):
        nbytes = packed_nbytes(m, b)
        nb = _tile_bytes(nbytes)
        grid = (sel.numel(), (nbytes + nb - 1) // nb)
        k.channel_dequant_kernel[grid](
            codes, sel, scale, zero, offsets, out_arg, c, inner, m,
            BITS=b, NB=nb, OUT_BF16=bf16, **_LAUNCH,
        )  # fmt: skip
