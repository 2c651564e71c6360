"""OpenAI-compatible /v1/completions and /v1/chat/completions (`model` = task id)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from server import service
from server.deps import ApiKey, StateDep
from server.schemas import ERROR_RESPONSES, ChatCompletionRequest, CompletionRequest, OpenAIBase
from server.service import Prepared
from server.state import ServerState

STREAM_OR_JSON: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"application/json": {}, "text/event-stream": {}},
        "description": "JSON, or server-sent events when `stream`",
    }
}
router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[ApiKey], responses=ERROR_RESPONSES)


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


async def _prepare(state: ServerState, body: OpenAIBase, prompt: str | None, messages: Any) -> Prepared:
    ids = service.tokenize(state, prompt, messages)
    params = service.sampling_params(
        state,
        body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_list(),
    )
    return await service.prepare(state, body.model, ids, params)


def _usage(prepared: Prepared, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prepared.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prepared.prompt_tokens + completion,
    }


async def _stream(state: ServerState, prepared: Prepared, kind: str, model: str) -> AsyncIterator[str]:
    rid, created = f"{kind}-{uuid.uuid4().hex[:24]}", int(time.time())
    obj = "chat.completion.chunk" if kind == "chatcmpl" else "text_completion"
    async for event in service.events(state, prepared):
        finish = _finish(event.finish_reason) if event.finish_reason else None
        if kind == "chatcmpl":
            choice: dict[str, Any] = {"index": 0, "delta": {"content": event.text}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": event.text, "finish_reason": finish}
        chunk = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


@router.post("/completions", response_model=None, responses=STREAM_OR_JSON)
async def completions(body: CompletionRequest, state: StateDep) -> dict[str, Any] | StreamingResponse:
    prepared = await _prepare(state, body, body.prompt, None)
    if body.stream:
        return service.event_stream(state, prepared, _stream(state, prepared, "cmpl", body.model))
    out = await service.run_to_completion(state, prepared)
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": [
            {"index": 0, "text": out.text, "finish_reason": _finish(out.finish_reason), "logprobs": None}
        ],
        "usage": _usage(prepared, len(out.tokens)),
    }


@router.post("/chat/completions", response_model=None, responses=STREAM_OR_JSON)
async def chat_completions(
    body: ChatCompletionRequest, state: StateDep
) -> dict[str, Any] | StreamingResponse:
    messages = [m.model_dump() for m in body.messages]
    prepared = await _prepare(state, body, None, messages)
    if body.stream:
        return service.event_stream(state, prepared, _stream(state, prepared, "chatcmpl", body.model))
    out = await service.run_to_completion(state, prepared)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": out.text},
                "finish_reason": _finish(out.finish_reason),
            }
        ],
        "usage": _usage(prepared, len(out.tokens)),
    }
