"""The engine: one thread owns the model and the running batch (continuous batching of mixed tasks).

Every step: finished, cancelled and timed-out rows leave; waiting requests are prefilled together (KV prefix
+ prompt, left-padded among themselves) and merged into the running batch; then every row decodes one token.
Each row keeps its own KV prefix, positions (the prompt continues at the prefix's `next_position`), optional
ACCEPT delta and sampling params. An exception fails only the requests of the forward it happened in.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from prompt_store.lru import ByteLRU
from server.batch_state import BatchState, PrefillItem, decode_one_token, prefill
from server.memory import MemoryTrimmer
from server.model_runner import ModelRunner
from server.prefixes import DevicePrefix, PrefixKey, bare_prefix, device_prefix, device_prefixes
from server.requests import GenerationRequest, TaskPrompt, TokenEvent
from server.sampling import TextStream, make_generator, sample_tokens
from server.waiting import Deliver, Pending, WaitingQueue, leave_reason

log = logging.getLogger("softserve.engine")


@dataclass
class _Row:
    """Per-request state while the request is in the running batch."""

    pending: Pending
    stream: TextStream
    generator: torch.Generator | None
    next_pos: int  # position id the next fed token gets
    tokens: list[int] = field(default_factory=list)
    finished: bool = False

    @property
    def req(self) -> GenerationRequest:
        return self.pending.req


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        max_batch_size: int = 32,
        max_queue: int = 256,
        prefix_cache_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.runner = runner
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefix_cache: ByteLRU[PrefixKey, DevicePrefix] = ByteLRU(prefix_cache_bytes)
        self.memory = MemoryTrimmer()  # evicted prefixes' host memory goes back to the OS
        self._inbox = WaitingQueue(max_queue)
        self._cv = self._inbox.cv
        self._rows: list[_Row] = []
        self._state: BatchState | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._abort = False
        self._bare = bare_prefix(runner)
        self._admitting: list[_Row] = []  # rows between their prefill and the merge into the batch
        self._taken = 0  # requests taken from the queue whose admission is under way
        # metrics
        self.tokens_generated = 0
        self.steps = 0
        self.step_errors = 0
        self.finished: dict[str, int] = {}
        self.ttft_samples: deque[float] = deque(maxlen=1024)
        self._recent: deque[tuple[float, int]] = deque(maxlen=4096)

    # ---- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._run, name="softserve-engine", daemon=True)
        self._thread.start()
        log.info("engine started: max_batch_size=%d max_queue=%d", self.max_batch_size, self.max_queue)

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def stop(self, drain_timeout: float = 0.0) -> None:
        """Stop taking requests, let running ones finish for up to `drain_timeout` s, cancel the rest."""
        self._inbox.close()
        with self._cv:
            self._stopping = True
        thread = self._thread
        if thread is not None:
            thread.join(timeout=max(drain_timeout, 0.0))
            with self._cv:
                self._abort = True
                self._cv.notify_all()
            thread.join()
        else:
            self._finish_everything("cancelled")
        log.info("engine stopped")

    # ---- requests ----------------------------------------------------------------------------------------

    def submit(self, req: GenerationRequest) -> GenerationRequest:
        """From the asyncio side: bind req.loop/req.events and queue the request (raises QueueFull)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        req.loop, req.events = loop, events

        def deliver(event: TokenEvent) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        return self.enqueue(req, deliver)

    def enqueue(self, req: GenerationRequest, deliver: Deliver) -> GenerationRequest:
        """Queue a request whose events go to `deliver` (called on the engine thread)."""
        for p, reason in self._inbox.put(Pending(req, deliver), self._queue_room):
            self._send(p, TokenEvent(None, "", finish_reason=reason))
        return req

    def _queue_room(self) -> int:
        """Waiting requests allowed: the queue limit plus the batch slots free at the next step (a row that
        finished this step but is not compacted yet frees its slot; a row being admitted holds one)."""
        live = sum(not r.finished for r in self._rows) + self._taken
        return self.max_queue + max(0, self.max_batch_size - live)

    def generate_sync(self, req: GenerationRequest, timeout: float | None = None) -> list[TokenEvent]:
        """Run one request to the end without asyncio (stepping inline when no engine thread runs)."""
        inbox: queue.Queue[TokenEvent] = queue.Queue()
        self.enqueue(req, inbox.put)
        events: list[TokenEvent] = []
        threaded = self._thread is not None and self._thread.is_alive()
        while not events or events[-1].finish_reason is None:
            if not threaded:
                if inbox.empty():
                    self.step()
                    continue
                events.append(inbox.get_nowait())
            else:
                events.append(inbox.get(timeout=timeout))
        return events

    def cancel(self, request_id: int) -> bool:
        """Cancel a waiting or running request; it leaves at the next step with finish_reason 'cancelled'."""
        for req in self._inbox.requests() + [r.req for r in self._rows]:
            if req.request_id == request_id:
                req.cancelled.set()
                with self._cv:
                    self._cv.notify_all()
                return True
        return False

    def warm(self, task: TaskPrompt, done: Callable[[bool], None]) -> None:
        """Build the task's device prefix at the start of the next step, before a request needs it.

        A new version's first request then costs what a warm one does. `done(ok)` runs on the engine thread.
        """
        if not self._inbox.add_warm((task, done)):
            done(False)

    def _build_warm_prefixes(self) -> None:
        jobs = self._inbox.take_warm()
        if not jobs:
            return
        ok = bool(self._prefixes([t for t, _ in jobs]))
        for _, done in jobs:
            done(ok)

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= 10.0]
        span = now - recent[0][0] if recent else 0.0
        ttft = sorted(self.ttft_samples)
        return {
            "queue_depth": len(self._inbox),
            "batch_size": self.active,
            "tokens_generated": self.tokens_generated,
            "tokens_per_s": sum(n for _, n in recent) / span if span > 0 else 0.0,
            "steps": self.steps,
            "step_errors": self.step_errors,
            "finished": dict(self.finished),
            "ttft_p50_s": ttft[len(ttft) // 2] if ttft else None,
            "ttft_samples": len(ttft),
            "prefix_cache_hits": self.prefix_cache.hits,
            "prefix_cache_misses": self.prefix_cache.misses,
            "prefix_cache_bytes": self.prefix_cache.bytes,
        }

    @property
    def active(self) -> int:
        """Rows running (a row that finished during the current step no longer counts)."""
        return sum(not r.finished for r in self._rows)

    def load(self) -> tuple[int, int]:
        """(running, waiting) read together: running includes requests being admitted, so a request is
        always in exactly one of them from enqueue to its final event."""
        with self._cv:
            return self.active + self._taken, len(self._inbox)

    @property
    def queue_depth(self) -> int:
        return len(self._inbox)

    # ---- the loop ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._inbox.has_work() and not self._rows and not self._stopping:
                    self._cv.wait()
                if self._abort or (self._stopping and not len(self._inbox) and not self._rows):
                    break
            try:
                self.step()
            except Exception:  # a bug outside any forward: fail what is running, keep serving
                log.exception("engine step failed outside a forward; failing the running batch")
                self._fail_rows(self._admitting, "internal error")
                self._fail_rows(self._rows, "internal error")
        self._finish_everything("cancelled")

    def step(self) -> None:
        """One engine iteration: retire, admit (prefill + merge), decode one token for every row."""
        now = time.monotonic()
        before = self.tokens_generated
        self._retire(now)
        self._build_warm_prefixes()
        admitted = self._take_waiting(now)
        try:
            if admitted:
                self._admit(admitted)
        finally:
            self._taken = 0
        if self._rows and self._state is not None:
            self._decode()
        self.steps += 1
        self.memory.after_evictions(self.prefix_cache.evictions)
        if self.tokens_generated > before:
            self._recent.append((time.monotonic(), self.tokens_generated - before))

    def _take_waiting(self, now: float) -> list[Pending]:
        """Waiting requests for the free batch slots, oldest first; abandoned ones leave the queue."""
        with self._cv:  # (re-entrant) so that load() and the queue room never miss the taken ones
            taken, dropped = self._inbox.take(self.max_batch_size - len(self._rows), now)
            self._taken = len(taken)
        for p, reason in dropped:
            self._send(p, TokenEvent(None, "", finish_reason=reason))
        return taken

    def _retire(self, now: float) -> None:
        """Cancelled and past-deadline rows leave the batch (finish_reason cancelled / timeout)."""
        for row in self._rows:
            reason = leave_reason(row.req, now)
            if reason is not None:
                self._finish(row, TokenEvent(None, "", finish_reason=reason))
        self._compact()

    def _admit(self, admitted: list[Pending]) -> None:
        rows: list[_Row] = []
        items: list[PrefillItem] = []
        prefixes = self._prefixes([p.req.task for p in admitted if p.req.task is not None])
        for p in admitted:
            try:
                item = self._prefill_item(p.req, prefixes)
            except Exception as exc:
                log.warning("request %d rejected before prefill: %s", p.req.request_id, type(exc).__name__)
                self._send(p, TokenEvent(None, "", finish_reason="error", error=str(exc)[:300]))
                continue
            if p.req.params.max_new_tokens <= 0:
                self._send(p, TokenEvent(None, "", finish_reason="length"))
                continue
            stream = TextStream(self.runner.decode, p.req.params.stop)
            gen = make_generator(p.req.params, self.runner.device)
            rows.append(_Row(p, stream, gen, next_pos=item.next_position + len(item.ids)))
            items.append(item)
        if not rows:
            return
        self._admitting = rows
        try:
            state, logits = prefill(self.runner, items)  # logits [G, V]
            tokens = sample_tokens(logits, [r.req.params for r in rows], [r.generator for r in rows])
        except Exception as exc:
            self.step_errors += 1
            log.exception("prefill of %d requests failed", len(rows))
            self._fail_rows(rows, f"prefill failed: {type(exc).__name__}: {exc}"[:300])
            self._admitting = []
            return
        for row, token in zip(rows, tokens, strict=True):
            self._accept_token(row, token)
        self._admitting = []
        keep = [i for i, r in enumerate(rows) if not r.finished]
        if not keep:
            return
        if len(keep) < len(rows):
            state.select(keep)
        rows = [rows[i] for i in keep]
        if self._state is not None:
            self._state.merge(state)
        with self._cv:  # rows and the admission count change together, as load() reads them
            self._state, self._rows = (state if self._state is None else self._state), self._rows + rows
            self._taken = 0
        log.debug("admitted %d; batch %d, waiting %d", len(rows), len(self._rows), len(self._inbox))

    def _decode(self) -> None:
        assert self._state is not None
        rows = self._rows
        try:
            logits = decode_one_token(self.runner, self._state, [r.tokens[-1] for r in rows])  # [B, V]
            tokens = sample_tokens(logits, [r.req.params for r in rows], [r.generator for r in rows])
        except Exception as exc:
            self.step_errors += 1
            log.exception("decode step of %d rows failed", len(rows))
            self._fail_rows(rows, f"decode failed: {type(exc).__name__}: {exc}"[:300])
            return
        for row, token in zip(rows, tokens, strict=True):
            row.next_pos += 1
            self._accept_token(row, token)
        self._compact()

    # ---- per-row bookkeeping -----------------------------------------------------------------------------

    def _prefixes(self, tasks: list[TaskPrompt]) -> dict[PrefixKey, DevicePrefix]:
        """The admitted tasks' prefixes, cold embedding prefixes converted in one forward; on any error the
        rows fall back to converting their own prefix (so a failure stays with its request)."""
        try:
            return device_prefixes(self.runner, self.prefix_cache, tasks)
        except Exception:
            log.exception("batched prefix conversion of %d tasks failed; converting one by one", len(tasks))
            return {}

    def _prefill_item(self, req: GenerationRequest, prefixes: dict[PrefixKey, DevicePrefix]) -> PrefillItem:
        """Checks that would otherwise fail the whole prefill group, then the row's prefix and prompt."""
        ids = list(req.prompt_ids)
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.runner.fingerprint.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if req.task is None:
            prefix = self._bare
        else:
            prefix = prefixes.get(req.task.key) or device_prefix(self.runner, self.prefix_cache, req.task)
        if prefix.next_position + len(ids) > self.runner.max_context:
            raise ValueError(
                f"prompt ({len(ids)} tokens) starting at position {prefix.next_position} exceeds the model "
                f"context of {self.runner.max_context}"
            )
        return PrefillItem(prefix.keys, prefix.values, prefix.next_position, ids, prefix.added)

    def _accept_token(self, row: _Row, token: int) -> None:
        """Turn a sampled token into the row's event (and its end, if it is one)."""
        if not row.tokens:
            self.ttft_samples.append(time.monotonic() - row.pending.submitted)
        row.tokens.append(token)
        if token in self.runner.eos_ids:  # never fed back: the row ends here
            self._finish(row, TokenEvent(None, row.stream.flush(), finish_reason="stop"))
            return
        self.tokens_generated += 1
        try:
            text, stopped = row.stream.push(token)
            if stopped:
                event = TokenEvent(token, text, finish_reason="stop")
            elif len(row.tokens) >= row.req.params.max_new_tokens or row.next_pos >= self.runner.max_context:
                event = TokenEvent(token, text + row.stream.flush(), finish_reason="length")
            else:
                event = TokenEvent(token, text)
        except Exception as exc:  # e.g. the tokenizer cannot decode: this row alone fails
            log.exception("request %d: decoding its text failed", row.req.request_id)
            event = TokenEvent(None, "", finish_reason="error", error=f"decode failed: {type(exc).__name__}")
        if event.finish_reason is not None:
            self._finish(row, event)
        else:
            self._send(row.pending, event)

    def _finish(self, row: _Row, event: TokenEvent) -> None:
        row.finished = True
        log.debug(
            "request %d finished: %s after %d tokens",
            row.req.request_id,
            event.finish_reason,
            len(row.tokens),
        )
        self._send(row.pending, event)

    def _send(self, pending: Pending, event: TokenEvent) -> None:
        """Deliver one event; a final event is counted by its finish_reason."""
        if event.finish_reason is not None:
            self.finished[event.finish_reason] = self.finished.get(event.finish_reason, 0) + 1
        try:
            pending.deliver(event)
        except Exception:  # e.g. the receiving event loop is closed: nobody listens any more
            log.warning("request %d: event delivery failed; cancelling it", pending.req.request_id)
            pending.req.cancelled.set()

    def _fail_rows(self, rows: list[_Row], message: str) -> None:
        """Finish `rows` with finish_reason error; failing the running batch drops its tensors too."""
        running = rows is self._rows
        for row in rows:
            if not row.finished:
                self._finish(row, TokenEvent(None, "", finish_reason="error", error=message))
        if running:
            self._rows, self._state = [], None

    def _compact(self) -> None:
        """Remove finished rows from the batch tensors and trim all-padding leading columns."""
        if not any(r.finished for r in self._rows):
            return
        keep = [i for i, r in enumerate(self._rows) if not r.finished]
        if not keep:
            self._rows, self._state = [], None
            return
        assert self._state is not None
        self._state.select(keep)
        self._state.trim()
        self._rows = [self._rows[i] for i in keep]

    def _finish_everything(self, reason: str) -> None:
        waiting, warm = self._inbox.clear()
        for _, done in warm:
            done(False)
        for p in waiting:
            self._send(p, TokenEvent(None, "", finish_reason=reason))
        for row in self._rows:
            if not row.finished:
                self._finish(row, TokenEvent(None, "", finish_reason=reason))
        self._rows, self._state = [], None
