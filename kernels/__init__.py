"""Activation-quantization kernels: one API over several implementations.

>>> from fedplan.kernels import quantize, dequantize
>>> p = quantize(x, bits=4, group_size=128)          # Packed
>>> y = dequantize(p)                                 # same shape / dtype as x

Implementations (``impl=``): "reference" (eager torch, defines the format: see
:mod:`fedplan.kernels.reference`), "cpu" (a C++/AVX2 extension built on first use) and
"triton" (CUDA tensors; runs on CPU tensors under ``TRITON_INTERPRET=1``).  All produce
bit-identical packed data.
"""

from ._common import Packed
from .api import available_impls, dequantize, quantize

__all__ = ["Packed", "available_impls", "dequantize", "quantize"]
