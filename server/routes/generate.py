"""POST /generate: JSON or server-sent events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from server import service
from server.deps import ApiKey, StateDep
from server.schemas import ERROR_RESPONSES, GenerateRequest, GenerateResponse, Timings, Usage
from server.service import Prepared
from server.state import ServerState

router = APIRouter(tags=["generate"], dependencies=[ApiKey], responses=ERROR_RESPONSES)


async def prepare_generate(state: ServerState, body: GenerateRequest) -> Prepared:
    messages = [m.model_dump() for m in body.messages] if body.messages is not None else None
    prompt_ids = service.tokenize(state, body.prompt, messages)
    params = service.sampling_params(
        state,
        body.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop,
    )
    return await service.prepare(state, body.task_id, prompt_ids, params)


def sse(data: dict[str, object] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def stream_events(state: ServerState, prepared: Prepared) -> AsyncIterator[str]:
    n = 0
    async for event in service.events(state, prepared):
        if event.token_id is not None:
            n += 1
        chunk: dict[str, object] = {"text": event.text, "token": event.token_id}
        if event.finish_reason is not None:
            chunk.update(
                finish_reason=event.finish_reason,
                task_id=prepared.task_id,
                task_version=prepared.task_version,
                usage={
                    "prompt_tokens": prepared.prompt_tokens,
                    "virtual_tokens": prepared.virtual_tokens,
                    "completion_tokens": n,
                },
            )
            if event.error:
                chunk["error"] = event.error
        yield sse(chunk)
    yield sse("[DONE]")


@router.post(
    "/generate", response_model=GenerateResponse, responses={200: {"content": {"text/event-stream": {}}}}
)
async def generate(body: GenerateRequest, state: StateDep) -> GenerateResponse | StreamingResponse:
    """Generate with a task's soft prompt (or the bare model when task_id is omitted or 'base')."""
    prepared = await prepare_generate(state, body)
    if body.stream:
        return service.event_stream(state, prepared, stream_events(state, prepared))
    out = await service.run_to_completion(state, prepared)
    return GenerateResponse(
        task_id=prepared.task_id,
        task_version=prepared.task_version,
        text=out.text,
        tokens=out.tokens,
        finish_reason=out.finish_reason,
        usage=Usage(
            prompt_tokens=prepared.prompt_tokens,
            virtual_tokens=prepared.virtual_tokens,
            completion_tokens=len(out.tokens),
        ),
        timings=Timings(time_to_first_token_ms=out.ttft_ms, total_ms=out.total_ms),
    )
