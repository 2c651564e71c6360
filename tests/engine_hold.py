"""Hold a running engine thread at the start of a step (tests that need requests to meet in one step)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from prompt_store import SoftPrompt, TaskPrompt


class Hold:
    """A prefix warm-up job whose completion callback waits: the engine thread stops at the start of the
    step that picks it up (before it takes waiting requests) until `release()`, as a slow step would."""

    def __init__(self, engine: Any, hidden_size: int = 64) -> None:
        self.entered, self.released = threading.Event(), threading.Event()
        prompt = SoftPrompt(embeds=torch.zeros(1, hidden_size), next_position=1)  # [1, d]
        engine.warm(TaskPrompt("hold", 1, "hold", "prompt_tuning", prompt), self._done)

    def _done(self, ok: bool) -> None:  # on the engine thread
        self.entered.set()
        self.released.wait(30)

    def wait(self) -> Hold:
        assert self.entered.wait(10), "the engine did not pick up the warm-up job"
        return self

    def release(self) -> None:
        self.released.set()


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.002)
