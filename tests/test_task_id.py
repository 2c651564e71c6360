"""Task id rule: ^[a-z0-9][a-z0-9._-]{0,63}$, no '..', checked before any I/O."""

from __future__ import annotations

import pytest

from prompt_store import InvalidTaskId, validate_task_id
from prompt_store.task_id import MAX_TASK_ID_LENGTH

VALID = ["a", "0", "sentiment", "sst2-v1", "task_1.2", "a" * MAX_TASK_ID_LENGTH, "x-y_z.w", "9lives"]

INVALID = [
    "../x",
    "..",
    "a..b",
    "%2e%2e%2f",
    "%2e%2e%2fetc",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "a\x00b",
    "\x00",
    "a" * (MAX_TASK_ID_LENGTH + 1),
    "Sentiment",
    "ABC",
    "café",
    "tâche",
    "ｔａｓｋ",  # full-width letters
    "task\n",
    "task\r\n",
    " task",
    "task ",
    "",
    ".hidden",
    "-flag",
    "_x",
    "a b",
    "a:b",
    "a*",
]


@pytest.mark.parametrize("task_id", VALID)
def test_valid_ids_are_returned_unchanged(task_id: str) -> None:
    assert validate_task_id(task_id) == task_id


@pytest.mark.parametrize("task_id", INVALID, ids=repr)
def test_invalid_ids_are_rejected(task_id: str) -> None:
    with pytest.raises(InvalidTaskId) as info:
        validate_task_id(task_id)
    assert info.value.field == "task_id"
    assert info.value.reason == "invalid_task_id"


@pytest.mark.parametrize("task_id", [None, 1, 1.5, b"task", ["task"], {"id": "task"}, True])
def test_non_strings_are_rejected(task_id: object) -> None:
    with pytest.raises(InvalidTaskId):
        validate_task_id(task_id)


def test_error_message_escapes_control_characters() -> None:
    with pytest.raises(InvalidTaskId) as info:
        validate_task_id("bad\x00\nid")
    assert "\x00" not in str(info.value) and "\n" not in str(info.value)
