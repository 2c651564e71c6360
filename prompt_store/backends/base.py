"""The store interface both backends implement."""

from __future__ import annotations

import abc
import builtins
from collections.abc import Collection, Iterator
from dataclasses import dataclass

from prompt_store.types import RAW_FORMAT, Artifact, InputFormat


@dataclass(frozen=True)
class TaskInfo:
    task_id: str
    version: int  # current version
    method: str
    sha256: str
    created_at: str
    versions: tuple[int, ...] = ()
    input_format: InputFormat = RAW_FORMAT  # of the current version


@dataclass(frozen=True)
class ChangeEvent:
    """A task's current pointer changed: version is the new current one, 0 when the task was deleted."""

    task_id: str
    version: int
    sha256: str = ""


class Store(abc.ABC):
    """Versioned artifact store. Versions are immutable; the current pointer flips atomically."""

    @abc.abstractmethod
    def put(self, artifact: Artifact) -> int:
        """Store a new immutable version of artifact.task_id, make it current, return its number."""

    @abc.abstractmethod
    def get(self, task_id: str, version: int | None = None) -> Artifact:
        """The current (or a given) version; raises NotFound."""

    @abc.abstractmethod
    def info(self, task_id: str) -> TaskInfo:
        """Metadata of the current version without loading tensors; raises NotFound."""

    @abc.abstractmethod
    def list(self) -> list[TaskInfo]: ...

    @abc.abstractmethod
    def delete(self, task_id: str) -> None:
        """Remove the task and all its versions; raises NotFound."""

    @abc.abstractmethod
    def watch(self, stop: object | None = None, poll_interval: float = 1.0) -> Iterator[ChangeEvent]:
        """Yield change events (pub/sub or file notifications, plus polling so lost messages converge).

        `stop` is a threading.Event; the iterator ends when it is set.
        """

    def prune(self, task_id: str, keep: int, protected: Collection[int] = ()) -> builtins.list[int]:
        """Remove old versions: keep the newest `keep`, the current one and every `protected` one.

        Returns the removed version numbers (ascending). A missing task removes nothing.
        """
        return []

    def recover(self) -> builtins.list[str]:
        """At start: remove what a crashed writer left (versions never made current, temp files,
        half-deleted tasks). Returns a description of each thing removed."""
        return []

    def writable(self) -> bool:
        """Whether a write could succeed now (not out of disk space / Redis memory). Reads may still work."""
        return True

    def ping(self) -> None:  # noqa: B027 - optional hook
        """Raise StoreUnavailable when the backend cannot be reached."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
