"""OpenAI response shapes: completions and chat completions, whole or streamed, with log-probs and usage.

`system_fingerprint` names the task version that answered (`sentiment@3`, `base`). finish_reason is
`length` or `stop` (end of sequence or a stop string). Log-probs are the engine's (server.sampling: the
model's log-softmax after logit_bias and penalties, before temperature and top-p); a token's text is its
bytes decoded (U+FFFD for a piece of a multi-byte character) and `bytes` are exact (server.tokenization).
A choice that fails mid-stream ends the stream with an `error` event (OpenAI's client raises APIError).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from server import service
from server.errors import openai_body
from server.requests import TokenEvent
from server.service import Outcome, Prepared
from server.state import ServerState
from server.tokenization import token_piece

ERROR_CODES = {
    "error": ("generation_error", 500),
    "timeout": ("timeout", 504),
    "cancelled": ("cancelled", 503),
}


@dataclass
class Shape:
    """What a response looks like: chat or text completion, and the per-request options that shape it."""

    chat: bool
    model: str
    logprobs: bool = False
    echo: list[str] | None = None  # per prompt: its text, prepended to each of its choices
    include_usage: bool = False

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def new_id(self) -> str:
        return f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def usage(prepared: Prepared, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prepared.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prepared.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": prepared.cached_tokens},
    }


def _piece(tokenizer: Any, token: int, logprob: float) -> dict[str, Any]:
    text, raw = token_piece(tokenizer, token)
    return {"token": text, "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(tokenizer: Any, events: Sequence[TokenEvent]) -> dict[str, Any]:
    content = []
    for e in events:
        if e.token_id is None or e.logprob is None:
            continue
        entry = _piece(tokenizer, e.token_id, e.logprob)
        entry["top_logprobs"] = [_piece(tokenizer, t, lp) for t, lp in e.top_logprobs]
        content.append(entry)
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer: Any, events: Sequence[TokenEvent], offset: int) -> dict[str, Any]:
    """OpenAI's legacy shape; `top_logprobs` holds the k most likely and the chosen token (up to k + 1,
    as OpenAI documents); `text_offset` counts characters from the start of the choice's text."""
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top: list[dict[str, float]] = []
    offsets: list[int] = []
    for e in events:
        if e.token_id is None or e.logprob is None:
            continue
        text, _ = token_piece(tokenizer, e.token_id)
        alternatives: dict[str, float] = {}
        for t, lp in e.top_logprobs:  # most likely first: tokens that read the same keep the first
            alternatives.setdefault(token_piece(tokenizer, t)[0], lp)
        alternatives.setdefault(text, e.logprob)
        tokens.append(text)
        token_logprobs.append(e.logprob)
        top.append(alternatives)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def echo_text(shape: Shape, prepared: Prepared, index: int) -> str:
    return shape.echo[index // prepared.n] if shape.echo is not None else ""


def _choice(state: ServerState, shape: Shape, prepared: Prepared, out: Outcome) -> dict[str, Any]:
    tokenizer = state.runner.tokenizer
    choice: dict[str, Any] = {
        "index": out.index,
        "finish_reason": finish(out.finish_reason),
        "logprobs": None,
    }
    if shape.chat:
        choice["message"] = {"role": "assistant", "content": out.text, "refusal": None}
        if shape.logprobs:
            choice["logprobs"] = chat_logprobs(tokenizer, out.token_events)
        return choice
    prefix = echo_text(shape, prepared, out.index)
    choice["text"] = prefix + out.text
    if shape.logprobs:
        choice["logprobs"] = completion_logprobs(tokenizer, out.token_events, len(prefix))
    return choice


def response(state: ServerState, shape: Shape, prepared: Prepared, outcomes: list[Outcome]) -> dict[str, Any]:
    return {
        "id": shape.new_id(),
        "object": shape.object,
        "created": int(time.time()),
        "model": shape.model,
        "system_fingerprint": prepared.system_fingerprint,
        "choices": [_choice(state, shape, prepared, out) for out in outcomes],
        "usage": usage(prepared, sum(len(out.tokens) for out in outcomes)),
    }


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def stream(state: ServerState, shape: Shape, prepared: Prepared) -> AsyncIterator[str]:
    """Chunks as OpenAI sends them: per chat choice a first delta with role "assistant" (per text choice
    with echo, the prompt); a chunk per token event; a chunk with the finish_reason; with include_usage
    a last chunk with no choices and the usage; then [DONE]."""
    tokenizer = state.runner.tokenizer
    head = {
        "id": shape.new_id(),
        "object": "chat.completion.chunk" if shape.chat else "text_completion",
        "created": int(time.time()),
        "model": shape.model,
        "system_fingerprint": prepared.system_fingerprint,
    }

    rows = len(prepared.requests)
    offsets = [len(echo_text(shape, prepared, i)) for i in range(rows)]  # text_offset of the next token

    def chunk(choice: dict[str, Any]) -> str:
        body: dict[str, Any] = {**head, "choices": [choice]}
        if shape.include_usage:
            body["usage"] = None
        return sse(body)

    def content(
        index: int, text: str, event: TokenEvent | None = None, finish_reason: str | None = None
    ) -> str:
        choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": finish_reason}
        if shape.chat:
            choice["delta"] = {"content": text} if finish_reason is None else {}
            if shape.logprobs and event is not None:
                choice["logprobs"] = chat_logprobs(tokenizer, [event])
        else:
            choice["text"] = text
            if shape.logprobs and event is not None:
                choice["logprobs"] = completion_logprobs(tokenizer, [event], offsets[index])
        return chunk(choice)

    for i in range(rows):
        if shape.chat:
            yield chunk(
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            )
        elif shape.echo is not None:
            yield content(i, echo_text(shape, prepared, i))
    completion = 0
    async with contextlib.aclosing(service.events(state, prepared)) as events:
        async for index, event in events:
            if event.finish_reason in ERROR_CODES:
                code, status = ERROR_CODES[event.finish_reason]
                yield sse(openai_body(status, f"choice {index}: {event.error or code}", None, code))
                return
            if event.token_id is not None:
                completion += 1
            if event.text or (shape.logprobs and event.token_id is not None):
                yield content(index, event.text, event)
                if event.token_id is not None and not shape.chat:
                    offsets[index] += len(token_piece(tokenizer, event.token_id)[0])
            if event.finish_reason is not None:
                yield content(index, "", finish_reason=finish(event.finish_reason))
    if shape.include_usage:
        yield sse({**head, "choices": [], "usage": usage(prepared, completion)})
    yield sse("[DONE]")
