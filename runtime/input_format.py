"""How request text becomes a chat, and where the user's text starts in its token ids: the one definition
training and serving share.

A task records the format it was trained with (`prompt_store.InputFormat`): raw text, or the chat
template with a system prompt (its exact text, or None: no system message, the template's own default).
`task_messages` is the chat a plain request text becomes under a chat format, `with_system_prompt` what a
client's `messages` become (a system message of the client's own, first, replaces the recorded one).

An ACCEPT delta written with `added_at = "user_text"` applies to the first s tokens of the user's text, not
to the chat template's head (`<|im_start|>system ... <|im_start|>user\\n` under SmolLM2's template). The
head is what the template renders before the first user message's content, under the task's system prompt;
a request whose ids start with the head's ids has its user text at `len(head)`, any other request (a plain
raw prompt, a chat that opens with a system message of its own) at 0. The same function on the same ids
gives the same offset in training (`training.data`) and in the server (`server.rows`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from typing import Any

SENTINEL = "\ue000softserve-user-text\ue001"

_heads: weakref.WeakKeyDictionary[Any, dict[str | None, tuple[int, ...]]] = weakref.WeakKeyDictionary()


def task_messages(text: str, system_prompt: str | None) -> list[dict[str, str]]:
    """A plain request text as the chat a chat-trained task saw: [system,] user."""
    head = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return [*head, {"role": "user", "content": text}]


def with_system_prompt(messages: Sequence[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """A client's chat under the task's recorded system prompt: prepended unless the chat opens with a
    system message of its own (the client's replaces it); no recorded prompt leaves the chat as it is."""
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


def chat_head_ids(tokenizer: Any, system_prompt: str | None = None) -> tuple[int, ...]:
    """Token ids the chat template puts before a lone user message's content, under `system_prompt`
    (() without a template)."""
    with contextlib.suppress(KeyError, TypeError):
        return _heads[tokenizer][system_prompt]
    head: tuple[int, ...] = ()
    if getattr(tokenizer, "chat_template", None):
        text = str(
            tokenizer.apply_chat_template(
                task_messages(SENTINEL, system_prompt), tokenize=False, add_generation_prompt=True
            )
        )
        before, found, _ = text.partition(SENTINEL)
        if found:
            head = tuple(int(i) for i in tokenizer(before, add_special_tokens=False)["input_ids"])
    with contextlib.suppress(TypeError):
        _heads.setdefault(tokenizer, {})[system_prompt] = head
    return head


def user_text_offset(tokenizer: Any, ids: Sequence[int], system_prompt: str | None = None) -> int:
    """Index of the user text's first token in `ids`: len(head) when `ids` starts with the chat template's
    head under `system_prompt` (and has text after it), else 0."""
    head = chat_head_ids(tokenizer, system_prompt)
    if head and len(ids) > len(head) and tuple(ids[: len(head)]) == head:
        return len(head)
    return 0
