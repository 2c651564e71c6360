"""Where training files and job records live: beside the artifacts, in the prompt store's backend.

Disk (`disk:PATH`): PATH/files/<id>.data + <id>.json, PATH/jobs/<id>.json + <id>.events.jsonl, PATH/jobs/SEQ;
every write is a temp file + rename under one flock (PATH/jobs/.lock), so readers never see half a record.
Redis (`redis://...`): the key names in prompt_store.backends.redis_store.Keys; a job update is a
WATCH/MULTI read-modify-write, so concurrent workers and servers never lose each other's changes.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

from prompt_store.backends.redis_store import Keys
from prompt_store.errors import NotFound, StoreUnavailable
from prompt_store.fileio import atomic_write

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
REDIS_PREFIX = "softserve"  # RedisStore's default prefix

Record = dict[str, Any]
Update = Callable[[Record], Record | None]  # the new record, or None to leave it unchanged


def is_redis(spec: str) -> bool:
    return spec.startswith(REDIS_SCHEMES)


def disk_root(spec: str) -> Path:
    return Path(spec.removeprefix("disk:")).expanduser()


class JobBackend(abc.ABC):
    """Files (bytes + metadata) and job records (JSON + an append-only event list)."""

    @abc.abstractmethod
    def put_file(self, meta: Record, data: bytes) -> None: ...

    @abc.abstractmethod
    def file_meta(self, file_id: str) -> Record:
        """Raises NotFound."""

    @abc.abstractmethod
    def file_bytes(self, file_id: str) -> bytes:
        """Raises NotFound."""

    @abc.abstractmethod
    def list_files(self) -> list[Record]: ...

    @abc.abstractmethod
    def delete_file(self, file_id: str) -> None:
        """Raises NotFound."""

    @abc.abstractmethod
    def create_job(self, job: Record) -> Record:
        """Store a new job; sets its `seq` (creation order across every server); returns it."""

    @abc.abstractmethod
    def get_job(self, job_id: str) -> Record:
        """Raises NotFound."""

    @abc.abstractmethod
    def list_jobs(self) -> list[Record]:
        """Every job, newest first."""

    @abc.abstractmethod
    def update_job(self, job_id: str, update: Update) -> Record:
        """Atomic read-modify-write; returns the record as it is afterwards. Raises NotFound."""

    @abc.abstractmethod
    def add_event(self, job_id: str, event: Record) -> None: ...

    @abc.abstractmethod
    def events(self, job_id: str) -> list[Record]:
        """Oldest first."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def open_backend(spec: str) -> JobBackend:
    return RedisJobs(spec) if is_redis(spec) else DiskJobs(disk_root(spec))


