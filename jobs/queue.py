"""The job queue: huey, on SQLite beside a disk store (embedded default) or on the store's Redis.

Messages are JSON (huey's default serializer is pickle; a queue shared by machines never unpickles). A
message only carries the job id: the job record (jobs.backend) is the truth about a job, the queue only
says which worker takes it next. Huey hands a message to one consumer, which deletes it on receipt: a
worker killed mid-job loses the message, and the job's heartbeat timeout (jobs.records.reap) fails it.
"""

from __future__ import annotations

import json
from typing import Any

from huey import Huey, RedisHuey, SqliteHuey
from huey.registry import Message
from huey.serializer import Serializer

from jobs.backend import REDIS_PREFIX, disk_root, ensure_dir, is_redis
from prompt_store.backends.redis_store import Keys

TASK_NAME = "softserve.fine_tune"
_FIELDS = ("id", "name", "retries", "retry_delay", "priority", "args", "kwargs", "timeout", "retry_backoff")


class JsonSerializer(Serializer):  # type: ignore[misc]
    """Huey messages as JSON: only the plain fields a fine-tuning message uses (no eta, no callbacks)."""

    def _serialize(self, data: Any) -> bytes:
        if not isinstance(data, Message):
            raise TypeError(f"only task messages are queued, not {type(data).__name__}")
        if data.eta is not None or data.on_complete is not None or data.on_error is not None:
            raise TypeError("scheduled tasks and callbacks are not used by the job queue")
        return json.dumps({k: getattr(data, k) for k in _FIELDS}).encode()

    def _deserialize(self, data: bytes) -> Any:
        fields = json.loads(data)
        fields["args"] = tuple(fields.get("args") or ())
        return Message(**{k: fields.get(k) for k in _FIELDS})


def make_huey(store_spec: str) -> Huey:
    """The queue for a store spec: RedisHuey on the same Redis, else SqliteHuey in the store's folder."""
    options: dict[str, Any] = {"results": False, "utc": True, "serializer": JsonSerializer()}
    if is_redis(store_spec):
        return RedisHuey(Keys(REDIS_PREFIX).queue, url=store_spec, **options)
    folder = ensure_dir(disk_root(store_spec) / "jobs")
    return SqliteHuey("softserve-jobs", filename=str(folder / "queue.sqlite3"), **options)


def register(huey: Huey, run: Any) -> Any:
    """The fine-tuning task on `huey`: `run(job_id)` in the worker, an enqueue call in the server. Huey
    names a task by its function's module and `name`: both sides register it from here."""

    def fine_tune(job_id: str) -> None:
        run(job_id)

    return huey.task(name=TASK_NAME)(fine_tune)


def _enqueue_only(job_id: str) -> None:  # pragma: no cover - runs in the worker, never in the server
    raise RuntimeError("the server only enqueues fine-tuning jobs; `jobs.worker` runs them")


class JobQueue:
    """The server's side of the queue: enqueue a job id."""

    def __init__(self, store_spec: str) -> None:
        self.huey = make_huey(store_spec)
        self._task = register(self.huey, _enqueue_only)

    def enqueue(self, job_id: str) -> None:
        self._task(job_id)

    def pending(self) -> int:
        return int(self.huey.pending_count())
