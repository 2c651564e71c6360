"""Generation flow between the HTTP routes and the engine: tokenize, check limits, pin the task, run.

One HTTP request may ask for several completions: `n` choices of each of one or more prompts. Each choice
is its own engine row (its own request, sampled with its own seed, derived from the request's `seed`);
they share the pinned task version and are submitted together (all or none), and their events arrive
on one queue tagged with the choice index (prompt index x n + choice).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse
from starlette.types import Receive

from prompt_store import TaskPrompt
from prompt_store.cache import Lease
from server.errors import DeadlineExceeded, GenerationFailed, LimitExceeded, NotReady, Overloaded
from server.prompt_input import BASE_TASK, pin
from server.request_id import current_request_id
from server.requests import GenerationRequest, SamplingParams, TokenEvent
from server.schemas import DEFAULT_NEW_TOKENS
from server.state import ServerState
from server.waiting import Deliver, EngineStopped, QueueFull

SEED_MASK = 2**63 - 1
log = logging.getLogger("softserve.service")

Tagged = tuple[int, TokenEvent]  # (choice index, event)


@dataclass
class Prepared:
    """A request ready to submit: one engine request per choice, the pinned task version, token counts."""

    requests: list[GenerationRequest]  # choice i = prompt i // n, sample i % n
    task_id: str
    task_version: int
    prompt_counts: list[int]  # tokens of each prompt
    virtual_tokens: int
    lease: Lease | None = None
    n: int = 1
    submitted_at: float = field(default_factory=time.monotonic)
    submitted: bool = False
    queue: asyncio.Queue[Tagged] | None = None

    @property
    def request(self) -> GenerationRequest:
        """The first (often only) choice's request."""
        return self.requests[0]

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens of the request: each prompt counted once, whatever n is."""
        return sum(self.prompt_counts)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose KV came from the prompt cache: each prompt counted once (its first choice)."""
        return sum(self.requests[i * self.n].cached_tokens for i in range(len(self.prompt_counts)))

    @property
    def system_fingerprint(self) -> str:
        """The task version that answered: `task@version`, or `base` for the bare model."""
        return BASE_TASK if self.task_id == BASE_TASK else f"{self.task_id}@{self.task_version}"

    def cancel(self) -> None:
        for req in self.requests:
            req.cancelled.set()

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def abandon(self) -> None:
        """After a response ends however it ends: stop the requests still running, unpin the task."""
        self.cancel()
        self.release()


@dataclass
class Outcome:
    """One choice, run to its end: its text, tokens (with log-probs when asked) and timings."""

    index: int
    text: str
    tokens: list[int]
    finish_reason: str
    ttft_ms: float | None
    total_ms: float
    token_events: list[TokenEvent] = field(default_factory=list)  # events that carry a token


def check_token_ids(state: ServerState, ids: Sequence[int], field_name: str) -> list[int]:
    """Token ids sent by a client (a completions prompt, a logit_bias key) must be in the vocabulary."""
    vocab = state.runner.fingerprint.vocab_size
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise LimitExceeded(
            f"{field_name}: token id {bad} is outside the vocabulary [0, {vocab})", field=field_name
        )
    return list(ids)


def sampling_params(
    state: ServerState, max_new_tokens: int | None, *, limit_field: str = "max_new_tokens", **kwargs: Any
) -> SamplingParams:
    """Params with the default and the configured cap of max_new_tokens, named by the client's field."""
    cap = state.settings.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = min(DEFAULT_NEW_TOKENS, cap)
    if max_new_tokens > cap:
        raise LimitExceeded(f"{limit_field}={max_new_tokens} exceeds the limit of {cap}", field=limit_field)
    kwargs["stop"] = tuple(kwargs.get("stop") or ())
    bias = kwargs.get("logit_bias") or ()
    check_token_ids(state, [t for t, _ in bias], "logit_bias")
    kwargs["logit_bias"] = tuple(bias)
    return SamplingParams(max_new_tokens=max_new_tokens, **kwargs)


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice 0 keeps the request's seed (n=1 is unchanged); choice i > 0 gets a distinct derived one."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.sha256(f"softserve-seed:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & SEED_MASK


