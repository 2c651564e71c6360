"""POST /generate: JSON or server-sent events; n choices, log-probs, penalties and logit_bias as on /v1."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from prompt_store.cache import Lease
from server import prompt_input, service
from server.deps import ApiKey, StateDep
from server.prompt_input import pinned
from server.requests import TokenEvent
from server.schemas import (
    ERROR_RESPONSES,
    GenerateChoice,
    GenerateRequest,
    GenerateResponse,
    Timings,
    TokenLogprob,
    TopLogprob,
    Usage,
    bias_pairs,
)
from server.service import Prepared
from server.state import ServerState
from server.tokenization import token_piece

router = APIRouter(tags=["generate"], dependencies=[ApiKey], responses=ERROR_RESPONSES)


async def prepare_generate(state: ServerState, body: GenerateRequest) -> Prepared:
    """The task is pinned first: its input format decides how the prompt is tokenized."""
    async with pinned(state, body.task_id) as lease:
        return await _prepare(state, body, lease)


async def _prepare(state: ServerState, body: GenerateRequest, lease: Lease | None) -> Prepared:
    messages = [m.model_dump() for m in body.messages] if body.messages is not None else None
    prompt_ids = await prompt_input.prompt_ids(state, body.prompt, messages, lease)
    params = service.sampling_params(
        state,
        body.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=bias_pairs(body.logit_bias),
        logprobs=body.logprobs,
    )
    field = "prompt" if body.prompt is not None else "messages"
    return await service.prepare_many(
        state, body.task_id, [prompt_ids], params, n=body.n, prompt_field=field, lease=lease
    )


def token_logprobs(state: ServerState, events: Sequence[TokenEvent]) -> list[TokenLogprob]:
    tokenizer = state.runner.tokenizer

    def top(token: int, logprob: float) -> TopLogprob:
        return TopLogprob(token=token, text=token_piece(tokenizer, token)[0], logprob=logprob)

    return [
        TokenLogprob(
            **top(e.token_id, e.logprob).model_dump(), top_logprobs=[top(t, lp) for t, lp in e.top_logprobs]
        )
        for e in events
        if e.token_id is not None and e.logprob is not None
    ]


def sse(data: dict[str, object] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def stream_events(state: ServerState, prepared: Prepared) -> AsyncIterator[str]:
    """A chunk per event ({"text", "token"}; "index" when n > 1; "logprob" and "top_logprobs" when asked);
    a choice's last chunk has its finish_reason, the task version and its usage."""
    counts = [0] * len(prepared.requests)
    async for index, event in service.events(state, prepared):
        if event.token_id is not None:
            counts[index] += 1
        chunk: dict[str, object] = {"text": event.text, "token": event.token_id}
        if prepared.n > 1:
            chunk["index"] = index
        if event.logprob is not None:
            chunk["logprob"] = event.logprob
            chunk["top_logprobs"] = [t.model_dump() for t in token_logprobs(state, [event])[0].top_logprobs]
        if event.finish_reason is not None:
            chunk.update(
                finish_reason=event.finish_reason,
                task_id=prepared.task_id,
                task_version=prepared.task_version,
                usage={
                    "prompt_tokens": prepared.prompt_tokens,
                    "virtual_tokens": prepared.virtual_tokens,
                    "completion_tokens": counts[index],
                    "cached_tokens": prepared.cached_tokens,
                },
            )
            if event.error:
                chunk["error"] = event.error
        yield sse(chunk)
    yield sse("[DONE]")


@router.post(
    "/generate", response_model=GenerateResponse, responses={200: {"content": {"text/event-stream": {}}}}
)
async def generate(
    body: GenerateRequest, state: StateDep, request: Request
) -> GenerateResponse | StreamingResponse:
    """Generate with a task's soft prompt (or the bare model when task_id is omitted or 'base')."""
    prepared = await prepare_generate(state, body)
    if body.stream:
        return service.event_stream(state, prepared, stream_events(state, prepared))
    outcomes = await service.run_to_completion(state, prepared, request.receive)
    asked = body.logprobs is not None
    choices = [
        GenerateChoice(
            index=out.index,
            text=out.text,
            tokens=out.tokens,
            finish_reason=out.finish_reason,
            logprobs=token_logprobs(state, out.token_events) if asked else None,
        )
        for out in outcomes
    ]
    first = outcomes[0]
    return GenerateResponse(
        task_id=prepared.task_id,
        task_version=prepared.task_version,
        text=first.text,
        tokens=first.tokens,
        finish_reason=first.finish_reason,
        usage=Usage(
            prompt_tokens=prepared.prompt_tokens,
            virtual_tokens=prepared.virtual_tokens,
            completion_tokens=sum(len(out.tokens) for out in outcomes),
            cached_tokens=prepared.cached_tokens,
        ),
        timings=Timings(time_to_first_token_ms=first.ttft_ms, total_ms=max(out.total_ms for out in outcomes)),
        logprobs=choices[0].logprobs,
        choices=choices if body.n > 1 else None,
    )
