"""Data passed between the HTTP side and the engine thread."""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass, field

from prompt_store import SoftPrompt

_ids = itertools.count(1)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 -> off
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskPrompt:
    """A task's serving form pinned for one request. `key` identifies the version for device caches."""

    task_id: str
    version: int
    sha256: str
    method: str
    prompt: SoftPrompt

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.task_id, self.version, self.sha256)


@dataclass(frozen=True)
class TokenEvent:
    """One step of output. `text` is the newly decoded text (may be empty mid-codepoint)."""

    token_id: int | None
    text: str
    finish_reason: str | None = None  # stop | length | cancelled | timeout | error
    error: str | None = None


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    task: TaskPrompt | None = None  # None -> bare model
    deadline: float | None = None  # time.monotonic() value
    request_id: int = field(default_factory=lambda: next(_ids))
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled in by Engine.submit: where the engine thread delivers events
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue[TokenEvent] | None = None
