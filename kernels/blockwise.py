"""Block-wise 8-bit quantization with a dynamic code map (for optimizer state).

Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (ICLR'22): optimizer state
kept in 8 bits, each block of consecutive elements normalised by its own absolute maximum
and mapped to the nearest of 256 values of a non-linear ("dynamic tree") code map, keeps
32-bit accuracy. This module defines that format and implements it twice:

>>> q = quantize_blockwise(x, block_size=256, signed=True)    # BlockwiseQuantized
>>> y = dequantize_blockwise(q)                                # float32, x's shape

Format
======

* ``x`` (float32, float16 or bfloat16; any shape) is flattened row-major and cut into blocks
  of ``block_size`` consecutive elements (a power of two in [64, 4096]; 256 and 2048 as in
  the paper); the last block may be shorter.
* ``absmax``: 1-D float32, one per block: ``max |x|`` over the block's elements (in float32).
* ``codes``: 1-D uint8, one per element: an index into the code map.
* The code map (``dynamic_map(signed)``): 256 float32 values, strictly increasing, in
  [-1, 1] (signed, for momentum / first moments) or [0, 1] (unsigned, for second moments).
  It is the dynamic tree of Dettmers et al. as bitsandbytes' ``create_dynamic_map`` builds
  it with 7 exponent bits: for ``i = 0 .. 6`` the midpoints of ``linspace(0.1, 1, n_i + 1)``
  (``n_i = 2**i`` signed, ``2**(i+1)`` unsigned) times ``10**(i - 6)``, their negatives
  (signed only), 0 and 1; computed in float64 and rounded to float32. Values span
  ``5.5e-7 .. 1`` in magnitude, with 2**i values per decade: small entries of a block keep
  their relative precision, unlike a linear 8-bit code (a linear code maps every entry
  below ``absmax / 254`` to 0).
* Quantize, per element (float32, IEEE round-to-nearest): ``v = x / absmax`` (``v = x / 1``
  where ``absmax == 0``, so an all-zero block is all zeros); ``code`` = the number of
  midpoints ``m_j = (map[j] + map[j+1]) / 2`` (float32) with ``m_j < v``: the nearest map
  value, ties to the lower one. One exception, unsigned map only: ``m_0 = 0``, so a
  positive value is never stored as 0 (values below 1.6e-7 of their block's absmax go up
  to the smallest positive entry, 3.25e-7). Adam divides by the square root of its second
  moment: a second moment rounded to 0 beside a non-zero first moment turns the update into
  ``m / eps``. Measured on the small CNN of bench_optim_state.py (MNIST-5k, Adam, one
  epoch) before this rule: 500 of 4,608 and 860 of 200,704 weights had a zero second
  moment code and a non-zero first moment code.
* Dequantize: ``y = map[code] * absmax`` (one float32 multiply), float32.
* Error: ``|y - x| <= absmax * g / 2`` (plus float32 rounding), ``g`` the gap between the
  two map values around ``x / absmax``; ``g <= 0.0141`` everywhere (top decade, signed map);
  below the unsigned map's smallest positive entry the error is at most that entry
  (``3.25e-7 * absmax``).
* Not finite in, not finite out: a block holding NaN or +-Inf has a non-finite ``absmax``
  and every one of its elements dequantizes to NaN or +-Inf (optimizer state is non-finite
  only when the parameters already are). The rule above still fixes every code (``v`` NaN
  has code 0: no midpoint is below NaN), so all implementations agree on such blocks too.
* Bytes: ``numel`` (codes) + ``4 * ceil(numel / block_size)`` (absmax):
  ``blockwise_nbytes``. At block 256 that is 1.0156 bytes per element against 4 in float32.

Implementations: ``"reference"`` (plain torch over the whole tensor; compares every element
with all 255 midpoints: it defines the format, for tests on small tensors), ``"fast"``
(vectorised torch on chunks of whole blocks with reused scratch buffers, any device: a
lookup table on the float's top bits gives the code up to one midpoint comparison) and
``"triton"`` (:mod:`.blockwise_triton`: one program per block, a binary search over the
midpoints; CUDA, or CPU under ``TRITON_INTERPRET=1``; ``impl="auto"`` takes it for CUDA
tensors). All give identical codes and absmax. The fast path's primitives ``quantize_into`` /
``dequantize_into`` work on a block-aligned slice, so an optimizer can dequantize, update
and requantize its state chunk by chunk with temporaries of one chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BLOCK_SIZES = tuple(2**k for k in range(6, 13))
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IMPLS = ("reference", "fast", "triton")
CHUNK_ELEMENTS = 1 << 15
"""Elements per chunk of the fast path (a multiple of every block size): the scratch is
12 bytes per element (384 KiB). Measured on the development machine (one thread, 8M float32
elements): quantize 0.71 GB/s, dequantize 1.5 GB/s of float32, against 2.5 GB/s for a copy
and 0.08 GB/s for ``torch.bucketize`` on the same values. With more threads than free cores
(the shared 2-core box under load) torch's per-block reductions of small chunks stall in
thread contention (10 ms instead of 4 us per call): measure with ``torch.set_num_threads(1)``
there."""

# Bits of the float32 pattern dropped to index the lookup table: 15 keeps the sign, the
# exponent and 8 mantissa bits, so a table entry spans a relative width of 2**-8 = 0.0039,
# less than the smallest relative gap between neighbouring map values (0.0070, at 1.0):
# at most one midpoint falls inside an entry (checked when the table is built).
_LUT_SHIFT = 15


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 float32 values of the code map (CPU), strictly increasing."""
    values = [0.0, 1.0]
    for i in range(7):
        count = 2**i if signed else 2 ** (i + 1)
        bounds = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float64)
        means = ((bounds[:-1] + bounds[1:]) / 2.0) * 10.0 ** (i - 6)
        values += means.tolist()
        if signed:
            values += (-means).tolist()
    table = torch.tensor(sorted(values), dtype=torch.float64).to(torch.float32)
    if table.numel() != 256 or not bool((table[1:] > table[:-1]).all()):
        raise AssertionError("the dynamic map must hold 256 strictly increasing values")
    return table


