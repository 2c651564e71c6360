"""Give freed host memory back to the OS after cache evictions (glibc keeps freed blocks otherwise).

Evicted serving forms and KV prefixes are freed by Python, but glibc malloc keeps most of that memory in its
arenas, so the process RSS keeps the high-water mark of everything ever loaded even though the caches are
bounded (bench/scale_tasks.py: RSS +120-180 MiB over 1000 tasks with 80 MiB of cache bounds; malloc_trim
brought it below the starting RSS). `MemoryTrimmer` calls malloc_trim(0) after evictions, at most once per
`min_interval_s`; on other C libraries it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable

log = logging.getLogger("softserve.memory")


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim  # type: ignore[no-any-return]


class MemoryTrimmer:
    def __init__(self, min_interval_s: float = 5.0) -> None:
        self.min_interval_s = min_interval_s
        self.trims = 0
        self._trim = _load_malloc_trim()
        self._seen_evictions = 0
        self._last = float("-inf")

    @property
    def available(self) -> bool:
        return self._trim is not None

    def after_evictions(self, evictions: int) -> bool:
        """`evictions`: a running count. Trims when it grew and the interval has passed; True if it did."""
        if self._trim is None or evictions <= self._seen_evictions:
            return False
        now = time.monotonic()
        if now - self._last < self.min_interval_s:
            return False
        self._seen_evictions, self._last = evictions, now
        self._trim(0)
        self.trims += 1
        log.debug("malloc_trim after %d evictions", evictions)
        return True
