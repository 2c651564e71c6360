"""Generation flow between the HTTP routes and the engine: tokenize, check limits, pin the task, run."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from prompt_store.cache import Lease
from server.errors import DeadlineExceeded, GenerationFailed, LimitExceeded, NotReady, Overloaded
from server.requests import GenerationRequest, SamplingParams, TaskPrompt, TokenEvent
from server.schemas import DEFAULT_NEW_TOKENS
from server.state import ServerState
from server.waiting import EngineStopped, QueueFull

BASE_TASK = "base"


@dataclass
class Prepared:
    """A request ready to submit: its pinned task version and its token counts."""

    request: GenerationRequest
    task_id: str
    task_version: int
    prompt_tokens: int
    virtual_tokens: int
    lease: Lease | None = None
    submitted_at: float = field(default_factory=time.monotonic)
    submitted: bool = False

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def abandon(self) -> None:
        """After a response ends however it ends: stop the request if still running, unpin the task."""
        self.request.cancelled.set()
        self.release()


@dataclass
class Outcome:
    text: str
    tokens: list[int]
    finish_reason: str
    ttft_ms: float | None
    total_ms: float


def tokenize(state: ServerState, prompt: str | None, messages: Sequence[dict[str, str]] | None) -> list[int]:
    tokenizer = state.runner.tokenizer
    if messages is not None:
        if getattr(tokenizer, "chat_template", None):
            ids: Any = tokenizer.apply_chat_template(
                list(messages), tokenize=True, add_generation_prompt=True
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
    assert prompt is not None
    return [int(i) for i in tokenizer(prompt)["input_ids"]]


def sampling_params(state: ServerState, max_new_tokens: int | None, **kwargs: Any) -> SamplingParams:
    cap = state.settings.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = min(DEFAULT_NEW_TOKENS, cap)
    if max_new_tokens > cap:
        raise LimitExceeded(
            f"max_new_tokens={max_new_tokens} exceeds the limit of {cap}", field="max_new_tokens"
        )
    kwargs["stop"] = tuple(kwargs.get("stop") or ())
    return SamplingParams(max_new_tokens=max_new_tokens, **kwargs)


async def prepare(
    state: ServerState, task_id: str | None, prompt_ids: list[int], params: SamplingParams
) -> Prepared:
    """Pin the task's current version and check every token limit (virtual tokens included)."""
    if state.draining:
        raise NotReady("server is shutting down", retry_after=5)
    lease = None
    task = None
    if task_id not in (None, BASE_TASK):
        lease = await run_in_threadpool(state.cache.acquire, task_id)
        task = TaskPrompt(lease.task_id, lease.version, lease.sha256, lease.method, lease.prompt)
    try:
        virtual = task.prompt.num_virtual_tokens if task else 0
        position = task.prompt.next_position if task else 0
        n_prompt = len(prompt_ids)
        limit = state.settings.max_prompt_tokens
        if n_prompt == 0:
            raise LimitExceeded("prompt is empty after tokenization", field="prompt")
        if n_prompt + virtual > limit:
            raise LimitExceeded(
                f"prompt has {n_prompt} tokens + {virtual} virtual tokens = {n_prompt + virtual}; "
                f"the limit is {limit}",
                field="prompt",
            )
        context = state.runner.max_context
        total = position + n_prompt + params.max_new_tokens
        if total > context:
            raise LimitExceeded(
                f"prompt ({n_prompt} tokens) + virtual positions ({position}) + max_new_tokens "
                f"({params.max_new_tokens}) = {total} exceeds the model context of {context}",
                field="max_new_tokens",
            )
        deadline = time.monotonic() + state.settings.request_timeout_s
        request = GenerationRequest(prompt_ids=prompt_ids, params=params, task=task, deadline=deadline)
        return Prepared(
            request,
            task_id=task.task_id if task else BASE_TASK,
            task_version=task.version if task else 0,
            prompt_tokens=n_prompt,
            virtual_tokens=virtual,
            lease=lease,
        )
    except BaseException:
        if lease is not None:
            lease.release()
        raise


def submit(state: ServerState, prepared: Prepared) -> None:
    """Hand the request to the engine; a full queue or a stopped engine raises (and unpins the task)."""
    try:
        state.engine.submit(prepared.request)
        prepared.submitted = True
    except EngineStopped as exc:
        prepared.release()
        raise NotReady("server is shutting down", retry_after=5) from exc
    except QueueFull as exc:
        prepared.release()
        raise Overloaded(
            f"queue is full ({state.settings.max_queue} waiting); retry later", retry_after=1
        ) from exc


async def events(state: ServerState, prepared: Prepared) -> AsyncIterator[TokenEvent]:
    """Submit (unless already submitted) and yield engine events until the final one.

    Cancels the request if the consumer goes away.
    """
    if not prepared.submitted:
        submit(state, prepared)
    queue = prepared.request.events
    assert queue is not None
    finished = False
    first = True
    try:
        while not finished:
            event = await queue.get()
            if first and event.token_id is not None:
                first = False
                state.metrics.ttft.labels(task=prepared.task_id).observe(
                    time.monotonic() - prepared.submitted_at
                )
            if event.token_id is not None:
                state.metrics.tokens.labels(task=prepared.task_id).inc()
            finished = event.finish_reason is not None
            if finished:
                state.metrics.requests.labels(task=prepared.task_id, finish_reason=event.finish_reason).inc()
                state.metrics.latency.labels(task=prepared.task_id).observe(
                    time.monotonic() - prepared.submitted_at
                )
            yield event
    finally:
        if not finished:
            prepared.request.cancelled.set()
        prepared.release()


def event_stream(state: ServerState, prepared: Prepared, body: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events for `body` (built on `events`). The request is submitted here, before any header
    is sent, so a full queue is a 429 response and not a 200 whose stream breaks off."""
    submit(state, prepared)
    return StreamingResponse(
        body, media_type="text/event-stream", background=BackgroundTask(prepared.abandon)
    )


async def run_to_completion(state: ServerState, prepared: Prepared) -> Outcome:
    state.metrics.prompt_tokens.labels(task=prepared.task_id).inc(prepared.prompt_tokens)
    text: list[str] = []
    tokens: list[int] = []
    ttft: float | None = None
    finish = "error"
    async for event in events(state, prepared):
        if event.token_id is not None:
            if ttft is None:
                ttft = (time.monotonic() - prepared.submitted_at) * 1000
            tokens.append(event.token_id)
        text.append(event.text)
        if event.finish_reason is not None:
            finish = event.finish_reason
            if finish == "error":
                raise GenerationFailed(f"generation failed: {event.error or 'internal error'}")
            if finish == "timeout":
                raise DeadlineExceeded(
                    f"request exceeded its deadline of {state.settings.request_timeout_s:g} s",
                    field="timeout",
                )
    total = (time.monotonic() - prepared.submitted_at) * 1000
    return Outcome("".join(text), tokens, finish, ttft, total)
