"""The engine: one thread owns the model and the running batch (continuous batching of mixed tasks).

Every step: finished, cancelled and timed-out rows leave their KV slots; waiting requests are prefilled
together (KV prefix + cached prompt blocks + the rest of the prompt, left-padded among themselves) and
gathered into free slots; then every row decodes one token. Each row keeps its own KV prefix, positions
(the prompt continues at the prefix's `next_position`), optional ACCEPT delta and sampling params. The
per-row events (accepting tokens, finishing, freeing slots) are in `server/engine_rows.py`.

Failures stay with their request: checks that could fail a shared forward (prompt ids, context, the task's
prefix) run per row before the prefill; sampling, stop strings and text decoding are per row (a row that
fails there ends with an error, the others carry on). Only the shared forward can fail several rows at once,
and then each of them is run once alone (prefilled alone, or decoded alone in its own slot) before any of
them gets an error; a forward that fails alone fails its one row.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from prompt_store import TaskKey, TaskPrompt
from prompt_store.lru import ByteLRU
from runtime.batch_state import BatchState, PrefillItem, decode_rows, prefill_rows
from runtime.kv_slots import token_bytes
from runtime.model_runner import ModelRunner
from runtime.prompt_cache import PromptCache
from server.engine_rows import RowEvents
from server.memory import MemoryTrimmer
from server.prefixes import DevicePrefix, bare_prefix, device_prefixes
from server.requests import GenerationRequest, TokenEvent
from server.rows import Row, new_row
from server.sampling import RowSampler, SamplingPlan
from server.waiting import Deliver, Pending, WaitingQueue, leave_reason

log = logging.getLogger("softserve.engine")

DEFAULT_ROW_TOKENS = 2048 + 512  # the server's default max_prompt_tokens + max_new_tokens


class Engine(RowEvents):
    def __init__(
        self,
        runner: ModelRunner,
        max_batch_size: int = 32,
        max_queue: int = 256,
        prefix_cache_bytes: int = 256 * 1024 * 1024,
        row_capacity: int | None = None,
        kv_cache_bytes: int | None = None,
        prompt_cache_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.runner = runner
        # KV slots: one per row, `row_capacity` columns each (prefix + prompt + generated), preallocated.
        self.row_capacity = min(row_capacity or DEFAULT_ROW_TOKENS, runner.max_context)
        if kv_cache_bytes is not None:
            row_bytes = self.row_capacity * token_bytes(
                runner.num_layers, (runner.num_kv_heads, runner.head_dim), runner.dtype
            )
            if kv_cache_bytes < row_bytes:
                raise ValueError(
                    f"kv_cache_bytes={kv_cache_bytes} does not hold one row of {self.row_capacity} tokens "
                    f"({row_bytes} bytes)"
                )
            max_batch_size = min(max_batch_size, kv_cache_bytes // row_bytes)
        self.max_batch_size = max_batch_size
        self._state = BatchState(runner, max_batch_size, self.row_capacity)
        if kv_cache_bytes is not None:  # running rows' slots first; the prompt cache gets what is left
            prompt_cache_bytes = min(prompt_cache_bytes, kv_cache_bytes - self._state.kv.nbytes)
        self.prompt_cache = PromptCache(prompt_cache_bytes)
        self.max_queue = max_queue
        self.prefix_cache: ByteLRU[TaskKey, DevicePrefix] = ByteLRU(prefix_cache_bytes)
        self.memory = MemoryTrimmer()  # evicted prefixes' host memory goes back to the OS
        self._inbox = WaitingQueue(max_queue)
        self._cv = self._inbox.cv
        self._rows: list[Row] = []  # row b lives in KV slot b
        self._any_finished = False  # a row finished since the last compaction
        self._sampler_cache: tuple[list[Row], list[RowSampler], SamplingPlan] | None = None
        self._single_decodes: dict[int, str] = {}  # decode([id]), shared by the rows' text streams
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._abort = False
        self._bare = bare_prefix(runner)
        self._admitting: list[Row] = []  # rows between their prefill and the merge into the batch
        self._taken = 0  # requests taken from the queue whose admission is under way
        self._admission: list[Pending] = []  # those requests (cancel() finds them before they are merged)
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
        log.info(
            "engine started: max_batch_size=%d max_queue=%d, KV slots %d x %d tokens = %.1f MiB",
            self.max_batch_size,
            self.max_queue,
            self._state.kv.slots,
            self.row_capacity,
            self._state.kv.nbytes / 2**20,
        )

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

    def cancel(self, request_id: int | None = None) -> int:
        """Cancel a waiting, admitted or running request (every one when `request_id` is None); it leaves at
        the next step with finish_reason 'cancelled'. Returns how many were cancelled."""
        admission = [p.req for p in self._admission]
        hits = [
            req
            for req in self._inbox.requests() + admission + [r.req for r in self._rows]
            if request_id is None or req.request_id == request_id
        ]
        for req in hits:
            req.cancelled.set()
        with self._cv:
            self._cv.notify_all()
        return len(hits)

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
            **self.prompt_cache.stats(),
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
        admitted: list[Pending] = []
        if self._inbox.has_work():  # read unlocked: what is queued meanwhile waits for the next step
            self._build_warm_prefixes()
            admitted = self._take_waiting(now)
        try:
            if admitted:
                self._admit(admitted)
        finally:
            self._taken, self._admission = 0, []
        if self._rows:
            self._decode()
        self.steps += 1
        self.memory.after_evictions(self.prefix_cache.evictions)
        if self.tokens_generated > before:
            self._recent.append((time.monotonic(), self.tokens_generated - before))

    def _take_waiting(self, now: float) -> list[Pending]:
        """Waiting requests for the free batch slots, oldest first; abandoned ones leave the queue."""
        with self._cv:  # (re-entrant) so that load() and the queue room never miss the taken ones
            taken, dropped = self._inbox.take(self.max_batch_size - len(self._rows), now)
            self._taken, self._admission = len(taken), taken
        for p in taken:
            p.req.admitted_at = now  # its queue wait ends here (softserve_queue_wait_seconds)
        for p, reason in dropped:
            self._send(p, TokenEvent(None, "", finish_reason=reason))
        return taken

    def _retire(self, now: float) -> None:
        """Cancelled and past-deadline rows leave the batch (finish_reason cancelled / timeout)."""
        for row in self._rows:
            req = row.pending.req
            if req.deadline is None and not req.cancelled.is_set():
                continue  # (leave_reason's checks, without the call)
            reason = leave_reason(req, now)
            if reason is not None:
                self._finish(row, TokenEvent(None, "", finish_reason=reason))
        self._compact()

    def _admit(self, admitted: list[Pending]) -> None:
        rows: list[Row] = []
        items: list[PrefillItem] = []
        prefixes = self._prefixes([p.req.task for p in admitted if p.req.task is not None])
        for p in admitted:
            try:
                row, item = new_row(
                    self.runner,
                    self.prefix_cache,
                    self._bare,
                    p,
                    prefixes,
                    self.prompt_cache,
                    self.row_capacity,
                    self._single_decodes,
                )
            except Exception as exc:
                log.warning(
                    "request %d rejected before prefill: %s",
                    p.req.request_id,
                    type(exc).__name__,
                    extra=p.req.log_extra,
                )
                self._send(p, TokenEvent(None, "", finish_reason="error", error=str(exc)[:300]))
                continue
            if p.req.params.max_new_tokens <= 0:
                self._send(p, TokenEvent(None, "", finish_reason="length"))
                continue
            rows.append(row)
            items.append(item)
        if not rows:
            return
        self._admitting = rows
        try:
            self._prefill(rows, items)
        finally:
            self._admitting = []
        log.debug("admitted %d; batch %d, waiting %d", len(rows), len(self._rows), len(self._inbox))

    def _prefill(self, rows: list[Row], items: list[PrefillItem]) -> None:
        """Prefill `rows`, accept their first tokens and move the rows still running into KV slots. A failed
        forward of several rows is retried once for each row alone."""
        out = prefill_rows(self.runner, items)
        self._forward_failures("prefill", rows, out)
        ran = [rows[i] for i in out.ran]
        if out.logits is None or out.parts is None:
            return
        self._accept_sampled(ran, out.logits)
        admitted: list[Row] = []
        by_forward: dict[int, tuple[Any, list[int]]] = {}  # forward -> (its rows, their indices there)
        for row, (part, g) in zip(ran, out.parts, strict=True):
            self.prompt_cache.insert_prefilled(part, g, row.lookup)
            if not row.finished:
                by_forward.setdefault(id(part), (part, []))[1].append(g)
                admitted.append(row)
        for part, keep in by_forward.values():
            self._state.admit(part, keep)
        with self._cv:  # rows and the admission count change together, as load() reads them
            self._rows = self._rows + admitted
            self._taken = 0

    def _decode(self) -> None:
        """One token for every row (a row whose own forward fails ends with an error)."""
        rows = self._rows
        out = decode_rows(self.runner, self._state, [r.tokens[-1] for r in rows])
        self._forward_failures("decode", rows, out)
        if out.logits is not None:
            ran = rows if len(out.ran) == len(rows) else [rows[i] for i in out.ran]
            self._accept_sampled(ran, out.logits, advance=True)  # each row's next_pos and columns + 1
        self._compact()

    # ---- per-row bookkeeping -----------------------------------------------------------------------------

    def _prefixes(self, tasks: list[TaskPrompt]) -> dict[TaskKey, DevicePrefix]:
        """The admitted tasks' prefixes, cold embedding prefixes converted in one forward; on any error the
        rows fall back to converting their own prefix (so a failure stays with its request)."""
        try:
            return device_prefixes(self.runner, self.prefix_cache, tasks)
        except Exception:
            log.exception("batched prefix conversion of %d tasks failed; converting one by one", len(tasks))
            return {}

    def kv_copied(self) -> dict[str, int]:
        """Bytes written into / moved within KV storage by admissions and retirements (cumulative)."""
        return dict(self._state.kv.copied)
