"""ServingCache: a byte-bounded LRU of serving forms keyed by (task_id, version, sha256).

A request acquires a Lease on one version and holds it for its whole life: the entry is pinned (never
evicted) until the lease is released, and a hot swap only changes what the *next* acquire returns.
The current version of each task is memoised and moved by change events (`apply`), fed by a watch
thread (`start_watch`) or by the caller.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

import torch

from prompt_store.backends.base import ChangeEvent, Store
from prompt_store.errors import NotFound, StoreError
from prompt_store.lru import ByteLRU
from prompt_store.task_id import validate_task_id
from prompt_store.types import SUPPORTED_DTYPES, Artifact, Fingerprint, Limits, SoftPrompt
from prompt_store.validation import to_serving_form, validate_artifact

log = logging.getLogger(__name__)

# (task_id, version, sha256)
CacheKey = tuple[str, int, str]


@dataclass(frozen=True)
class _Served:
    prompt: SoftPrompt
    method: str


@dataclass
class Lease:
    """One pinned serving form; release it (or leave the `with` block) when the request is done."""

    task_id: str
    version: int
    sha256: str
    method: str
    prompt: SoftPrompt
    _release: Callable[[CacheKey], None] | None = field(default=None, repr=False)

    @property
    def key(self) -> CacheKey:
        return (self.task_id, self.version, self.sha256)

    def release(self) -> None:
        """Unpin the entry; later calls do nothing."""
        release, self._release = self._release, None
        if release is not None:
            release(self.key)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class ServingCache:
    """Serving forms of validated artifacts, bounded by `max_bytes` of tensor data."""

    def __init__(
        self,
        store: Store,
        base: Fingerprint | None,
        max_bytes: int,
        limits: Limits | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """`base`: artifacts must fit it (None skips the base check). `device`/`dtype`: where forms live."""
        self.store = store
        self.base = base
        self.limits = limits or Limits()
        self.device = device
        self.dtype = dtype
        self._lru: ByteLRU[CacheKey, _Served] = ByteLRU(max_bytes)
        self._current: dict[str, tuple[int, str | None]] = {}  # task -> (version, sha256 if known)
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- counters ----------------------------------------------------------------------------------------

    @property
    def hits(self) -> int:
        return self._hits

    @property
    def misses(self) -> int:
        return self._misses

    @property
    def evictions(self) -> int:
        return self._lru.evictions

    @property
    def bytes(self) -> int:
        return self._lru.bytes

    def __len__(self) -> int:
        return len(self._lru)

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "bytes": self.bytes,
            "entries": len(self),
            "tasks": len(self._current),
        }

    def resident_keys(self) -> list[CacheKey]:
        """Resident entries, least recently used first."""
        return self._lru.keys()

    def current(self, task_id: str) -> int | None:
        """The memoised current version of a task (None when not known yet)."""
        with self._lock:
            ref = self._current.get(task_id)
        return None if ref is None else ref[0]

    # ---- acquire -----------------------------------------------------------------------------------------

    def acquire(self, task_id: str, version: int | None = None) -> Lease:
        """Pin the serving form of the current (or a given) version; raises NotFound, ValidationError."""
        validate_task_id(task_id)
        if version is not None:
            return self._lease(task_id, version, self._known_sha(task_id, version))
        ref = self._resolve(task_id)
        try:
            return self._lease(task_id, *ref)
        except NotFound:
            self._forget(task_id, ref)  # deleted (and maybe re-created) without an event reaching us
            return self._lease(task_id, *self._resolve(task_id))

    def _resolve(self, task_id: str) -> tuple[int, str | None]:
        """The memoised current (version, sha256), asking the store on first use."""
        with self._lock:
            ref = self._current.get(task_id)
        if ref is not None:
            return ref
        info = self.store.info(task_id)  # NotFound propagates before anything is remembered
        with self._lock:
            # an event that arrived meanwhile is newer than our read: keep it
            return self._current.setdefault(task_id, (info.version, info.sha256 or None))

    def _known_sha(self, task_id: str, version: int) -> str | None:
        with self._lock:
            ref = self._current.get(task_id)
        if ref is not None and ref[0] == version and ref[1]:
            return ref[1]
        resident = self._lru.keys()  # a snapshot list
        for key in resident:
            if key[0] == task_id and key[1] == version:
                return key[2]
        return None

    def _lease(self, task_id: str, version: int, sha256: str | None) -> Lease:
        if sha256 is not None:
            key = (task_id, version, sha256)
            served = self._lru.get(key, pin=True)
            if served is not None:
                self._count(hit=True)
                return self._make_lease(key, served)
        self._count(hit=False)
        artifact = self.store.get(task_id, version)
        served = self._convert(artifact)
        key = (task_id, artifact.version, artifact.sha256)
        resident = self._lru.put(key, served, served.prompt.nbytes(), pin=True)
        return self._make_lease(key, resident)

    def _convert(self, artifact: Artifact) -> _Served:
        """Validate against the base model and build the serving form (on the target device)."""
        validate_artifact(artifact, self.base, self.limits)
        prompt = to_serving_form(artifact)
        if self.device is not None or self.dtype is not None:
            dtype = self.dtype or SUPPORTED_DTYPES[artifact.manifest.dtype]
            prompt = prompt.to(self.device or "cpu", dtype)
        return _Served(prompt=prompt, method=artifact.manifest.method)

    def _make_lease(self, key: CacheKey, served: _Served) -> Lease:
        task_id, version, sha256 = key
        return Lease(task_id, version, sha256, served.method, served.prompt, _release=self._lru.unpin)

    def _count(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self._hits += 1
            else:
                self._misses += 1

    # ---- change events -----------------------------------------------------------------------------------

    def apply(self, event: ChangeEvent) -> None:
        """Move the memoised current version of a task; unpinned entries of other versions are dropped."""
        with self._lock:
            if event.version == 0:
                self._current.pop(event.task_id, None)
            else:
                self._current[event.task_id] = (event.version, event.sha256 or None)
        resident = self._lru.keys()  # a snapshot list
        for key in resident:
            if key[0] == event.task_id and key[1] != event.version:
                self._lru.pop(key)  # no-op for pinned entries; they go after their last release

    def _forget(self, task_id: str, ref: tuple[int, str | None]) -> None:
        with self._lock:
            if self._current.get(task_id) == ref:
                del self._current[task_id]

    def start_watch(self, poll_interval: float = 1.0) -> None:
        """Follow store.watch() in a daemon thread, feeding apply(); restarts the watch after errors."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._watch_loop, args=(self._stop, poll_interval), name="serving-cache-watch", daemon=True
        )
        self._thread.start()

    def stop_watch(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _watch_loop(self, stop: threading.Event, poll_interval: float) -> None:
        while not stop.is_set():
            try:
                for event in self.store.watch(stop, poll_interval):
                    self.apply(event)
            except StoreError as exc:
                log.warning("store watch failed, retrying: %s", exc)
            except Exception:
                log.exception("store watch crashed, retrying")
            stop.wait(poll_interval)

    def __enter__(self) -> ServingCache:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.stop_watch()
