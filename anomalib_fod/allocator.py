"""Opt-in glibc allocator setting for CPU training; nothing in the plugin applies it any more.

FOD used to materialise ``8 x 1024 x 1024``-float (32 MiB) correlation maps per image at 256x256.
glibc serves blocks that large with ``mmap`` and unmaps them on ``free``, so each new map
page-faulted its memory in again, and raising glibc's mmap and trim thresholds (this function)
made a training step 2-4x faster. Since the attention runs in cache-sized query blocks
(``models/fod/blocked_attention.py``) no tensor is that large and the setting makes no measurable
difference (``benchmarks/research/allocator.py``, figures in ``benchmarks/results/memory.md``). It stays for
measuring that, and for a user whose own process allocates such blocks; it changes the allocator
of the whole process, so only call it in a process you own. The standard switches do the same:
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``, or jemalloc or tcmalloc through ``LD_PRELOAD``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

# mallopt parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_applied = False


def keep_freed_memory_on_cpu(threshold_bytes: int = 1 << 30) -> bool:
    """Raise glibc's mmap and trim thresholds so freed large blocks are reused, once per process.

    The process keeps its peak memory instead of shrinking. The kept memory is handed back
    (``malloc_trim``) right before every ``fork``: a data-loader worker forked from a process
    holding gigabytes of freed maps would share those pages copy-on-write, and every later step of
    the parent would copy them (that doubled a benchmark cell's memory until the OOM killer
    stopped it).

    Args:
        threshold_bytes: blocks below this size come from the heap and stay there when freed.

    Returns:
        Whether the setting is in effect (``False`` off Linux/glibc).
    """
    global _applied  # noqa: PLW0603 - a process-wide setting, applied once by an entry point
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    applied = bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold_bytes))
    if applied and hasattr(libc, "malloc_trim"):
        trim = libc.malloc_trim
        os.register_at_fork(before=lambda: trim(0))
    if applied:
        logger.info("glibc malloc: mmap/trim thresholds raised to %d bytes for FOD's large maps", threshold_bytes)
    _applied = applied
    return applied
