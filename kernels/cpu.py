"""Fast CPU implementation: a C++ extension (AVX2/F16C, ``at::parallel_for``).

Chosen over the alternatives measured on the development machine (2 cores, AVX2, 64 MB
float32 input, group mode, 256-element groups; ``copy_`` into a preallocated buffer ran at
~10-12 GB/s when the machine was quiet):

* eager vectorised torch (reference.py): quantize ~0.1-0.2 GB/s, dequantize ~0.3-0.7 GB/s;
  with preallocated buffers and in-place ops (and no NaN handling) quantize still < 1 GB/s;
* ``torch.compile`` (inductor, C++/OpenMP backend) of the same code: bit-identical, but
  quantize ~3.3 / 1.5 / 0.6 GB/s and dequantize into a preallocated ``out`` ~2.1 / 0.6 /
  1.1 GB/s at 8 / 4 / 2 bits (the bit packing defeats its vectorisation);
* this extension: quantize ~12-17 GB/s and dequantize ~15-20 GB/s at every width, i.e.
  at or above the copy bandwidth (quantize writes 1/4 .. 1/16 of what it reads).

The extension is compiled once with ``torch.utils.cpp_extension.load`` (needs a C++
compiler and ``ninja``; its functions are registered as ``torch.ops.<name>.*`` operators,
which needs far lighter headers than a pybind11 module: ~20 s of build instead of ~70 s)
and cached by torch in its extensions directory (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``) under a name that hashes source, flags, torch version and
the CPU's feature flags, so later processes load it in well under a second.  A one-line
progress message goes to stderr when a build actually runs.  Any failure (no compiler, no
ninja, compile error) emits one ``warnings.warn`` and the callers fall back to the reference
implementation.

Set ``FEDPLAN_KERNELS_NO_BUILD=1`` to make the CPU implementation unavailable (no build).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import tempfile
import threading
import warnings

import torch

from ._cpu_source import CPP_SOURCE, registration

NAME = "cpu"

_CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fno-math-errno"]
_LDFLAGS = ["-fopenmp"]
_lock = threading.Lock()
_state: dict = {"module": None, "failed": False}


def _cpu_signature() -> str:
    """The CPU's feature flags: the build uses -march=native, so a cache shared between
    machines (e.g. a network home directory) must not hand one CPU's binary to another."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _module_name() -> str:
    key = CPP_SOURCE + " ".join(_CFLAGS) + torch.__version__ + _cpu_signature()
    return "fedplan_quant_cpu_" + hashlib.sha256(key.encode()).hexdigest()[:16]


_prereq_cache: dict = {}


def _prerequisites_missing() -> str | None:
    """Why the extension cannot be built here (None if it can); checked once per process."""
    if "why" not in _prereq_cache:
        _prereq_cache["why"] = _check_prerequisites()
    return _prereq_cache["why"]


def _check_prerequisites() -> str | None:
    if os.environ.get("FEDPLAN_KERNELS_NO_BUILD") == "1":
        return "FEDPLAN_KERNELS_NO_BUILD=1 is set"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler found"
    try:
        from torch.utils.cpp_extension import is_ninja_available

        if not is_ninja_available():
            return "ninja is not installed (pip install ninja)"
    except Exception as e:  # pragma: no cover - very old torch
        return f"torch.utils.cpp_extension unusable: {e}"
    return None


def is_available() -> bool:
    """True unless the prerequisites are missing or the build already failed (no build)."""
    if _state["module"] is not None:
        return True
    return not _state["failed"] and _prerequisites_missing() is None


def _build_directory(name: str) -> str:
    try:  # torch's own per-extension cache directory (honours TORCH_EXTENSIONS_DIR)
        from torch.utils.cpp_extension import _get_build_directory

        path = _get_build_directory(name, verbose=False)
    except Exception:  # noqa: BLE001 - private helper moved or failed: use our own dir
        path = os.path.join(tempfile.gettempdir(), "fedplan_torch_extensions", name)
    os.makedirs(path, exist_ok=True)
    return path


def _build():
    from torch.utils.cpp_extension import load

    name = _module_name()
    build_dir = _build_directory(name)
    cached = os.path.exists(os.path.join(build_dir, name + ".so"))
    if not cached:
        print(
            "fedplan: compiling CPU quantization kernels (one-off, ~20-60 s)...",
            file=sys.stderr,
            flush=True,
        )
    src_path = os.path.join(build_dir, name + ".cpp")
    source = CPP_SOURCE + registration(name)
    if not os.path.exists(src_path) or open(src_path).read() != source:
        tmp = f"{src_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(source)
        os.replace(tmp, src_path)  # atomic: concurrent builders never see a partial file
    load(
        name=name,
        sources=[src_path],
        extra_cflags=_CFLAGS,
        extra_ldflags=_LDFLAGS,
        build_directory=build_dir,
        is_python_module=False,
        verbose=False,
    )
    return getattr(torch.ops, name)


def load():
    """The compiled operators (``torch.ops.<name>``), built on first use; None on failure."""
    if _state["module"] is not None or _state["failed"]:
        return _state["module"]
    with _lock:
        if _state["module"] is not None or _state["failed"]:
            return _state["module"]
        why = _prerequisites_missing()
        if why is None:
            try:
                _state["module"] = _build()
                return _state["module"]
            except Exception as e:  # noqa: BLE001 - any failure means "use the reference"
                why = f"{type(e).__name__}: {str(e).strip()[-2000:]}"
        _state["failed"] = True
        warnings.warn(
            "fedplan.kernels: the fast CPU quantization kernels are unavailable "
            f"({why}); falling back to the (slower) reference implementation.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


class _Backend:
    """Adapter from the backend interface (see reference.py) to the extension."""

    NAME = NAME

    def __init__(self, mod):
        self.mod = mod

    def group_quantize(self, x, bits, group_size, keys):
        k1, k2 = keys if keys is not None else (0, 0)
        codes, scale, zero, flags = self.mod.group_quantize(
            x, bits, group_size, keys is not None, k1, k2
        )
        return codes, scale, zero, int(flags)

    def group_dequantize(self, codes, scale, zero, bits, group_size, out):
        self.mod.group_dequantize(codes, scale, zero, bits, group_size, out)

    def channel_minmax(self, x3):
        mn, mx, bad = self.mod.channel_minmax(x3)
        return mn, mx, bool(bad)

    def channel_quantize(self, x3, bits_c, scale, zero, offsets, total_bytes, keys):
        k1, k2 = keys if keys is not None else (0, 0)
        return self.mod.channel_quantize(
            x3,
            bits_c.contiguous(),
            scale.contiguous(),
            zero.contiguous(),
            offsets.contiguous(),
            total_bytes,
            keys is not None,
            k1,
            k2,
        )

    def channel_dequantize(self, codes, bits_c, scale, zero, offsets, out3):
        self.mod.channel_dequantize(
            codes, bits_c.contiguous(), scale, zero, offsets.contiguous(), out3
        )


_backend_obj: dict = {}


def backend():
    """The CPU backend, or None (after a one-off warning) when the extension is unusable."""
    mod = load()
    if mod is None:
        return None
    be = _backend_obj.get(id(mod))
    if be is None:
        be = _backend_obj[id(mod)] = _Backend(mod)
    return be


__all__ = ["NAME", "backend", "is_available", "load"]
