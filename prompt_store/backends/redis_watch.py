"""RedisStore.watch(): pub/sub for speed plus a poll of every pointer, so a lost message still converges."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import redis
from redis.client import PubSub

from prompt_store.backends.base import ChangeEvent
from prompt_store.backends.common import Pointer, pointer_changes
from prompt_store.errors import InvalidTaskId
from prompt_store.task_id import validate_task_id

if TYPE_CHECKING:
    from prompt_store.backends.redis_store import RedisStore

log = logging.getLogger(__name__)

MAX_WAIT_S = 0.2  # longest block on the subscription, so `stop` is noticed quickly


def text(value: bytes | str | None) -> str:
    """A Redis reply (bytes) as str."""
    return value.decode() if isinstance(value, bytes) else (value or "")


def decode_pointer(raw: dict[Any, Any]) -> Pointer | None:
    """Decode HGETALL of a current pointer ({} when missing)."""
    fields = {text(k): text(v) for k, v in raw.items()}
    if not fields.get("version", "").isdigit():
        return None
    return int(fields["version"]), fields.get("sha256", "")


class RedisWatch:
    """One watch() iteration: its own subscription connection and its own view of the pointers.

    `seen` is what was last reported per task. A pub/sub message only ever moves a task forward (it
    may be older than what a poll already saw); a poll is the truth and may move a task anywhere
    (deleted and re-created while messages were lost: a 0 comes first, see pointer_changes).
    """

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.seen: dict[str, Pointer] = {}

    def events(self, stop: threading.Event, poll_interval: float) -> Iterator[ChangeEvent]:
        """Yield change events until `stop` is set; Redis outages are logged and retried."""
        subscription = self._subscribe()  # before the baseline: nothing falls in between
        self.seen = self._poll() or {}
        next_poll = time.monotonic() + poll_interval
        try:
            while not stop.is_set():
                wait = max(0.0, min(next_poll - time.monotonic(), MAX_WAIT_S))
                if subscription is None:
                    stop.wait(wait)
                else:
                    message, subscription = self._next_message(subscription, wait)
                    if message is not None and self._is_news(message):
                        yield message
                if time.monotonic() >= next_poll and not stop.is_set():
                    next_poll = time.monotonic() + poll_interval
                    if subscription is None:
                        subscription = self._subscribe()
                    yield from self._poll_changes()
        finally:
            if subscription is not None:
                subscription.close()

    def _poll(self) -> dict[str, Pointer] | None:
        """Every task's current pointer, or None when Redis cannot be reached."""
        client, keys = self.store.client, self.store.keys
        try:
            task_ids = sorted(text(m) for m in client.smembers(keys.tasks))
            with client.pipeline(transaction=False) as pipe:
                for task_id in task_ids:
                    pipe.hgetall(keys.current(task_id))
                raw = pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("redis store poll failed: %s", exc)
            return None
        pointers = {task_id: decode_pointer(fields) for task_id, fields in zip(task_ids, raw, strict=True)}
        return {task_id: p for task_id, p in pointers.items() if p is not None}

    def _poll_changes(self) -> list[ChangeEvent]:
        """Events that bring `seen` up to date with a fresh poll."""
        fresh = self._poll()
        if fresh is None:
            return []
        changes = pointer_changes(self.seen, fresh)
        self.seen = fresh
        return changes

    def _is_news(self, message: ChangeEvent) -> bool:
        """Dedupe a pub/sub event against what was already reported for its task (updating `seen`)."""
        known = self.seen.get(message.task_id)
        if message.version == 0:  # always passed on: the task may be unknown here, not to the consumer
            self.seen.pop(message.task_id, None)
            return True
        if known is not None and message.version <= known[0]:
            return False
        self.seen[message.task_id] = (message.version, message.sha256)
        return True

    def _subscribe(self) -> PubSub | None:
        """A subscription on its own connection, or None (pub/sub disabled or Redis unreachable)."""
        if not self.store.use_pubsub:
            return None
        subscription = self.store.client.pubsub(ignore_subscribe_messages=True)
        try:
            subscription.subscribe(self.store.keys.events)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("redis store subscribe failed: %s", exc)
            subscription.close()
            return None
        return subscription

    def _next_message(self, subscription: PubSub, timeout: float) -> tuple[ChangeEvent | None, PubSub | None]:
        """Wait up to `timeout` for one event; a broken subscription is dropped (the poll resubscribes)."""
        try:
            raw = subscription.get_message(timeout=timeout)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            log.warning("redis store subscription lost: %s", exc)
            subscription.close()
            time.sleep(min(timeout, 0.05))
            return None, None
        if raw is None or raw.get("type") != "message":
            return None, subscription
        return decode_event(raw.get("data")), subscription


def decode_event(data: Any) -> ChangeEvent | None:
    """A ChangeEvent from a pub/sub payload, or None (logged) when it is malformed."""
    try:
        body = json.loads(data)
        event = ChangeEvent(validate_task_id(body["task_id"]), int(body["version"]), str(body["sha256"]))
    except (ValueError, KeyError, TypeError, InvalidTaskId):
        log.warning("ignoring malformed store event %r", data)
        return None
    return event if event.version >= 0 else None
