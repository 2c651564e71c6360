"""Where the user's text starts in a request's token ids: the one definition training and serving share.

An ACCEPT delta written with `added_at = "user_text"` applies to the first s tokens of the user's text, not
to the chat template's head (`<|im_start|>system ... <|im_start|>user\\n` under SmolLM2's template). The
head is what the template renders before the first message's content when that message is the user's; a
request whose ids start with the head's ids has its user text at `len(head)`, any other request (a plain
prompt, a chat that opens with a system message of its own) at 0. The same function on the same ids gives
the same offset in training (`training.data`) and in the server (`server.rows`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from typing import Any

SENTINEL = "\ue000softserve-user-text\ue001"

_heads: weakref.WeakKeyDictionary[Any, tuple[int, ...]] = weakref.WeakKeyDictionary()


def chat_head_ids(tokenizer: Any) -> tuple[int, ...]:
    """Token ids the chat template puts before a lone user message's content (() without a template)."""
    with contextlib.suppress(KeyError, TypeError):
        return _heads[tokenizer]
    head: tuple[int, ...] = ()
    if getattr(tokenizer, "chat_template", None):
        text = str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": SENTINEL}], tokenize=False, add_generation_prompt=True
            )
        )
        before, found, _ = text.partition(SENTINEL)
        if found:
            head = tuple(int(i) for i in tokenizer(before, add_special_tokens=False)["input_ids"])
    with contextlib.suppress(TypeError):
        _heads[tokenizer] = head
    return head


def user_text_offset(tokenizer: Any, ids: Sequence[int]) -> int:
    """Index of the user text's first token in `ids`: len(head) when `ids` starts with the chat template's
    head (and has text after it), else 0."""
    head = chat_head_ids(tokenizer)
    if head and len(ids) > len(head) and tuple(ids[: len(head)]) == head:
        return len(head)
    return 0