class DiskJobs(JobBackend):
    def __init__(self, root: Path) -> None:
        self.files = root / "files"  # both made on the first write: a server that never fine-tunes
        self.jobs = root / "jobs"  # leaves its store folder as it was

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.jobs.mkdir(parents=True, exist_ok=True)
        with open(self.jobs / ".lock", "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @staticmethod
    def _read(path: Path, what: str) -> Record:
        try:
            value: Record = json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFound(f"no {what} {path.name.split('.')[0]!r}", field=f"{what}_id") from None
        return value

    def put_file(self, meta: Record, data: bytes) -> None:
        self.files.mkdir(parents=True, exist_ok=True)
        atomic_write(self.files / f"{meta['id']}.data", data)
        atomic_write(self.files / f"{meta['id']}.json", json.dumps(meta).encode())

    def file_meta(self, file_id: str) -> Record:
        return self._read(self.files / f"{_safe(file_id)}.json", "file")

    def file_bytes(self, file_id: str) -> bytes:
        self.file_meta(file_id)
        try:
            return (self.files / f"{_safe(file_id)}.data").read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no file {file_id!r}", field="file_id") from None

    def list_files(self) -> list[Record]:
        out = []
        for path in self.files.glob("*.json") if self.files.is_dir() else []:
            with contextlib.suppress(FileNotFoundError, ValueError):
                out.append(json.loads(path.read_text()))
        return sorted(out, key=lambda m: (m["created_at"], m["id"]))

    def delete_file(self, file_id: str) -> None:
        self.file_meta(file_id)
        (self.files / f"{_safe(file_id)}.json").unlink(missing_ok=True)
        (self.files / f"{_safe(file_id)}.data").unlink(missing_ok=True)

    def create_job(self, job: Record) -> Record:
        with self._lock():
            seq_path = self.jobs / "SEQ"
            seq = int(seq_path.read_text()) + 1 if seq_path.exists() else 1
            atomic_write(seq_path, str(seq).encode())
            job = {**job, "seq": seq}
            atomic_write(self.jobs / f"{job['id']}.json", json.dumps(job).encode())
        return job

    def get_job(self, job_id: str) -> Record:
        return self._read(self.jobs / f"{_safe(job_id)}.json", "job")

    def list_jobs(self) -> list[Record]:
        out = []
        for path in self.jobs.glob("*.json") if self.jobs.is_dir() else []:
            with contextlib.suppress(FileNotFoundError, ValueError):
                out.append(json.loads(path.read_text()))
        return sorted(out, key=lambda j: -int(j["seq"]))

    def update_job(self, job_id: str, update: Update) -> Record:
        with self._lock():
            job = self.get_job(job_id)
            new = update(dict(job))
            if new is None:
                return job
            atomic_write(self.jobs / f"{_safe(job_id)}.json", json.dumps(new).encode())
            return new

    def add_event(self, job_id: str, event: Record) -> None:
        with self._lock(), open(self.jobs / f"{_safe(job_id)}.events.jsonl", "a") as fh:
            fh.write(json.dumps(event) + "\n")

    def events(self, job_id: str) -> list[Record]:
        path = self.jobs / f"{_safe(job_id)}.events.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _safe(name: str) -> str:
    """An id as a file name: ids are ours (file-…, ftjob-…), so anything else is simply not found."""
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise NotFound(f"no such id {name[:64]!r}", field="id")
    return name


@contextlib.contextmanager
def _io() -> Iterator[None]:
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailable(f"redis is unreachable: {exc}") from exc


class RedisJobs(JobBackend):
    def __init__(self, url: str, prefix: str = REDIS_PREFIX) -> None:
        self.client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
        self.keys = Keys(prefix)

    def put_file(self, meta: Record, data: bytes) -> None:
        with _io(), self.client.pipeline() as pipe:
            pipe.hset(self.keys.file(meta["id"]), mapping={"meta": json.dumps(meta), "data": data})
            pipe.sadd(self.keys.files, meta["id"])
            pipe.execute()

    def file_meta(self, file_id: str) -> Record:
        with _io():
            raw = self.client.hget(self.keys.file(file_id), "meta")
        if raw is None:
            raise NotFound(f"no file {file_id[:64]!r}", field="file_id")
        meta: Record = json.loads(raw)
        return meta

    def file_bytes(self, file_id: str) -> bytes:
        with _io():
            raw = self.client.hget(self.keys.file(file_id), "data")
        if raw is None:
            raise NotFound(f"no file {file_id[:64]!r}", field="file_id")
        return bytes(raw)

    def list_files(self) -> list[Record]:
        with _io():
            ids = sorted(m.decode() for m in self.client.smembers(self.keys.files))  # type: ignore[union-attr]
            raws = [self.client.hget(self.keys.file(i), "meta") for i in ids]
        metas = [json.loads(r) for r in raws if r is not None]
        return sorted(metas, key=lambda m: (m["created_at"], m["id"]))

    def delete_file(self, file_id: str) -> None:
        with _io():
            removed = self.client.delete(self.keys.file(file_id))
            self.client.srem(self.keys.files, file_id)
        if not removed:
            raise NotFound(f"no file {file_id[:64]!r}", field="file_id")

    def create_job(self, job: Record) -> Record:
        with _io():
            seq = int(self.client.incr(self.keys.job_seq))  # type: ignore[arg-type]
            job = {**job, "seq": seq}
            with self.client.pipeline() as pipe:
                pipe.set(self.keys.job(job["id"]), json.dumps(job))
                pipe.zadd(self.keys.jobs, {job["id"]: seq})
                pipe.execute()
        return job

    def get_job(self, job_id: str) -> Record:
        with _io():
            raw = self.client.get(self.keys.job(job_id))
        if raw is None:
            raise NotFound(f"no job {job_id[:64]!r}", field="job_id")
        job: Record = json.loads(raw)  # type: ignore[arg-type]
        return job

    def list_jobs(self) -> list[Record]:
        with _io():
            ids = [m.decode() for m in self.client.zrevrange(self.keys.jobs, 0, -1)]  # type: ignore[union-attr]
            raws = self.client.mget([self.keys.job(i) for i in ids]) if ids else []
        return [json.loads(r) for r in raws if r is not None]  # type: ignore[union-attr]

    def update_job(self, job_id: str, update: Update) -> Record:
        key = self.keys.job(job_id)
        with _io(), self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise NotFound(f"no job {job_id[:64]!r}", field="job_id")
                    job: Record = json.loads(raw)  # type: ignore[arg-type]
                    new = update(dict(job))
                    if new is None:
                        pipe.unwatch()
                        return job
                    pipe.multi()
                    pipe.set(key, json.dumps(new))
                    pipe.execute()
                    return new
                except redis.WatchError:
                    continue

    def add_event(self, job_id: str, event: Record) -> None:
        with _io():
            self.client.rpush(self.keys.job_events(job_id), json.dumps(event))

    def events(self, job_id: str) -> list[Record]:
        with _io():
            raws = self.client.lrange(self.keys.job_events(job_id), 0, -1)
        return [json.loads(r) for r in raws]  # type: ignore[union-attr]

    def close(self) -> None:
        self.client.close()


def default_work_dir(spec: str) -> Path:
    """Worker scratch when SOFTSERVE_JOB_WORK_DIR is empty: PATH/jobs/work for `disk:PATH`, else $TMPDIR."""
    if is_redis(spec):
        return Path(tempfile.gettempdir()) / "softserve-jobs"
    return disk_root(spec) / "jobs" / "work"


def ensure_dir(path: str | os.PathLike[str]) -> Path:
    out = Path(path).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    return out