async def prepare(
    state: ServerState, task_id: str | None, prompt_ids: list[int], params: SamplingParams
) -> Prepared:
    """One prompt, one choice (`prepare_many` with defaults)."""
    return await prepare_many(state, task_id, [prompt_ids], params)


async def prepare_many(
    state: ServerState,
    task_id: str | None,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    n: int = 1,
    limit_field: str = "max_new_tokens",
    prompt_field: str = "prompt",
    lease: Lease | None = None,
) -> Prepared:
    """Pin the task's current version (or take `lease`, from server.prompt_input) and check every token
    limit (virtual tokens included) per prompt; `n` requests per prompt. Limits are named by the client's
    fields (`limit_field`, `prompt_field`)."""
    if lease is None:
        lease = await pin(state, task_id)
    elif state.draining:
        lease.release()
        raise NotReady("server is shutting down", retry_after=5)
    task = lease.task if lease is not None else None
    try:
        for i, ids in enumerate(prompts):
            name = prompt_field if len(prompts) == 1 else f"{prompt_field}[{i}]"
            check_fit(state, task, len(ids), params.max_new_tokens, name, limit_field)
        deadline = time.monotonic() + state.settings.request_timeout_s
        http_id = current_request_id()
        requests = [
            GenerationRequest(
                prompt_ids=ids,
                params=replace(params, seed=choice_seed(params.seed, k)),
                task=task,
                deadline=deadline,
                http_request_id=http_id,
            )
            for ids in prompts
            for k in range(n)
        ]
        return Prepared(
            requests,
            task_id=task.task_id if task else BASE_TASK,
            task_version=task.version if task else 0,
            prompt_counts=[len(ids) for ids in prompts],
            virtual_tokens=task.prompt.num_virtual_tokens if task else 0,
            lease=lease,
            n=n,
        )
    except BaseException:
        if lease is not None:
            lease.release()
        raise


def check_fit(
    state: ServerState,
    task: TaskPrompt | None,
    n_prompt: int,
    max_new: int,
    prompt_field: str,
    limit_field: str,
) -> None:
    """A prompt fits the prompt limit (virtual tokens included) and, with max_new tokens, the context."""
    virtual = task.prompt.num_virtual_tokens if task else 0
    position = task.prompt.next_position if task else 0
    limit = state.settings.max_prompt_tokens
    if n_prompt == 0:
        raise LimitExceeded(f"{prompt_field} is empty after tokenization", field=prompt_field)
    if n_prompt + virtual > limit:
        raise LimitExceeded(
            f"{prompt_field} has {n_prompt} tokens + {virtual} virtual tokens = {n_prompt + virtual}; "
            f"the limit is {limit}",
            field=prompt_field,
        )
    columns, capacity = virtual + n_prompt + max_new, state.engine.row_capacity
    if columns > capacity:
        raise LimitExceeded(
            f"{prompt_field} ({n_prompt} tokens) + virtual tokens ({virtual}) + {limit_field} ({max_new}) = "
            f"{columns} exceeds the KV row capacity of {capacity} tokens (SOFTSERVE_KV_ROW_TOKENS)",
            field=limit_field,
        )
    context = state.runner.max_context
    total = position + n_prompt + max_new
    if total > context:
        raise LimitExceeded(
            f"{prompt_field} ({n_prompt} tokens) + virtual positions ({position}) + {limit_field} "
            f"({max_new}) = {total} exceeds the model context of {context}",
            field=limit_field,
        )


