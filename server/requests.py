"""Data passed between the HTTP side and the engine thread."""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass, field

from prompt_store import TaskPrompt

_ids = itertools.count(1)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 -> off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # over the row's generated tokens (server.sampling): 0 / 0 / 1 -> off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: int | None = None  # None -> off; k -> each token's log-prob and the k most likely


@dataclass(slots=True)
class TokenEvent:
    """One step of output. `text` is the newly decoded text (may be empty mid-codepoint). Not frozen: the
    engine builds one per row per step, and a frozen dataclass pays an object.__setattr__ per field; nothing
    changes an event after it is sent."""

    token_id: int | None
    text: str
    finish_reason: str | None = None  # stop | length | cancelled | timeout | error
    error: str | None = None
    logprob: float | None = None  # of token_id, when the request asked for logprobs
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token id, log-prob), most likely first


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    task: TaskPrompt | None = None  # None -> bare model
    deadline: float | None = None  # time.monotonic() value
    request_id: int = field(default_factory=lambda: next(_ids))
    cancelled: threading.Event = field(default_factory=threading.Event)
    http_request_id: str | None = None  # the X-Request-ID of the HTTP request (server.request_id)
    admitted_at: float | None = None  # time.monotonic() when the engine took it from the queue
    cached_tokens: int = 0  # prompt tokens whose KV came from the prompt cache (set at admission)
    # filled in by Engine.submit: where the engine thread delivers events
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue[TokenEvent] | None = None

    @property
    def log_extra(self) -> dict[str, str]:
        """`extra=` for log lines about this request on other threads: they show its HTTP request id."""
        return {"request_id": self.http_request_id or "-"}
