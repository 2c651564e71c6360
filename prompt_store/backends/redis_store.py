"""RedisStore: artifacts shared by every replica through one Redis.

Per task (key names are built only in `Keys`):

    {p}:task:{id}:blob:{sha}     the safetensors bytes (manifest.version 0), deduplicated by tensor sha256
    {p}:task:{id}:blobs          set of the task's blob shas (so delete finds them)
    {p}:task:{id}:manifest:{N}   JSON manifest of version N (immutable)
    {p}:task:{id}:versions       set of version numbers
    {p}:task:{id}:seq            version counter (INCR)
    {p}:task:{id}:current        hash {version, sha256}: the current pointer
    {p}:tasks                    set of task ids with a current pointer
    {p}:events                   pub/sub channel: {"task_id", "version", "sha256"} (version 0 = deleted)

Fine-tuning (jobs/backend.py): {p}:files, {p}:file:{id}, {p}:jobs, {p}:jobs:seq, {p}:job:{id}[:events]; the
huey queue `{p}.jobs`.

A put WATCHes the task's counter and pointer, takes the next number, checks the blob and the manifest in
exactly their stored form, then in one MULTI/EXEC sets the counter, writes blob + manifest and runs a Lua
compare-and-set that moves the pointer only forward and PUBLISHes the change: readers only ever see
complete versions, and a put that fails (refused, Redis out of memory, a concurrent delete it lost to)
writes nothing and burns no number. Retention and crash clean-up live in redis_retention.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
from collections.abc import Collection, Iterator
from typing import cast

import redis
from redis.backoff import ExponentialBackoff
from redis.client import Pipeline
from redis.exceptions import OutOfMemoryError  # type: ignore[attr-defined]  # stubs predate it
from redis.retry import Retry

from prompt_store.artifact import METADATA_KEY, from_bytes, parse_manifest
from prompt_store.backends import redis_retention
from prompt_store.backends.base import ChangeEvent, Store, TaskInfo
from prompt_store.backends.common import check_artifact, stop_event, stored_bytes, stored_manifest
from prompt_store.backends.redis_watch import RedisWatch, decode_pointer, text
from prompt_store.errors import (
    ArtifactFormatError,
    InvalidTaskId,
    NotFound,
    StoreError,
    StoreFull,
    StoreUnavailable,
)
from prompt_store.task_id import validate_task_id
from prompt_store.types import Artifact, Limits

log = logging.getLogger(__name__)

MIN_FREE_BYTES = 64 * 1024  # with less headroom under maxmemory the store reports itself not writable

# KEYS: current, tasks, seq. ARGV: version, sha256, task_id, event JSON, channel.
# Returns 1 when the pointer moved to ARGV[1], 0 when an equal or newer version is already current.
_SET_CURRENT_LUA = """
local v = tonumber(ARGV[1])
local seq = tonumber(redis.call('GET', KEYS[3]) or '0')
if seq < v then redis.call('SET', KEYS[3], v) end
local cur = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if v <= cur then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'sha256', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[5], ARGV[4])
return 1
"""


class Keys:
    """Every Redis key and channel name the store uses, in one place."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.tasks = f"{prefix}:tasks"
        self.events = f"{prefix}:events"

    def _task(self, task_id: str) -> str:
        return f"{self.prefix}:task:{task_id}"

    def blob(self, task_id: str, sha256: str) -> str:
        return f"{self._task(task_id)}:blob:{sha256}"

    def blobs(self, task_id: str) -> str:
        return f"{self._task(task_id)}:blobs"

    def manifest(self, task_id: str, version: int) -> str:
        return f"{self._task(task_id)}:manifest:{version}"

    def versions(self, task_id: str) -> str:
        return f"{self._task(task_id)}:versions"

    def seq(self, task_id: str) -> str:
        return f"{self._task(task_id)}:seq"

    def current(self, task_id: str) -> str:
        return f"{self._task(task_id)}:current"

    # fine-tuning files and jobs (jobs/backend.py) and the job queue (huey's own keys start with `queue`)
    @property
    def files(self) -> str:
        return f"{self.prefix}:files"

    def file(self, file_id: str) -> str:
        return f"{self.prefix}:file:{file_id}"  # hash {meta, data}

    @property
    def jobs(self) -> str:
        return f"{self.prefix}:jobs"  # sorted set of job ids by creation sequence

    @property
    def job_seq(self) -> str:
        return f"{self.prefix}:jobs:seq"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def job_events(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"

    @property
    def queue(self) -> str:
        return f"{self.prefix}.jobs"  # huey's queue name


@contextlib.contextmanager
def _io() -> Iterator[None]:
    """Map connection-level Redis failures to StoreUnavailable, and a full Redis to StoreFull."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailable(f"redis is unreachable: {exc}") from exc
    except OutOfMemoryError as exc:
        raise StoreFull(
            "the store is full: redis reached its maxmemory (noeviction); nothing was written", field="store"
        ) from exc


class RedisStore(Store):
    """Versioned artifact store in Redis, with pub/sub change events."""

    def __init__(
        self,
        url: str,
        limits: Limits | None = None,
        prefix: str = "softserve",
        client: redis.Redis | None = None,
        pubsub: bool = True,
    ) -> None:
        """`client` (bytes responses, decode_responses=False) overrides `url`; no I/O happens here.

        `pubsub=False` makes watch() rely on polling alone.
        """
        self.url = url
        self.limits = limits or Limits()
        self.keys = Keys(prefix)
        self.use_pubsub = pubsub
        self._owns_client = client is None
        if client is None:
            client = redis.Redis.from_url(
                url,
                socket_connect_timeout=5,
                socket_timeout=30,
                health_check_interval=30,
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
            )
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("RedisStore needs a client with decode_responses=False (blobs are bytes)")
        self.client = client
        self._set_current = client.register_script(_SET_CURRENT_LUA)
        self._need = 0  # bytes of the last put refused for want of memory (0 after a success)

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self.keys.prefix!r})"

    # ---- write helpers: each runs now, or queues on the caller's pipeline ------------------------------

    def write_blob(self, task_id: str, sha256: str, data: bytes, pipeline: Pipeline | None = None) -> None:
        """Store artifact bytes under their sha256 (kept if already there) and index them on the task."""
        validate_task_id(task_id)
        with self._pipe(pipeline) as pipe:
            pipe.set(self.keys.blob(task_id, sha256), data, nx=True)
            pipe.sadd(self.keys.blobs(task_id), sha256)

    def write_manifest(
        self, task_id: str, version: int, manifest_json: str, pipeline: Pipeline | None = None
    ) -> None:
        """Store the immutable manifest of one version."""
        validate_task_id(task_id)
        with self._pipe(pipeline) as pipe:
            pipe.set(self.keys.manifest(task_id, version), manifest_json)
            pipe.sadd(self.keys.versions(task_id), version)

    def set_current(
        self, task_id: str, version: int, sha256: str, pipeline: Pipeline | None = None
    ) -> bool | None:
        """Compare-and-set the current pointer forward to `version`, publishing the change.

        Returns whether it moved (None when queued on a caller's pipeline).
        """
        validate_task_id(task_id)
        k = self.keys
        event = json.dumps({"task_id": task_id, "version": version, "sha256": sha256})
        keys = [k.current(task_id), k.tasks, k.seq(task_id)]
        args = [version, sha256, task_id, event, k.events]
        with _io():
            result = self._set_current(keys=keys, args=args, client=pipeline or self.client)
        return None if pipeline is not None else bool(result)

    def publish(self, event: ChangeEvent, pipeline: Pipeline | None = None) -> None:
        """Announce a change on the events channel."""
        validate_task_id(event.task_id)
        message = json.dumps({"task_id": event.task_id, "version": event.version, "sha256": event.sha256})
        with self._pipe(pipeline) as pipe:
            pipe.publish(self.keys.events, message)

    # ---- Store API ---------------------------------------------------------------------------------------

    def put(self, artifact: Artifact) -> int:
        """Store a new immutable version and make it current; returns its number (see the module doc)."""
        task_id = check_artifact(artifact, self.limits)
        blob = stored_bytes(artifact, 0, self.limits)  # blobs are shared by versions: manifest.version 0
        try:
            version = self._commit(task_id, artifact, blob)
        except StoreFull:
            self._need = len(blob) + MIN_FREE_BYTES
            raise
        self._need = 0
        return version

    def _commit(self, task_id: str, artifact: Artifact, blob: bytes) -> int:
        """Take the next version number and write everything in one transaction (retried on a race)."""
        k = self.keys
        with _io(), self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(k.seq(task_id), k.current(task_id))
                    # after WATCH the pipeline runs commands immediately and returns their results
                    seq = int(cast("bytes", pipe.get(k.seq(task_id))) or 0)
                    pointer = decode_pointer(cast("dict[bytes, bytes]", pipe.hgetall(k.current(task_id))))
                    version = max(seq, pointer[0] if pointer else 0) + 1
                    manifest = stored_manifest(artifact, version, self.limits)
                    pipe.multi()
                    pipe.set(k.seq(task_id), version)
                    self.write_blob(task_id, artifact.sha256, blob, pipeline=pipe)
                    self.write_manifest(task_id, version, manifest, pipeline=pipe)
                    self.set_current(task_id, version, artifact.sha256, pipeline=pipe)
                    pipe.execute()
                    return version
                except redis.WatchError:
                    continue  # another put or a delete of this task committed first: start over

    def get(self, task_id: str, version: int | None = None) -> Artifact:
        """The current (or the given) version, sha256-verified; raises NotFound."""
        validate_task_id(task_id)
        with _io():
            if version is None:
                pointer = decode_pointer(self.client.hgetall(self.keys.current(task_id)))
                if pointer is None:
                    raise NotFound(f"task {task_id!r} not found", field="task_id")
                version = pointer[0]
            raw_manifest = self.client.get(self.keys.manifest(task_id, version))
            if raw_manifest is None:
                raise NotFound(f"task {task_id!r} has no version {version}", field="version")
            manifest = parse_manifest({METADATA_KEY: text(raw_manifest)}, self.limits)
            blob = self.client.get(self.keys.blob(task_id, manifest.sha256))
        if blob is None:
            raise NotFound(f"task {task_id!r} version {version} was deleted", field="version")
        stored = from_bytes(bytes(blob), self.limits)  # verifies the tensors against their sha256
        if stored.sha256 != manifest.sha256 or manifest.task_id != task_id or manifest.version != version:
            raise ArtifactFormatError(f"task {task_id!r} v{version}: manifest and blob disagree")
        return Artifact(manifest=manifest, tensors=stored.tensors)

    def info(self, task_id: str) -> TaskInfo:
        """Metadata of the current version (no blob transfer); raises NotFound."""
        validate_task_id(task_id)
        found = self._infos([task_id], skip_broken=False)
        if not found:
            raise NotFound(f"task {task_id!r} not found", field="task_id")
        return found[0]

    def list(self) -> builtins.list[TaskInfo]:
        """Every task with a current version, sorted by task id."""
        with _io():
            members = self.client.smembers(self.keys.tasks)
        task_ids = []
        for raw in members:
            with contextlib.suppress(InvalidTaskId):
                task_ids.append(validate_task_id(text(raw)))
        return self._infos(sorted(task_ids))

    def delete(self, task_id: str) -> None:
        """Remove every key of the task in one transaction, then announce version 0; raises NotFound."""
        validate_task_id(task_id)
        k = self.keys
        watched = [k.current(task_id), k.versions(task_id), k.blobs(task_id), k.seq(task_id)]
        with _io(), self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(*watched)
                    if not pipe.exists(k.current(task_id), k.versions(task_id)):
                        raise NotFound(f"task {task_id!r} not found", field="task_id")
                    # after WATCH the pipeline runs commands immediately and returns their results
                    versions = [int(v) for v in cast("set[bytes]", pipe.smembers(k.versions(task_id)))]
                    shas = [text(s) for s in cast("set[bytes]", pipe.smembers(k.blobs(task_id)))]
                    pipe.multi()
                    manifests = [k.manifest(task_id, v) for v in versions]
                    pipe.delete(*watched, *manifests, *[k.blob(task_id, s) for s in shas])
                    pipe.srem(k.tasks, task_id)
                    self.publish(ChangeEvent(task_id, 0, ""), pipeline=pipe)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue

    def watch(self, stop: object | None = None, poll_interval: float = 1.0) -> Iterator[ChangeEvent]:
        """Pub/sub events plus a poll of every pointer each `poll_interval` s, deduplicated per task.

        The state when iteration starts is the baseline (see RedisWatch). Connection failures are
        retried quietly; the iterator ends once `stop` is set.
        """
        return RedisWatch(self).events(stop_event(stop), poll_interval)

    def prune(self, task_id: str, keep: int, protected: Collection[int] = ()) -> builtins.list[int]:
        """Keep the newest `keep` committed versions, the current one and `protected`; drop the rest."""
        validate_task_id(task_id)
        with _io():
            return redis_retention.prune(self, task_id, keep, protected)

    def recover(self) -> builtins.list[str]:
        """Remove versions never made current, blobs no version uses, and keys of tasks with no pointer."""
        with _io():
            return redis_retention.recover(self)

    def writable(self) -> bool:
        """False while Redis (maxmemory, noeviction) lacks room for the last refused put or MIN_FREE_BYTES."""
        try:
            info = self.client.info("memory")
        except redis.RedisError as exc:
            log.warning("redis INFO failed: %s", exc)
            return False
        maxmemory = int(info.get("maxmemory", 0) or 0)
        if not maxmemory or info.get("maxmemory_policy") != "noeviction":
            return True
        return int(info.get("used_memory", 0)) + max(self._need, MIN_FREE_BYTES) <= maxmemory

    def ping(self) -> None:
        with _io():
            self.client.ping()

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    # ---- helpers -----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _pipe(self, pipeline: Pipeline | None) -> Iterator[Pipeline]:
        """The caller's pipeline, or a fresh transaction that is executed on exit."""
        if pipeline is not None:
            yield pipeline
            return
        with _io(), self.client.pipeline(transaction=True) as pipe:
            yield pipe
            pipe.execute()

    def _infos(self, task_ids: builtins.list[str], skip_broken: bool = True) -> builtins.list[TaskInfo]:
        """TaskInfo of each task that has a current pointer, in two pipelined round trips.

        A task whose stored manifest cannot be read is logged and left out (skip_broken) or raised.
        """
        k = self.keys
        with _io():
            with self.client.pipeline(transaction=False) as pipe:
                for task_id in task_ids:
                    pipe.hgetall(k.current(task_id))
                    pipe.smembers(k.versions(task_id))
                raw = pipe.execute()
            pointers = [(t, decode_pointer(raw[2 * i]), raw[2 * i + 1]) for i, t in enumerate(task_ids)]
            live = [(t, p, vs) for t, p, vs in pointers if p is not None]
            with self.client.pipeline(transaction=False) as pipe:
                for task_id, pointer, _ in live:
                    pipe.get(k.manifest(task_id, pointer[0]))
                manifests = pipe.execute()
        out = []
        for (task_id, pointer, versions), raw_manifest in zip(live, manifests, strict=True):
            if raw_manifest is None:
                continue  # deleted between the two round trips
            try:
                # read as get() reads it: one rule for what a stored manifest may be
                manifest = parse_manifest({METADATA_KEY: text(raw_manifest)}, self.limits)
            except StoreError as exc:
                if not skip_broken:
                    raise
                log.warning("task %r left out of the list: %s", task_id, exc)
                continue
            info = TaskInfo(
                task_id=task_id,
                version=pointer[0],
                method=manifest.method,
                sha256=pointer[1],
                created_at=manifest.created_at,
                versions=tuple(sorted(int(v) for v in versions)),
                input_format=manifest.input_format,
            )
            out.append(info)
        return out