def submit(state: ServerState, prepared: Prepared) -> None:
    """Hand every choice to the engine, all or none: a full queue or a stopped engine raises (and cancels
    the choices already queued, and unpins the task)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Tagged] = asyncio.Queue()
    prepared.queue = queue

    def deliver_to(index: int) -> Deliver:
        def deliver(event: TokenEvent) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (index, event))

        return deliver

    try:
        for i, req in enumerate(prepared.requests):
            state.engine.enqueue(req, deliver_to(i))
        prepared.submitted = True
    except QueueFull as exc:
        prepared.abandon()
        if isinstance(exc, EngineStopped):
            raise NotReady("server is shutting down", retry_after=5) from exc
        raise Overloaded(
            f"queue is full ({state.settings.max_queue} waiting); retry later", retry_after=1
        ) from exc


async def events(state: ServerState, prepared: Prepared) -> AsyncGenerator[Tagged, None]:
    """Submit (unless already submitted) and yield (choice index, event) until every choice has ended.

    Cancels the requests still running if the consumer goes away.
    """
    if not prepared.submitted:
        submit(state, prepared)
    queue = prepared.queue
    assert queue is not None
    live = set(range(len(prepared.requests)))
    trackers = [  # bounded per-task series (server.metrics), one per engine request
        state.metrics.request(
            prepared.task_id,
            prepared.task_version,
            prepared.submitted_at,
            prepared.prompt_counts[i // prepared.n],
        )
        for i in range(len(prepared.requests))
    ]
    try:
        while live:
            index, event = await queue.get()
            trackers[index].event(event, prepared.requests[index].admitted_at)
            if event.finish_reason is not None:
                live.discard(index)
            yield index, event
    finally:
        if live:
            prepared.cancel()
            gone = sorted(live)
            trackers[gone[0]].client_gone()  # one client, one disconnect; its other choices end cancelled
            for i in gone[1:]:
                trackers[i].finished("cancelled")
            log.info("client went away: request cancelled", extra=prepared.request.log_extra)
        prepared.release()


def event_stream(state: ServerState, prepared: Prepared, body: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events for `body` (built on `events`). The request is submitted here, before any header
    is sent, so a full queue is a 429 response and not a 200 whose stream breaks off."""
    submit(state, prepared)
    return StreamingResponse(
        body, media_type="text/event-stream", background=BackgroundTask(prepared.abandon)
    )


async def cancel_on_disconnect(state: ServerState, receive: Receive, prepared: Prepared) -> None:
    """Wait for the client to go away (its body is already read, so the next ASGI message is
    http.disconnect) and cancel the request: it leaves the queue or the batch at the next engine step."""
    with contextlib.suppress(Exception):
        while (await receive())["type"] != "http.disconnect":
            pass
        prepared.cancel()
        state.metrics.client_disconnects.inc()  # its final event counts it as finish_reason=cancelled
        log.info("client went away: request cancelled")


async def run_to_completion(
    state: ServerState, prepared: Prepared, receive: Receive | None = None
) -> list[Outcome]:
    """Run every choice to its end and collect the outputs (by choice index); with `receive` (the
    request's ASGI channel), a client that disconnects cancels the request as a streaming one does."""
    watcher = None
    if receive is not None:
        watcher = asyncio.create_task(cancel_on_disconnect(state, receive, prepared))
    try:
        return await _collect(state, prepared)
    finally:
        if watcher is not None:
            watcher.cancel()


def raise_for(state: ServerState, event: TokenEvent) -> None:
    """A choice that ended in error or past its deadline fails the whole response."""
    if event.finish_reason == "error":
        raise GenerationFailed(f"generation failed: {event.error or 'internal error'}")
    if event.finish_reason == "timeout":
        raise DeadlineExceeded(
            f"request exceeded its deadline of {state.settings.request_timeout_s:g} s", field="timeout"
        )


async def _collect(state: ServerState, prepared: Prepared) -> list[Outcome]:
    count = len(prepared.requests)
    text: list[list[str]] = [[] for _ in range(count)]
    tokens: list[list[TokenEvent]] = [[] for _ in range(count)]
    ttft: list[float | None] = [None] * count
    finish = ["error"] * count
    ended = [0.0] * count
    async for index, event in events(state, prepared):
        if event.token_id is not None:
            if ttft[index] is None:
                ttft[index] = (time.monotonic() - prepared.submitted_at) * 1000
            tokens[index].append(event)
        text[index].append(event.text)
        if event.finish_reason is not None:
            raise_for(state, event)
            finish[index] = event.finish_reason
            ended[index] = (time.monotonic() - prepared.submitted_at) * 1000
    return [
        Outcome(
            index=i,
            text="".join(text[i]),
            tokens=[e.token_id for e in tokens[i] if e.token_id is not None],
            finish_reason=finish[i],
            ttft_ms=ttft[i],
            total_ms=ended[i],
            token_events=tokens[i],
        )
        for i in range(count)
    ]
