"""Helpers around ``torch.profiler`` memory events, shared by the cost model and runtime.

The profiler's native layers print bookkeeping lines on stderr at every start and stop
(kineto's ``USDT ... profiler_start``) and a warning about blocks allocated before it
started; neither says anything to a fedplan user, so ``memory_profile`` filters exactly
those lines out and passes everything else through.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import sys
import tempfile
from collections.abc import Iterator

from torch.profiler import ProfilerActivity, profile

_NOISE = re.compile(
    r"^(USDT:.*SyncActivityProfilerHandler.*profiler_(start|stop)"
    r"|\[W.*CPUAllocator.*Memory block of unknown size.*"
    r"|STAGE:.*ActivityProfilerController.*)$")


@contextlib.contextmanager
def _filtered_native_stderr() -> Iterator[None]:
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (embedded interpreters)
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines():
                if line and not _NOISE.match(line):
                    print(line, file=sys.stderr)


@contextlib.contextmanager
def memory_profile() -> Iterator[profile]:
    """``torch.profiler.profile(profile_memory=True)`` on the CPU, without the noise.

    Python's cyclic collector is paused inside: the profiler records the frees of tensors
    allocated before it started, so a collection in the middle (an earlier model's
    reference cycles, say) lowered the measured peak by what it freed (100 KB on a Llama
    step measured after the runtime tests, 31 % of its peak). No collection before either:
    in a long process a full one cost more than the steps it measured."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        with _filtered_native_stderr():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                yield prof
    finally:
        if enabled:
            gc.enable()


def memory_deltas(prof: profile) -> list[tuple[int, int]]:
    """(time ns, bytes) of every allocation (+) and free (-), in time order."""
    return sorted((event.start_ns(), event.nbytes())
                  for event in prof.profiler.kineto_results.events()
                  if event.name() == "[memory]")


def peak_allocated(prof: profile) -> int:
    """The highest level of bytes allocated above the level when profiling started."""
    level = peak = 0
    for _, delta in memory_deltas(prof):
        level += delta
        peak = max(peak, level)
    return peak