def _order_keys(bits: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered like the float32 values whose bit patterns are ``bits``."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


class _Tables:
    """Per (signed, device): the map, its midpoints and the lookup table of the fast path."""

    _cache: dict[tuple[bool, str], _Tables] = {}

    def __init__(self, signed: bool, device: torch.device):
        table = dynamic_map(signed)
        mid = (table[:-1] + table[1:]) / 2  # float32, as the format says
        if not signed:
            mid[0] = 0.0  # positive values never get the code of 0 (module docstring)
        low = int(_order_keys(torch.tensor([-1.0]).view(torch.int32))) >> _LUT_SHIFT
        high = int(_order_keys(torch.tensor([1.0]).view(torch.int32))) >> _LUT_SHIFT
        # the code of each entry's smallest value: midpoints strictly below it
        first_keys = torch.arange(low, high + 1, dtype=torch.int64) << _LUT_SHIFT
        first_bits = (first_keys ^ ((first_keys >> 31) & 0x7FFFFFFF)).to(torch.int32)
        first_values = first_bits.view(torch.float32)
        lut = torch.searchsorted(mid, first_values, right=False).to(torch.int32)
        # one entry past +1.0 for every key above it: only NaN (|x| <= absmax bounds v
        # otherwise), whose code is 0 as in the reference (no midpoint is < NaN)
        lut = torch.cat([lut, torch.zeros(1, dtype=torch.int32)])
        mid_buckets = (_order_keys(mid.view(torch.int32)) >> _LUT_SHIFT).tolist()
        if len(set(mid_buckets)) != len(mid_buckets):
            raise AssertionError("two midpoints share a lookup-table entry")
        self.table = table.to(device)
        self.mid = mid.to(device)
        # padded with +inf: the comparison after the top code never moves it
        self.mid_padded = torch.cat([mid, torch.tensor([math.inf])]).to(device)
        self.lut = lut.to(device)
        self.lut_low, self.lut_high = low, high

    @classmethod
    def get(cls, signed: bool, device: torch.device) -> _Tables:
        key = (bool(signed), str(device))
        if key not in cls._cache:
            cls._cache[key] = cls(bool(signed), device)
        return cls._cache[key]


@dataclass(frozen=True, eq=False)
class BlockwiseQuantized:
    """A tensor in the block-wise 8-bit format (see the module docstring).

    Attributes:
        codes: 1-D uint8, one code per element (flat, row-major).
        absmax: 1-D float32, one per block.
        shape: shape of the original tensor.
        dtype: dtype of the original tensor (dequantize returns float32).
        block_size: elements per block.
        signed: which code map (True: [-1, 1]; False: [0, 1]).
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    block_size: int
    signed: bool

    def nbytes(self) -> int:
        """Bytes of storage: codes plus absmax (``blockwise_nbytes``)."""
        return self.codes.numel() * self.codes.element_size() \
            + self.absmax.numel() * self.absmax.element_size()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def n_blocks(numel: int, block_size: int) -> int:
    return (numel + block_size - 1) // block_size


def blockwise_nbytes(numel: int, block_size: int) -> int:
    """Exact bytes of a quantized tensor of ``numel`` elements: codes + float32 absmax."""
    return numel + 4 * n_blocks(numel, block_size)


def check_block_size(block_size: int) -> int:
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"expected block_size one of {BLOCK_SIZES}; found {block_size!r}")
    return block_size


# ----------------------------------------------------------------------------- reference


def reference_quantize(x: torch.Tensor, block_size: int, signed: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """codes (uint8) and absmax (float32) of ``x``, straight from the format's definition."""
    tables = _Tables.get(signed, x.device)
    flat = x.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    nb = n_blocks(n, block_size)
    padded = torch.cat([flat, flat.new_zeros(nb * block_size - n)]).view(nb, block_size)
    absmax = padded.abs().amax(1) if n else flat.new_zeros(0)
    safe = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    v = (padded / safe[:, None]).reshape(-1)[:n]
    codes = (tables.mid[None, :] < v[:, None]).sum(1).to(torch.uint8)
    return codes, absmax


def reference_dequantize(codes: torch.Tensor, absmax: torch.Tensor, block_size: int,
                         signed: bool) -> torch.Tensor:
    """Flat float32 values of codes/absmax (the format's definition)."""
    tables = _Tables.get(signed, codes.device)
    scale = absmax.repeat_interleave(block_size)[: codes.numel()]
    return tables.table[codes.long()] * scale


# ----------------------------------------------------------------------------- fast path


class Workspace:
    """Scratch buffers of the fast path (one chunk), reused across calls on one device."""

    def __init__(self, device: torch.device | str = "cpu", chunk: int = CHUNK_ELEMENTS):
        self.device = torch.device(device)
        self.chunk = chunk
        self.values = torch.empty(chunk, dtype=torch.float32, device=self.device)
        self.keys = torch.empty(chunk, dtype=torch.int32, device=self.device)
        self.codes = torch.empty(chunk, dtype=torch.int32, device=self.device)

    def nbytes(self) -> int:
        return self.chunk * (4 + 4 + 4)


def _block_view(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(whole blocks as (nb, block_size), the tail as 1-D or None)."""
    whole = (x.numel() // block_size) * block_size
    head = x[:whole].view(-1, block_size)
    return head, (x[whole:] if whole < x.numel() else None)


def _absmax_into(x: torch.Tensor, absmax: torch.Tensor, block_size: int,
                 scratch: torch.Tensor) -> None:
    # |x| into scratch, then a max per block: 2 ms for 4M elements, where
    # torch.aminmax(dim=1) on the same chunks took 20-360 ms (measured on the 2-core box)
    magnitude = torch.abs(x, out=scratch)
    head, tail = _block_view(magnitude, block_size)
    if head.shape[0]:
        torch.amax(head, dim=1, out=absmax[: head.shape[0]])
    if tail is not None:
        absmax[-1] = tail.max()


def quantize_into(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, *,
                  block_size: int, signed: bool, workspace: Workspace | None = None) -> None:
    """Quantize a flat float32 slice that starts on a block boundary into ``codes``
    (uint8, same length) and ``absmax`` (float32, one per block of the slice)."""
    n = x.numel()
    if codes.numel() != n or absmax.numel() != n_blocks(n, block_size):
        raise ValueError(f"expected codes of {n} and absmax of {n_blocks(n, block_size)} "
                         f"elements; found {codes.numel()} and {absmax.numel()}")
    if x.dtype != torch.float32:
        raise TypeError(f"quantize_into expects float32; found {x.dtype}")
    tables = _Tables.get(signed, x.device)
    ws = workspace if workspace is not None and workspace.device == x.device \
        else Workspace(x.device, min(CHUNK_ELEMENTS, max(n, 1)))
    step = (ws.chunk // block_size) * block_size
    if step == 0:
        ws = Workspace(x.device, block_size)
        step = block_size
    for start in range(0, n, step):
        end = min(n, start + step)
        length = end - start
        first, last = start // block_size, n_blocks(end, block_size)
        xs, am = x[start:end], absmax[first:last]
        values = ws.values[:length]
        _absmax_into(xs, am, block_size, values)
        safe = torch.where(am == 0, 1.0, am)
        head, tail = _block_view(xs, block_size)
        head_out, tail_out = _block_view(values, block_size)
        if head.shape[0]:
            torch.div(head, safe[: head.shape[0], None], out=head_out)
        if tail is not None:
            torch.div(tail, safe[-1], out=tail_out)
        keys, code = ws.keys[:length], ws.codes[:length]
        bits = values.view(torch.int32)
        torch.bitwise_right_shift(bits, 31, out=keys)
        keys.bitwise_and_(0x7FFFFFFF).bitwise_xor_(bits).bitwise_right_shift_(_LUT_SHIFT)
        keys.sub_(tables.lut_low).clamp_(0, tables.lut_high - tables.lut_low + 1)
        torch.index_select(tables.lut, 0, keys, out=code)
        # keys is free again: reuse its memory for the midpoint above each candidate code
        mids = keys.view(torch.float32)
        torch.index_select(tables.mid_padded, 0, code, out=mids)
        # the comparison as int32 over values' own memory (each element read before it is
        # written): a bool result would make add_ allocate an int32 copy of the chunk
        above = values.view(torch.int32)
        torch.gt(values, mids, out=above)
        code.add_(above)
        codes[start:end].copy_(code)


def dequantize_into(codes: torch.Tensor, absmax: torch.Tensor, out: torch.Tensor, *,
                    block_size: int, signed: bool, workspace: Workspace | None = None) -> None:
    """Dequantize a block-aligned slice of codes into ``out`` (flat float32, same length)."""
    n = codes.numel()
    if out.numel() != n or absmax.numel() != n_blocks(n, block_size):
        raise ValueError(f"expected out of {n} and absmax of {n_blocks(n, block_size)} "
                         f"elements; found {out.numel()} and {absmax.numel()}")
    tables = _Tables.get(signed, codes.device)
    ws = workspace if workspace is not None and workspace.device == codes.device \
        else Workspace(codes.device, min(CHUNK_ELEMENTS, max(n, 1)))
    step = max(block_size, (ws.chunk // block_size) * block_size)
    if ws.chunk < step:
        ws = Workspace(codes.device, step)
    for start in range(0, n, step):
        end = min(n, start + step)
        index = ws.codes[: end - start]
        index.copy_(codes[start:end])
        ys = out[start:end]
        torch.index_select(tables.table, 0, index, out=ys)
        am = absmax[start // block_size: n_blocks(end, block_size)]
        head, tail = _block_view(ys, block_size)
        if head.shape[0]:
            head.mul_(am[: head.shape[0], None])
        if tail is not None:
            tail.mul_(am[-1])


# ----------------------------------------------------------------------------- public API


def _check_input(x: torch.Tensor, block_size: int, impl: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor; found {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"expected float32, float16 or bfloat16; found {x.dtype}")
    check_block_size(block_size)
    if impl not in ("auto", *IMPLS):
        raise ValueError(f"expected impl 'auto' or one of {IMPLS}; found {impl!r}")


def _use_triton(device: torch.device) -> bool:
    """impl='auto' takes Triton for CUDA tensors when it imports; the fast path otherwise."""
    if device.type != "cuda":
        return False
    from . import blockwise_triton

    return blockwise_triton.is_available()


def quantize_blockwise(x: torch.Tensor, *, block_size: int = 256, signed: bool = True,
                       impl: str = "auto") -> BlockwiseQuantized:
    """Quantize ``x`` into the block-wise 8-bit format (``impl``: auto = fast)."""
    _check_input(x, block_size, impl)
    if impl == "reference":
        codes, absmax = reference_quantize(x, block_size, signed)
    elif impl == "triton" or (impl == "auto" and _use_triton(x.device)):
        from . import blockwise_triton

        tables = _Tables.get(signed, x.device)
        codes, absmax = blockwise_triton.quantize(x.detach().reshape(-1).contiguous(),
                                                  block_size, tables.mid_padded)
    else:
        flat = x.detach().reshape(-1).to(torch.float32).contiguous()
        codes = torch.empty(flat.numel(), dtype=torch.uint8, device=x.device)
        absmax = torch.empty(n_blocks(flat.numel(), block_size), dtype=torch.float32,
                             device=x.device)
        quantize_into(flat, codes, absmax, block_size=block_size, signed=signed)
    return BlockwiseQuantized(codes=codes, absmax=absmax, shape=x.shape, dtype=x.dtype,
                              block_size=block_size, signed=bool(signed))


def dequantize_blockwise(q: BlockwiseQuantized, *, out: torch.Tensor | None = None,
                         impl: str = "auto") -> torch.Tensor:
    """float32 values of ``q`` in its original shape (written into ``out`` if given)."""
    if impl not in ("auto", *IMPLS):
        raise ValueError(f"expected impl 'auto' or one of {IMPLS}; found {impl!r}")
    if out is None:
        out = torch.empty(q.shape, dtype=torch.float32, device=q.codes.device)
    elif out.dtype != torch.float32 or out.numel() != q.numel or not out.is_contiguous():
        raise ValueError(f"expected out to be a contiguous float32 tensor of {q.numel} "
                         f"elements; found {out.dtype} {tuple(out.shape)}")
    flat = out.view(-1)
    if impl == "reference":
        flat.copy_(reference_dequantize(q.codes, q.absmax, q.block_size, q.signed))
    elif impl == "triton" or (impl == "auto" and _use_triton(q.codes.device)):
        from . import blockwise_triton

        blockwise_triton.dequantize(q.codes, q.absmax, _Tables.get(q.signed, q.codes.device)
                                    .table, q.block_size, flat)
    else:
        dequantize_into(q.codes, q.absmax, flat, block_size=q.block_size, signed=q.signed)
    return out
