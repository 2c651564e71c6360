"""The engine's inbox: requests waiting for a batch slot, and task prefixes to build ahead of need.

One condition variable guards both; the engine thread waits on it when there is nothing to do. The engine
decides how much room there is (it knows the batch); this module keeps the order, drops requests whose
client gave up or whose deadline passed, and refuses new ones once closed.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from prompt_store import TaskPrompt
from server.requests import GenerationRequest, TokenEvent

Deliver = Callable[[TokenEvent], None]
WarmJob = tuple[TaskPrompt, Callable[[bool], None]]  # (task, done(ok))
Dropped = list[tuple["Pending", str]]  # (request, finish reason)


class QueueFull(Exception):
    """Too many requests are waiting; the caller should retry later."""


class EngineStopped(QueueFull):
    """The engine is stopping or stopped and takes no new requests."""


@dataclass
class Pending:
    """A request and where its events go, from submission until it leaves the engine."""

    req: GenerationRequest
    deliver: Deliver
    submitted: float = field(default_factory=time.monotonic)


def leave_reason(req: GenerationRequest, now: float) -> str | None:
    """Why a request must leave now (cancelled by its client, or past its deadline), or None."""
    if req.cancelled.is_set():
        return "cancelled"
    if req.deadline is not None and now >= req.deadline:
        return "timeout"
    return None


class WaitingQueue:
    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.cv = threading.Condition()
        self.accepting = True
        self._items: deque[Pending] = deque()
        self._warm: list[WarmJob] = []

    def __len__(self) -> int:
        return len(self._items)

    def has_work(self) -> bool:
        """Anything for the engine thread to do (caller holds `cv`)."""
        return bool(self._items or self._warm)

    def put(self, pending: Pending, room: Callable[[], int]) -> Dropped:
        """Append, or raise EngineStopped / QueueFull when `room()` waiting requests are already there.

        Abandoned requests are dropped first when the queue looks full; they are returned, and the caller
        delivers their final events outside the lock.
        """
        dropped: Dropped = []
        with self.cv:
            if not self.accepting:
                raise EngineStopped("the engine is shutting down")
            if len(self._items) >= room():
                dropped = self._drop_abandoned(time.monotonic())
            if len(self._items) >= room():
                raise QueueFull(f"{len(self._items)} requests are waiting (limit {self.max_queue})")
            self._items.append(pending)
            self.cv.notify_all()
        return dropped

    def take(self, free: int, now: float) -> tuple[list[Pending], Dropped]:
        """Up to `free` requests, oldest first, and the abandoned ones that left meanwhile."""
        with self.cv:
            dropped = self._drop_abandoned(now)
            taken = [self._items.popleft() for _ in range(min(max(free, 0), len(self._items)))]
        return taken, dropped

    def _drop_abandoned(self, now: float) -> Dropped:
        """Cancelled and past-deadline requests leave now (caller holds `cv`): a client that gave up does
        not hold a slot until the next step."""
        dropped = [(p, r) for p in self._items if (r := leave_reason(p.req, now)) is not None]
        if dropped:
            gone = {id(p) for p, _ in dropped}
            self._items = deque(p for p in self._items if id(p) not in gone)
        return dropped

    def requests(self) -> list[GenerationRequest]:
        with self.cv:
            return [p.req for p in self._items]

    def add_warm(self, job: WarmJob) -> bool:
        """Queue a prefix to build at the next step; False once closed."""
        with self.cv:
            if not self.accepting:
                return False
            self._warm.append(job)
            self.cv.notify_all()
            return True

    def take_warm(self) -> list[WarmJob]:
        with self.cv:
            jobs, self._warm = self._warm, []
        return jobs

    def close(self) -> None:
        """Take nothing new from now on (wakes the engine thread)."""
        with self.cv:
            self.accepting = False
            self.cv.notify_all()

    def clear(self) -> tuple[list[Pending], list[WarmJob]]:
        """Everything still waiting, removed (to be finished by the caller)."""
        with self.cv:
            items, self._items = list(self._items), deque()
            warm, self._warm = self._warm, []
        return items, warm
