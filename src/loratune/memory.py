"""Giving freed heap memory back to the operating system while a model streams in.

Quantizing tensor by tensor interleaves long-lived results (packed weights of a few MB) with short-lived
temporaries of similar size on the C heap; glibc keeps the freed holes mapped, so resident memory creeps up
by hundreds of MB over a 7B load. ``malloc_trim`` returns those free pages. Elsewhere (no glibc) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Return free heap pages to the OS (glibc ``malloc_trim(0)``); a no-op where that is not available."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
