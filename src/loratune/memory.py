"""Process memory: its peak (for a run's summary) and giving freed heap memory back to the operating system.

Quantizing tensor by tensor interleaves long-lived results (packed weights of a few MB) with short-lived
temporaries of similar size on the C heap; glibc keeps the freed holes mapped, so resident memory creeps up
by hundreds of MB over a 7B load. ``malloc_trim`` returns those free pages. Training on a CPU shares one heap
arena between threads (``one_heap_arena``): memory freed by one thread is then reused by the next allocation of
any, where per-thread arenas each keep their own freed pages. Elsewhere (no glibc) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
from pathlib import Path

import torch


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def _malloc_trim():
    return getattr(_libc(), "malloc_trim", None)


_M_ARENA_MAX = -8  # glibc's mallopt parameter


def one_heap_arena() -> bool:
    """Make threads created from now on allocate from the heap arenas that exist (glibc ``mallopt(M_ARENA_MAX,
    1)``): freed memory is reused across threads instead of kept per thread. True when it took effect."""
    mallopt = getattr(_libc(), "mallopt", None)
    return bool(mallopt is not None and mallopt(_M_ARENA_MAX, 1))


def release_freed_memory() -> None:
    """Return free heap pages to the OS (glibc ``malloc_trim(0)``); a no-op where that is not available."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def reset_peak_memory() -> None:
    """Start measuring the peak afresh (several runs in one process, as in a sweep, each get their own): the
    CUDA allocator's peak, and on Linux the process's peak RSS (``/proc/self/clear_refs``)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux (or not allowed): the peak then covers the whole process


def peak_memory_mb() -> float:
    """The peak memory since ``reset_peak_memory``, MiB: the CUDA allocator's peak when training on a GPU, else
    the peak RSS (``VmHWM``; ``ru_maxrss``, the whole process's, where /proc is missing)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
