"""ServingCache: a byte-bounded LRU of serving forms keyed by (task_id, version, sha256).

A request acquires a Lease on one version and holds it for its whole life: the entry is pinned (never
evicted) until the lease is released, and a hot swap only changes what the *next* acquire returns.
The current version of each task is memoised and moved by change events (`apply`), fed by a watch
thread (`start_watch`) or by the caller.
"""

from __future__ import annotations

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
from prompt_store.types import SUPPORTED_DTYPES, Artifact, Fingerprint, Limits, TaskKey, TaskPrompt
from prompt_store.validation import to_serving_form, validate_artifact

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Lease:
    """A pin on one task version's `TaskPrompt` in the cache; release it (or leave the `with` block) when the
    request is done."""

    task: TaskPrompt
    _release: Callable[[TaskKey], None] | None = field(default=None, repr=False)

    @property
    def key(self) -> TaskKey:
        return self.task.key

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
        self._lru: ByteLRU[TaskKey, TaskPrompt] = ByteLRU(max_bytes)
        self._current: dict[str, tuple[int, str | None]] = {}  # task -> (version, sha256 if known)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # called from the watch thread with a task id when another writer replaced a task in use here
        self.on_new_version: Callable[[str], object] | None = None

    # ---- counters ----------------------------------------------------------------------------------------

    @property
    def lru(self) -> ByteLRU[TaskKey, TaskPrompt]:
        """The underlying LRU (read its counters; do not modify it)."""
        return self._lru

    @property
    def hits(self) -> int:
        return self._lru.hits

    @property
    def misses(self) -> int:
        return self._lru.misses

    @property
    def evictions(self) -> int:
        return self._lru.evictions

    @property
    def bytes(self) -> int:
        return self._lru.bytes

    def __len__(self) -> int:
        return len(self._lru)

    def stats(self) -> dict[str, int]:
        with self._lock:
            tasks = len(self._current)
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "bytes": self.bytes,
            "entries": len(self),
            "tasks": tasks,
        }

    def resident_keys(self) -> list[TaskKey]:
        """Resident entries, least recently used first."""
        return self._lru.keys()

    def pinned_versions(self, task_id: str) -> set[int]:
        """Versions of a task that a lease holds here (a running request): retention must keep them."""
        return {key[1] for key in self._lru.pinned() if key[0] == task_id}

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
            lease = self._lease(task_id, *ref)
        except NotFound:
            self._replace_memo(task_id, ref, None)  # deleted (maybe re-created) and no event reached us
            ref = self._resolve(task_id)
            lease = self._lease(task_id, *ref)
        if ref != (lease.task.version, lease.task.sha256):
            self._replace_memo(task_id, ref, (lease.task.version, lease.task.sha256))  # now the sha is known
        return lease

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
        """Pin (task, version, sha256), converting on a miss; an unknown sha256 is read from the store."""
        artifact = None
        if sha256 is None:
            artifact = self.store.get(task_id, version)
            sha256 = artifact.sha256
        key = (task_id, version, sha256)
        served = self._lru.get(key, pin=True)
        if served is not None:
            return self._make_lease(served)
        if artifact is None:
            artifact = self.store.get(task_id, version)
        key = (task_id, artifact.version, artifact.sha256)  # the memo's sha may be stale (re-created task)
        served = self._convert(artifact)
        resident = self._lru.put(key, served, served.prompt.nbytes(), pin=True)
        return self._make_lease(resident)

    def _convert(self, artifact: Artifact) -> TaskPrompt:
        """Validate against the base model and build the serving form (on the target device)."""
        validate_artifact(artifact, self.base, self.limits)
        prompt = to_serving_form(artifact)
        if self.device is not None or self.dtype is not None:
            dtype = self.dtype or SUPPORTED_DTYPES[artifact.manifest.dtype]
            prompt = prompt.to(self.device or "cpu", dtype)
        m = artifact.manifest
        return TaskPrompt(artifact.task_id, artifact.version, m.sha256, m.method, prompt, m.input_format)

    def _make_lease(self, task: TaskPrompt) -> Lease:
        return Lease(task, _release=self._lru.unpin)

    # ---- change events -----------------------------------------------------------------------------------

    def apply(self, event: ChangeEvent) -> bool:
        """Move the memoised current version of a task; unpinned entries of other versions are dropped.

        An event older than the memo is either stale (a poll read just before a newer put, or this
        replica's own upload reported after another replica's) or a delete + re-create whose delete
        was missed; the store decides which. Returns whether a resident older version was replaced (the
        task is in use: worth loading the new version ahead of its first request).
        """
        with self._lock:
            ref = self._current.get(event.task_id)
            in_order = event.version == 0 or ref is None or event.version >= ref[0]
            if in_order:
                self._set_memo(event)
        if not in_order:
            confirmed = self._confirm(event.task_id)
            if confirmed is None:
                return False  # the store cannot tell right now: keep the memo
            with self._lock:
                if self._current.get(event.task_id) != ref:
                    return False  # moved meanwhile by a newer event: it wins
                self._set_memo(confirmed)
            event = confirmed
        replaced = False
        resident = self._lru.keys()  # a snapshot list
        for key in resident:
            if key[0] == event.task_id and key[1] != event.version:
                replaced = True
                self._lru.pop(key)  # no-op for pinned entries; they go after their last release
        return replaced and event.version != 0

    def _set_memo(self, event: ChangeEvent) -> None:
        """Record an event in the memo (caller holds the lock)."""
        if event.version == 0:
            self._current.pop(event.task_id, None)
        else:
            self._current[event.task_id] = (event.version, event.sha256 or None)

    def _confirm(self, task_id: str) -> ChangeEvent | None:
        """The store's current pointer of a task as an event (version 0 when gone; None on failure)."""
        try:
            info = self.store.info(task_id)
        except NotFound:
            return ChangeEvent(task_id, 0, "")
        except StoreError as exc:
            log.warning("could not confirm an out-of-order event for %r: %s", task_id, exc)
            return None
        return ChangeEvent(task_id, info.version, info.sha256)

    def _replace_memo(
        self, task_id: str, expected: tuple[int, str | None], new: tuple[int, str | None] | None
    ) -> None:
        """Compare-and-set of one memo entry (an event applied meanwhile wins)."""
        with self._lock:
            if self._current.get(task_id) != expected:
                return
            if new is None:
                del self._current[task_id]
            else:
                self._current[task_id] = new

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
                    if self.apply(event) and self.on_new_version is not None:
                        self._notify(event.task_id)
            except StoreError as exc:
                log.warning("store watch failed, retrying: %s", exc)
            except Exception:
                log.exception("store watch crashed, retrying")
            stop.wait(poll_interval)

    def _notify(self, task_id: str) -> None:
        assert self.on_new_version is not None
        try:
            self.on_new_version(task_id)
        except Exception:
            log.exception("on_new_version(%r) failed", task_id)

    def __enter__(self) -> ServingCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_watch()
