"""A request's text -> its prompt ids, in the input format of the task it runs on.

The task is resolved (its current version pinned) before anything is tokenized: the format recorded in its
manifest (`prompt_store.InputFormat`) decides the tokens. A plain `prompt` (/generate, /v1/completions) is
the user turn of the chat template when the task was trained on chat-formatted input, with its recorded
system prompt, else the raw text; `messages` always go through the chat template, with the task's system
prompt unless they open with a system message of their own, which replaces it (runtime.input_format). The
bare model and tasks stored before formats were recorded (format_version 1) read a plain prompt raw.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from starlette.concurrency import run_in_threadpool

from prompt_store import RAW_FORMAT, InputFormat
from prompt_store.cache import Lease
from runtime.input_format import task_messages, with_system_prompt
from server.errors import NotReady
from server.state import ServerState
from server.tokenization import check_text_bounds, encode_chat, encode_text

BASE_TASK = "base"


async def pin(state: ServerState, task_id: str | None) -> Lease | None:
    """The task's current version, pinned (None for the bare model); the caller releases it."""
    if state.draining:
        raise NotReady("server is shutting down", retry_after=5)
    return None if task_id in (None, BASE_TASK) else await run_in_threadpool(state.cache.acquire, task_id)


@contextlib.asynccontextmanager
async def pinned(state: ServerState, task_id: str | None) -> AsyncIterator[Lease | None]:
    """`pin` for the time a request is tokenized and prepared: released if that fails; on success the
    Prepared request that took it (`service.prepare_many(lease=...)`) releases it."""
    lease = await pin(state, task_id)
    try:
        yield lease
    except BaseException:
        if lease is not None:
            lease.release()
        raise


def input_format(lease: Lease | None) -> InputFormat:
    """The pinned task's input format (RAW_FORMAT for the bare model)."""
    return lease.task.input_format if lease is not None else RAW_FORMAT


def tokenize(
    state: ServerState,
    prompt: str | None,
    messages: Sequence[dict[str, str]] | None,
    fmt: InputFormat = RAW_FORMAT,
) -> list[int]:
    """Prompt ids in format `fmt` (module docstring); user text is never parsed as control tokens
    (server.tokenization). Blocking."""
    tokenizer = state.runner.tokenizer
    if messages is not None:
        return encode_chat(tokenizer, with_system_prompt(messages, fmt.system_prompt))
    assert prompt is not None
    if fmt.chat_template:
        return encode_chat(tokenizer, task_messages(prompt, fmt.system_prompt))
    return encode_text(tokenizer, prompt)


async def prompt_ids(
    state: ServerState,
    prompt: str | None,
    messages: Sequence[dict[str, str]] | None,
    lease: Lease | None = None,
) -> list[int]:
    """Text that cannot fit is refused before any work (422); tokenizing and templating run off the loop.
    `lease`: the pinned task whose input format applies (None: the bare model, raw)."""
    check_text_bounds(state.runner.tokenizer, state.settings.max_prompt_tokens, prompt, messages)
    return await run_in_threadpool(tokenize, state, prompt, messages, input_format(lease))
