"""OpenAI-compatible routes: /v1/models, /v1/completions and /v1/chat/completions (`model` = task id).

Parameters: server.openai_schemas (honoured, no-op or refused, each named); shapes: server.openai_format;
errors on /v1/* are OpenAI's {"error": {"message", "type", "param", "code"}} (server.errors).
"""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from prompt_store import NotFound, validate_task_id
from prompt_store.backends import TaskInfo
from server import openai_format, prompt_input, service
from server.deps import ApiKey, StateDep
from server.errors import LimitExceeded
from server.openai_format import Shape
from server.openai_schemas import MAX_ROWS, ChatCompletionRequest, CompletionRequest, OpenAIBase
from server.prompt_input import pinned
from server.schemas import bias_pairs
from server.service import BASE_TASK, Prepared
from server.state import ServerState

log = logging.getLogger("softserve.openai")
STARTED = int(time.time())  # `created` of the bare model: when this server process started


class OpenAIError(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error (4xx) or server_error (5xx)")
    param: str | None = Field(description="the request field at fault")
    code: str | None = Field(description="e.g. limit, unsupported_parameter, model_not_found, queue_full")


class OpenAIErrorBody(BaseModel):
    error: OpenAIError


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": OpenAIErrorBody, "description": text}
    for status, text in {
        400: "an unsupported parameter or value (named in `param`)",
        401: "missing or invalid key",
        404: "unknown model (task id)",
        413: "body over SOFTSERVE_MAX_BODY_BYTES",
        422: "invalid field or over a limit (named in `param` and the message)",
        429: "queue full; retry after Retry-After seconds",
        500: "generation failed",
        503: "not ready: store unreachable or draining",
        504: "request deadline exceeded",
    }.items()
}
STREAM_OR_JSON: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"application/json": {}, "text/event-stream": {}},
        "description": "JSON, or server-sent events when `stream`",
    }
}
router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[ApiKey], responses=ERRORS)


# ---- models -----------------------------------------------------------------------------------------------


def _created(info: TaskInfo) -> int:
    try:
        return int(datetime.fromisoformat(info.created_at.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


def _model(state: ServerState, info: TaskInfo | None) -> dict[str, Any]:
    """A model object; softserve adds `method` and `version` (the bare model: method none, version 0)."""
    if info is None:
        return {
            "id": BASE_TASK,
            "object": "model",
            "created": STARTED,
            "owned_by": "softserve",
            "method": "none",
            "version": 0,
            "root": state.runner.name,
        }
    return {
        "id": info.task_id,
        "object": "model",
        "created": _created(info),
        "owned_by": "softserve",
        "method": info.method,
        "version": info.version,
        "root": state.runner.name,
    }


@router.get("/models")
async def list_models(state: StateDep) -> dict[str, Any]:
    """`base` (the bare model) and every task, as OpenAI model objects."""
    infos = await run_in_threadpool(state.store.list)
    return {"object": "list", "data": [_model(state, None), *(_model(state, i) for i in infos)]}


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, state: StateDep) -> dict[str, Any]:
    if model_id == BASE_TASK:
        return _model(state, None)
    try:
        validate_task_id(model_id)
    except Exception as exc:
        raise NotFound(f"The model '{model_id[:64]}' does not exist", field="model") from exc
    return _model(state, await run_in_threadpool(state.store.info, model_id))


# ---- completions ----------------------------------------------------------------------------------------


def _params(
    state: ServerState, body: OpenAIBase, max_new: int | None, limit_field: str, logprobs: int | None
) -> Any:
    return service.sampling_params(
        state,
        max_new,
        limit_field=limit_field,
        temperature=body.temperature or 0.0,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=body.stop_list(),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=bias_pairs(body.logit_bias),
        logprobs=logprobs,
    )


def _check(body: OpenAIBase, prompts: int) -> None:
    """Refused parameters (400 naming them), the row limit, and the user logged as a hash only."""
    refusal = body.refusal()
    if refusal is not None:
        raise refusal
    if prompts * body.choices() > MAX_ROWS:
        raise LimitExceeded(
            f"n ({body.choices()}) x prompts ({prompts}) = {prompts * body.choices()} completions; "
            f"the limit is {MAX_ROWS} per request",
            field="n",
        )
    if body.user:
        log.info(
            "openai request user=%s", hashlib.sha256(body.user.encode("utf-8", "replace")).hexdigest()[:16]
        )


async def _run(
    state: ServerState, shape: Shape, prepared: Prepared, stream: bool, request: Request
) -> dict[str, Any] | StreamingResponse:
    if stream:
        return service.event_stream(state, prepared, openai_format.stream(state, shape, prepared))
    outcomes = await service.run_to_completion(state, prepared, request.receive)
    return openai_format.response(state, shape, prepared, outcomes)


@router.post("/completions", response_model=None, responses=STREAM_OR_JSON)
async def completions(
    body: CompletionRequest, state: StateDep, request: Request
) -> dict[str, Any] | StreamingResponse:
    prompts = body.prompts()
    _check(body, len(prompts))
    params = _params(state, body, body.max_tokens, "max_tokens", body.logprobs)
    texts = [p for p in prompts if isinstance(p, str)]
    async with pinned(state, body.model) as lease:  # its input format decides a text prompt's tokens
        if texts:
            ids = [await prompt_input.prompt_ids(state, t, None, lease) for t in texts]
        else:
            ids = [service.check_token_ids(state, p, "prompt") for p in prompts if isinstance(p, list)]
            texts = [state.runner.decode(i) for i in ids] if body.echo else []
        prepared = await service.prepare_many(
            state, body.model, ids, params, n=body.choices(), limit_field="max_tokens", lease=lease
        )
    shape = Shape(
        chat=False,
        model=body.model,
        logprobs=body.logprobs is not None,
        echo=texts if body.echo else None,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )
    return await _run(state, shape, prepared, bool(body.stream), request)


@router.post("/chat/completions", response_model=None, responses=STREAM_OR_JSON)
async def chat_completions(
    body: ChatCompletionRequest, state: StateDep, request: Request
) -> dict[str, Any] | StreamingResponse:
    _check(body, 1)
    messages = body.template_messages()
    max_new, limit_field = body.max_new()
    params = _params(state, body, max_new, limit_field, body.top_k_logprobs())
    async with pinned(state, body.model) as lease:  # its recorded system prompt applies to the messages
        ids = await prompt_input.prompt_ids(state, None, messages, lease)
        prepared = await service.prepare_many(
            state,
            body.model,
            [ids],
            params,
            n=body.choices(),
            limit_field=limit_field,
            prompt_field="messages",
            lease=lease,
        )
    shape = Shape(
        chat=True,
        model=body.model,
        logprobs=bool(body.logprobs),
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )
    return await _run(state, shape, prepared, bool(body.stream), request)
