"""Task id rule, checked before any disk or Redis access."""

from __future__ import annotations

import re

from prompt_store.errors import InvalidTaskId

TASK_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_TASK_ID_RE = re.compile(TASK_ID_PATTERN)
MAX_TASK_ID_LENGTH = 64
# names a task can never be stored under: `base` is what requests name the bare model by
RESERVED_TASK_IDS = frozenset({"base"})


def validate_task_id(task_id: object) -> str:
    """Return `task_id` if it matches TASK_ID_PATTERN, else raise InvalidTaskId (no I/O happens here)."""
    if not isinstance(task_id, str):
        raise InvalidTaskId("task_id must be a string", field="task_id")
    # fullmatch + explicit length: `$` alone would accept a trailing newline.
    if len(task_id) > MAX_TASK_ID_LENGTH or _TASK_ID_RE.fullmatch(task_id) is None or ".." in task_id:
        shown = task_id[:80].encode("unicode_escape").decode("ascii")
        raise InvalidTaskId(
            f"task_id {shown!r} is invalid: it must match {TASK_ID_PATTERN} "
            f"(lower-case ASCII letters, digits, '.', '_', '-'; 1 to {MAX_TASK_ID_LENGTH} chars; no '..')",
            field="task_id",
        )
    return task_id


def validate_new_task_id(task_id: object) -> str:
    """validate_task_id, and not a reserved name: the check for anything that creates a task version."""
    validate_task_id(task_id)
    assert isinstance(task_id, str)
    if task_id in RESERVED_TASK_IDS:
        raise InvalidTaskId(
            f"task_id {task_id!r} is reserved (requests name the bare model by it); choose another name",
            field="task_id",
        )
    return task_id
