"""DiskStore: the embedded default backend, a directory tree of immutable safetensors files.

Layout under `root`:

    tasks/<task_id>/v<N>.safetensors   immutable version N (manifest.version == N)
    tasks/<task_id>/CURRENT            "<N> <sha256>\\n", flipped by temp file + fsync + rename
    locks/<task_id>.lock               fcntl.flock lock serialising put/delete of one task

Every write goes through a temp file in the same directory, fsync, os.replace, then an fsync of the
directory, so a reader sees either the old or the new file, never a partial one. Version numbers are
assigned under the task lock (max existing + 1), so concurrent writers, threads or processes, never
reuse a number and CURRENT always names the highest committed version. Deleting renames the task
directory to a dot-prefixed tombstone first, so the task disappears atomically for readers.

A put that fails (refused in its stored form, or the disk is full) removes what it wrote: no version number
is burnt and CURRENT is untouched. prune() removes old versions, recover() what a crashed writer left.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import logging
import os
import shutil
import struct
import uuid
from collections.abc import Collection, Iterator
from pathlib import Path

from prompt_store.artifact import METADATA_KEY, load, parse_manifest, read_header
from prompt_store.backends.base import ChangeEvent, Store, TaskInfo
from prompt_store.backends.common import Pointer, check_artifact, pointer_changes, stop_event, stored_bytes
from prompt_store.errors import (
    ArtifactFormatError,
    InvalidTaskId,
    NotFound,
    StoreError,
    StoreFull,
    StoreUnavailable,
)
from prompt_store.fileio import atomic_write, fsync_dir
from prompt_store.task_id import validate_task_id
from prompt_store.types import Artifact, Limits, Manifest

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
_SUFFIX = ".safetensors"
_TOMBSTONE = ".deleted-"
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
MIN_FREE_BYTES = 64 * 1024  # below this much free space the store reports itself not writable


def _parse_pointer(text: str, path: Path) -> Pointer:
    parts = text.split()
    if len(parts) != 2 or not parts[0].isdigit():
        raise StoreError(f"corrupt pointer file {path}: {text[:80]!r}")
    return int(parts[0]), parts[1]


def read_manifest(path: Path, limits: Limits) -> Manifest:
    """The manifest of an artifact file, read from its safetensors header only (no tensor bytes)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ArtifactFormatError(f"{path.name}: shorter than its 8-byte header length", field="file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > limits.max_header_bytes:
            raise ArtifactFormatError(f"{path.name}: header of {header_len} bytes is over the limit")
        raw = f.read(header_len)
    header = read_header(head + raw, limits)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or METADATA_KEY not in meta:
        raise ArtifactFormatError(f"{path.name}: no softserve manifest in the header", field="manifest")
    return parse_manifest(meta, limits)


class DiskStore(Store):
    """Versioned artifact store in a local (or shared POSIX) directory."""

    def __init__(self, root: str | os.PathLike[str], limits: Limits | None = None) -> None:
        self.root = Path(root)
        self.limits = limits or Limits()
        self._tasks = self.root / "tasks"
        self._locks = self.root / "locks"
        self._tasks.mkdir(parents=True, exist_ok=True)
        self._locks.mkdir(parents=True, exist_ok=True)
        self._need = 0  # bytes of the last write that failed for want of space (0 after a success)

    def __repr__(self) -> str:
        return f"DiskStore({str(self.root)!r})"

    # ---- paths -------------------------------------------------------------------------------------------

    def _task_dir(self, task_id: str) -> Path:
        return self._tasks / task_id

    def _version_path(self, task_id: str, version: int) -> Path:
        return self._task_dir(task_id) / f"v{version}{_SUFFIX}"

    def _versions(self, task_id: str) -> list[int]:
        """Every stored version number of a task, ascending (empty when the task does not exist)."""
        try:
            names = os.listdir(self._task_dir(task_id))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            stem = name[1 : -len(_SUFFIX)] if name.startswith("v") and name.endswith(_SUFFIX) else ""
            if stem.isdigit():
                out.append(int(stem))
        return sorted(out)

    def _pointer(self, task_id: str) -> Pointer:
        path = self._task_dir(task_id) / CURRENT
        try:
            return _parse_pointer(path.read_text(encoding="ascii"), path)
        except FileNotFoundError:
            raise NotFound(f"task {task_id!r} not found", field="task_id") from None

    @contextlib.contextmanager
    def _task_lock(self, task_id: str) -> Iterator[None]:
        """Exclusive per-task lock across threads and processes (flock on a per-task lock file).

        When the task has no directory at the end (deleted, never created, or a first put that failed),
        the lock file is unlinked while still held, so no file outlives its task; a waiter that then
        wakes up on the orphaned inode notices the path now names another (or no) file and retries.
        """
        path = self._locks / f"{task_id}.lock"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = os.stat(path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    try:
                        yield
                    finally:
                        if not self._task_dir(task_id).is_dir():
                            path.unlink(missing_ok=True)
                    return
            finally:
                os.close(fd)  # closing the descriptor releases the flock

    # ---- Store API ---------------------------------------------------------------------------------------

    def put(self, artifact: Artifact) -> int:
        """Store a new immutable version and make it current; returns the assigned version number.

        The bytes are checked in their stored form before anything is written; a failure after that (a
        full disk) removes the new file again, so a failed put changes nothing.
        """
        task_id = check_artifact(artifact, self.limits)
        with self._io(), self._task_lock(task_id):
            task_dir = self._task_dir(task_id)
            created = not task_dir.is_dir()
            version = max(self._versions(task_id), default=0) + 1
            path = self._version_path(task_id, version)
            data = b""
            try:
                data = stored_bytes(artifact, version, self.limits)
                task_dir.mkdir(exist_ok=True)
                self._remove_orphan_temps(task_dir)
                atomic_write(path, data)
                atomic_write(task_dir / CURRENT, f"{version} {artifact.sha256}\n".encode("ascii"))
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
                    if created:  # nothing of a task whose first put failed stays behind (nor its lock)
                        shutil.rmtree(task_dir, ignore_errors=True)
                if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
                    self._need = len(data) + 4096
                raise
            self._need = 0
        return version

    def get(self, task_id: str, version: int | None = None) -> Artifact:
        """The current (or the given) version, sha256-verified; raises NotFound."""
        validate_task_id(task_id)
        with self._io():
            if version is None:
                version, _ = self._pointer(task_id)
            path = self._version_path(task_id, version)
            try:
                artifact = load(path, self.limits)
            except FileNotFoundError:
                raise NotFound(f"task {task_id!r} has no version {version}", field="version") from None
        if artifact.task_id != task_id or artifact.version != version:
            raise ArtifactFormatError(
                f"{path} holds {artifact.task_id!r} v{artifact.version}, expected {task_id!r} v{version}"
            )
        return artifact

    def info(self, task_id: str) -> TaskInfo:
        """Metadata of the current version, read from the file header only; raises NotFound."""
        validate_task_id(task_id)
        with self._io():
            version, sha = self._pointer(task_id)
            try:
                manifest = read_manifest(self._version_path(task_id, version), self.limits)
            except FileNotFoundError:
                raise NotFound(f"task {task_id!r} not found", field="task_id") from None
            versions = tuple(self._versions(task_id))
        return TaskInfo(
            task_id=task_id,
            version=version,
            method=manifest.method,
            sha256=sha,
            created_at=manifest.created_at,
            versions=versions,
            input_format=manifest.input_format,
        )

    def list(self) -> list[TaskInfo]:
        """Every task with a current version, sorted by task id; an unreadable task is logged and left out."""
        with self._io():
            task_ids = self._task_ids()
        out = []
        for task_id in task_ids:
            try:
                out.append(self.info(task_id))
            except NotFound:
                continue  # deleted meanwhile, or never made current
            except StoreError as exc:
                log.warning("task %r left out of the list: %s", task_id[:80], exc)
        return out

    def delete(self, task_id: str) -> None:
        """Remove the task and all its versions (atomically for readers); raises NotFound."""
        validate_task_id(task_id)
        with self._io(), self._task_lock(task_id):
            task_dir = self._task_dir(task_id)
            if not task_dir.is_dir():
                raise NotFound(f"task {task_id!r} not found", field="task_id")
            tomb = self._tasks / f"{_TOMBSTONE}{task_id}-{uuid.uuid4().hex[:8]}"
            os.replace(task_dir, tomb)
            fsync_dir(self._tasks)
            shutil.rmtree(tomb, ignore_errors=True)

    def watch(self, stop: object | None = None, poll_interval: float = 1.0) -> Iterator[ChangeEvent]:
        """Poll the CURRENT pointers (their content) every `poll_interval` s; yield one event per change.

        The state when iteration starts is the baseline (no events for it). A vanished task yields
        version 0 (see pointer_changes). The iterator ends once `stop` is set.
        """
        event = stop_event(stop)
        seen = self._scan()
        while not event.wait(poll_interval):
            fresh = self._scan()
            changes = pointer_changes(seen, fresh)
            seen = fresh
            yield from changes

    def prune(self, task_id: str, keep: int, protected: Collection[int] = ()) -> builtins.list[int]:
        """Keep the newest `keep` committed versions, the current one and `protected`; remove the rest."""
        validate_task_id(task_id)
        with self._io(), self._task_lock(task_id):
            try:
                current, _ = self._pointer(task_id)
            except NotFound:
                return []
            versions = self._versions(task_id)
            committed = [v for v in versions if v <= current]  # above current: never made current
            kept = {*committed[-max(1, keep) :], current, *protected}
            removed = [v for v in versions if v not in kept]
            for version in removed:
                self._version_path(task_id, version).unlink(missing_ok=True)
            if removed:
                fsync_dir(self._task_dir(task_id))
        return removed

    def recover(self) -> builtins.list[str]:
        """Remove what crashed writers left: half-deleted tasks, temp files, versions never made current."""
        removed = []
        with self._io():
            for name in os.listdir(self._tasks):
                if name.startswith(_TOMBSTONE):
                    shutil.rmtree(self._tasks / name, ignore_errors=True)
                    removed.append(name)
            for task_id in self._task_ids():
                try:
                    validate_task_id(task_id)
                except InvalidTaskId:
                    continue  # not ours: left alone
                removed += self._recover_task(task_id)
        return removed

    def _recover_task(self, task_id: str) -> builtins.list[str]:
        removed = []
        with self._task_lock(task_id):
            task_dir = self._task_dir(task_id)
            if not task_dir.is_dir():
                return []
            self._remove_orphan_temps(task_dir)
            try:
                current, _ = self._pointer(task_id)
            except NotFound:
                current = 0  # the first put crashed before its flip
            except StoreError as exc:
                log.warning("task %r: %s; left for an operator", task_id, exc)
                return []
            for version in self._versions(task_id):
                if version > current:
                    self._version_path(task_id, version).unlink(missing_ok=True)
                    removed.append(f"{task_id} v{version} (never made current)")
            if current == 0 and not any(task_dir.iterdir()):
                task_dir.rmdir()  # the lock file goes with it
        return removed

    def writable(self) -> bool:
        """Enough free space (and inodes) for the last write that failed, or MIN_FREE_BYTES."""
        try:
            st = os.statvfs(self._tasks)
        except OSError:
            return False
        if st.f_files and not st.f_favail:
            return False
        free = st.f_bavail * st.f_frsize
        return os.access(self._tasks, os.W_OK) and free >= max(self._need, MIN_FREE_BYTES)

    def ping(self) -> None:
        if not (self._tasks.is_dir() and os.access(self._tasks, os.W_OK | os.X_OK)):
            raise StoreUnavailable(f"store directory {self._tasks} is missing or not writable")

    # ---- helpers -----------------------------------------------------------------------------------------

    @staticmethod
    @contextlib.contextmanager
    def _io() -> Iterator[None]:
        """Map unexpected file-system failures to StoreUnavailable (expected misses are NotFound)."""
        try:
            yield
        except StoreError:
            raise
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                raise StoreFull(
                    f"the store's disk is full ({exc.strerror}); nothing was written", field="store"
                ) from exc
            raise StoreUnavailable(f"disk store I/O failed: {exc}") from exc

    def _task_ids(self) -> builtins.list[str]:
        try:
            names = os.listdir(self._tasks)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if not n.startswith("."))

    def _scan(self) -> dict[str, Pointer]:
        """Every task's current pointer.

        The pointer files are read every time (a few dozen bytes each): an inode/mtime check could miss
        a flip, since inodes are reused and mtimes are only as fine as the kernel's clock tick.
        """
        out: dict[str, Pointer] = {}
        for task_id in self._task_ids():
            path = self._tasks / task_id / CURRENT
            with contextlib.suppress(OSError, StoreError):  # vanished or half-created: next poll
                out[task_id] = _parse_pointer(path.read_text(encoding="ascii"), path)
        return out

    @staticmethod
    def _remove_orphan_temps(task_dir: Path) -> None:
        """Temp files left by a crashed writer (only ever called under the task lock)."""
        for leftover in task_dir.glob(".tmp-*"):
            leftover.unlink(missing_ok=True)
