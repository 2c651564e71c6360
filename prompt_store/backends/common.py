"""Helpers shared by the store backends: pre-put checks, serialisation, pointer diffs, watch stop."""

from __future__ import annotations

import threading

from prompt_store.artifact import (
    METADATA_KEY,
    from_bytes,
    manifest_json,
    parse_manifest,
    to_bytes,
    with_version,
)
from prompt_store.backends.base import ChangeEvent
from prompt_store.errors import TooLarge
from prompt_store.task_id import validate_new_task_id
from prompt_store.types import Artifact, Limits
from prompt_store.validation import validate_artifact

# A task's current pointer: (version, sha256).
Pointer = tuple[int, str]


def check_artifact(artifact: Artifact, limits: Limits) -> str:
    """What every backend checks before any I/O: a task id that may be stored, a valid method config and
    tensors, a size within the limit. The bytes are then checked again in their stored form (stored_bytes,
    stored_manifest). Returns the task id.
    """
    task_id = validate_new_task_id(artifact.task_id)
    validate_artifact(artifact, None, limits)
    if artifact.nbytes() > limits.max_file_bytes:
        raise TooLarge(
            f"artifact has {artifact.nbytes()} tensor bytes; the limit is {limits.max_file_bytes}",
            field="file",
        )
    return task_id


def stored_bytes(artifact: Artifact, version: int, limits: Limits) -> bytes:
    """The safetensors file of `artifact` as version `version`, checked in exactly this form.

    Serialised once; these very bytes are parsed and validated (sizes, manifest length, sha256 against
    the tensors, method checks) and only then returned for writing, so nothing is stored that a read
    would refuse (e.g. a manifest that grew past its limit when serialised).
    """
    data = to_bytes(with_version(artifact, version))
    validate_artifact(from_bytes(data, limits), None, limits)
    return data


def stored_manifest(artifact: Artifact, version: int, limits: Limits) -> str:
    """The manifest JSON of `artifact` as version `version` (Redis keeps it apart), checked as stored."""
    text = manifest_json(with_version(artifact, version).manifest)
    parse_manifest({METADATA_KEY: text}, limits)
    return text


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
