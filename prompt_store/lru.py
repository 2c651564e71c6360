"""A thread-safe, byte-bounded LRU with pinning: pinned entries are never evicted until released."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass
class _Entry(Generic[V]):
    value: V
    nbytes: int
    pins: int = 0


class ByteLRU(Generic[K, V]):
    """Least-recently-used map bounded by the sum of entry sizes in bytes.

    `pin`/`unpin` count readers; a pinned entry stays resident (the bound may be exceeded while every
    resident entry is pinned). An entry larger than the whole bound is still admitted alone.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.inserts = 0  # new entries put (a value built on a miss)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def get(self, key: K, pin: bool = False) -> V | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            if pin:
                entry.pins += 1
            return entry.value

    def put(self, key: K, value: V, nbytes: int, pin: bool = False) -> V:
        """Insert (or keep the existing value for) key; returns the resident value."""
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                entry = _Entry(value, nbytes)
                self._items[key] = entry
                self.bytes += nbytes
                self.inserts += 1
            self._items.move_to_end(key)
            if pin:
                entry.pins += 1
            self._evict(keep=key)
            return entry.value

    def unpin(self, key: K) -> None:
        with self._lock:
            entry = self._items.get(key)
            if entry is not None and entry.pins > 0:
                entry.pins -= 1
            self._evict(keep=None)

    def pop(self, key: K) -> None:
        """Drop key unless pinned (a pinned entry is dropped at its last unpin via normal eviction)."""
        with self._lock:
            entry = self._items.get(key)
            if entry is not None and entry.pins == 0:
                del self._items[key]
                self.bytes -= entry.nbytes

    def keys(self) -> list[K]:
        with self._lock:
            return list(self._items)

    def pinned(self) -> list[K]:
        """Keys with at least one reader holding them."""
        with self._lock:
            return [key for key, entry in self._items.items() if entry.pins]

    def _evict(self, keep: K | None) -> None:
        if self.bytes <= self.max_bytes:
            return
        for key in list(self._items):
            if self.bytes <= self.max_bytes:
                break
            entry = self._items[key]
            if entry.pins or key == keep:
                continue
            del self._items[key]
            self.bytes -= entry.nbytes
            self.evictions += 1
