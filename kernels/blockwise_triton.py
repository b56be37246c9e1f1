"""Triton implementation of the block-wise 8-bit format (:mod:`.blockwise` defines it).

For CUDA tensors; with ``TRITON_INTERPRET=1`` set before triton is first imported the same
kernels run in Triton's interpreter on CPU tensors (slow: tests only). triton is imported
lazily. The wrappers check dtype, device, contiguity and sizes before launching.
"""

from __future__ import annotations

import torch

from .triton_impl import check_device

_state: dict = {"kernels": None, "error": None}
_LAUNCH = {"enable_fp_fusion": False, "num_warps": 4}


def _kernels():
    if _state["kernels"] is None and _state["error"] is None:
        try:
            from . import _blockwise_triton_kernels

            _state["kernels"] = _blockwise_triton_kernels
        except Exception as e:  # noqa: BLE001 - ImportError, or a broken triton install
            _state["error"] = e
    return _state["kernels"]


def is_available() -> bool:
    return _kernels() is not None


def _check(t: torch.Tensor, name: str, dtypes, numel: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor; found {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {tuple(dtypes)}; found {t.dtype}")
    check_device(t.device)
    if not t.is_contiguous() or t.dim() != 1:
        raise ValueError(f"{name} must be a contiguous 1-D tensor; found shape "
                         f"{tuple(t.shape)}, strides {t.stride()}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name}: expected {numel} elements; found {t.numel()}")


def _require():
    k = _kernels()
    if k is None:
        raise RuntimeError(f"impl='triton' needs triton (pip install 'fedplan[triton]'): "
                           f"{_state['error']}")
    return k


def quantize(x: torch.Tensor, block_size: int, mid_padded: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """codes (uint8) and absmax (float32) of a flat float tensor; one program per block."""
    k = _require()
    _check(x, "x", (torch.float32, torch.float16, torch.bfloat16))
    _check(mid_padded, "midpoints", (torch.float32,), 256)
    n = x.numel()
    blocks = (n + block_size - 1) // block_size
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=x.device)
    if blocks:
        k.blockwise_quant_kernel[(blocks,)](x, mid_padded, codes, absmax, n, BLOCK=block_size,
                                            **_LAUNCH)
    return codes, absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor,
               block_size: int, out: torch.Tensor) -> None:
    """Write the float32 values of codes/absmax into ``out`` (flat float32)."""
    k = _require()
    n = codes.numel()
    blocks = (n + block_size - 1) // block_size
    _check(codes, "codes", (torch.uint8,))
    _check(absmax, "absmax", (torch.float32,), blocks)
    _check(table, "table", (torch.float32,), 256)
    _check(out, "out", (torch.float32,), n)
    if blocks:
        k.blockwise_dequant_kernel[(blocks,)](codes, table, absmax, out, n, BLOCK=block_size,
                                              **_LAUNCH)
