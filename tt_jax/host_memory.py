"""Handing freed host memory back to the system, where the C allocator would keep it.

glibc keeps freed blocks below its mmap threshold (most unpickled arrays, most parameter arrays
of a CPU run) resident for reuse, often in per-thread arenas that later allocations do not reach:
a loader that frees as it converts, or a recipe that runs one model after another, would
otherwise keep every freed byte counted in its resident memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from typing import Any, Optional

import jax


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Any]:
    """glibc's malloc_trim, or None elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def return_freed_memory() -> None:
    """Asks glibc to return its free heap pages to the system (nothing elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def release_finished_run() -> None:
    """Frees what a finished training run left behind before the next one starts: unreachable
    Python objects, the compiled programs of its models (the next run compiles its own, from the
    persistent compilation cache where one is set), and the allocator's free pages."""
    gc.collect()
    jax.clear_caches()
    return_freed_memory()
