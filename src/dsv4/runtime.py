"""Process tuning for the dsv4 commands: allocator tuning (``dsv4 ...`` calls it first; library users may call it
themselves). Atomic writes of files and directories are in ``dsv4.atomic``.

glibc's malloc hands every allocation above its mmap threshold (dynamic, at most 32 MiB) back to the kernel when it is
freed, and trims the heap top above 2x that; the next tensor of that size then page-faults all its memory again. On
the attention fast path (per-block logits, gathered top-k entries: tens of MiB each, allocated and freed thousands of
times) that zeroing costs more than the arithmetic. ``tune_allocator`` keeps such memory in the process: a 1 GiB mmap
threshold, no trimming, and 256 MiB of top padding. Peak memory is unchanged; freed memory is reused instead of
returned. A no-op where glibc's ``mallopt`` is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_done = False


def tune_allocator() -> bool:
    """Set glibc malloc's mmap threshold, trim threshold and top pad (once per process); True if applied."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # glibc builds that cap the mmap threshold at 32 MiB refuse 1 GiB: fall back to the cap
    mmap_ok = mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 or mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
    trim_ok = mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
    pad_ok = mallopt(_M_TOP_PAD, 256 << 20) == 1
    _done = mmap_ok and trim_ok and pad_ok
    return _done
