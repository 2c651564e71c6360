"""Helpers shared by the store backends: pre-put checks, serialisation, pointer diffs, watch stop."""

from __future__ import annotations

import threading

from prompt_store.artifact import tensors_sha256, to_bytes, with_version
from prompt_store.backends.base import ChangeEvent
from prompt_store.errors import ArtifactFormatError, TooLarge
from prompt_store.types import Artifact, Limits
from prompt_store.validation import validate_artifact

# A task's current pointer: (version, sha256).
Pointer = tuple[int, str]


def check_artifact(artifact: Artifact, limits: Limits) -> None:
    """What every backend checks before storing: method validity, size, and a sha256 that matches."""
    validate_artifact(artifact, None, limits)
    if artifact.nbytes() > limits.max_file_bytes:
        raise TooLarge(f"artifact has {artifact.nbytes()} tensor bytes; the limit is {limits.max_file_bytes}")
    if tensors_sha256(artifact.tensors) != artifact.sha256:
        raise ArtifactFormatError("manifest sha256 does not match the tensors", field="sha256")


def serialise(artifact: Artifact, version: int, limits: Limits) -> bytes:
    """The stored bytes of an artifact: its safetensors file with manifest.version set."""
    data = to_bytes(with_version(artifact, version))
    if len(data) > limits.max_file_bytes:
        raise TooLarge(f"artifact is {len(data)} bytes; the limit is {limits.max_file_bytes}", field="file")
    return data


def pointer_changes(old: dict[str, Pointer], new: dict[str, Pointer]) -> list[ChangeEvent]:
    """Events taking a watcher from the pointers `old` to `new`.

    A vanished task yields version 0. A pointer that went backwards, or kept its number with other
    content, means the task was deleted and re-created in between: a 0 is yielded before it, so a
    consumer may ignore stale lower versions otherwise.
    """
    events = [ChangeEvent(task_id, 0, "") for task_id in sorted(old.keys() - new.keys())]
    for task_id, pointer in sorted(new.items()):
        before = old.get(task_id)
        if before == pointer:
            continue
        if before is not None and pointer[0] <= before[0]:
            events.append(ChangeEvent(task_id, 0, ""))
        events.append(ChangeEvent(task_id, pointer[0], pointer[1]))
    return events


def stop_event(stop: object | None) -> threading.Event:
    """The `stop` argument of Store.watch as an Event (a fresh, never-set one when None)."""
    if stop is None:
        return threading.Event()
    if not isinstance(stop, threading.Event):
        raise TypeError(f"stop must be a threading.Event, got {type(stop).__name__}")
    return stop
