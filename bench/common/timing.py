"""Timing instrumentation: seconds per named call, a store that times its reads, wrapped methods."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prompt_store.backends import Store
from prompt_store.backends.base import ChangeEvent, TaskInfo
from prompt_store.types import Artifact


@dataclass
class Timers:
    """Seconds spent in instrumented calls since the last reset."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, dt: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + dt
        self.calls[name] = self.calls.get(name, 0) + 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def get(self, name: str) -> float:
        return self.seconds.get(name, 0.0)


class TimedStore(Store):
    """Delegates to a real store and times get() and info() (what a cache miss pays for the store)."""

    def __init__(self, inner: Store, timers: Timers) -> None:
        self.inner = inner
        self.timers = timers

    def put(self, artifact: Artifact) -> int:
        return self.inner.put(artifact)

    def get(self, task_id: str, version: int | None = None) -> Artifact:
        t = time.perf_counter()
        try:
            return self.inner.get(task_id, version)
        finally:
            self.timers.add("store", time.perf_counter() - t)

    def info(self, task_id: str) -> TaskInfo:
        t = time.perf_counter()
        try:
            return self.inner.info(task_id)
        finally:
            self.timers.add("store", time.perf_counter() - t)

    def list(self) -> list[TaskInfo]:
        return self.inner.list()

    def delete(self, task_id: str) -> None:
        self.inner.delete(task_id)

    def watch(self, stop: object | None = None, poll_interval: float = 1.0) -> Iterator[ChangeEvent]:
        return self.inner.watch(stop, poll_interval)

    def ping(self) -> None:
        self.inner.ping()

    def close(self) -> None:
        self.inner.close()


def time_calls(obj: Any, method: str, name: str, timers: Timers, sync: Callable[[], None]) -> None:
    """Time every call of obj.method (an instance attribute wraps the bound method) under `name`."""
    inner = getattr(obj, method)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        out = inner(*args, **kwargs)
        sync()
        timers.add(name, time.perf_counter() - t)
        return out

    setattr(obj, method, timed)
