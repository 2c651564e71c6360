"""The engine's per-row events: accepting sampled tokens, finishing and delivering, freeing KV slots.

A mixin of `server.engine.Engine` (the engine thread alone calls these): the rows of the running batch
(`_rows`, row b in KV slot b of `_state`) and the counters the engine reports.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import torch

from runtime.batch_state import BatchState, Forward
from runtime.model_runner import ModelRunner
from server.requests import TokenEvent
from server.rows import Row
from server.sampling import RowSampler, Sampled, SamplingPlan, sample_batch, sampling_plan
from server.waiting import Pending, WaitingQueue

log = logging.getLogger("softserve.engine")


class RowEvents:
    runner: ModelRunner
    row_capacity: int
    _rows: list[Row]
    _state: BatchState
    _inbox: WaitingQueue
    tokens_generated: int
    step_errors: int
    finished: dict[str, int]
    ttft_samples: deque[float]
    _any_finished: bool  # a row finished since the last compaction
    _sampler_cache: tuple[list[Row], list[RowSampler], SamplingPlan] | None

    def _forward_failures(self, phase: str, rows: list[Row], out: Forward) -> None:
        """Count and log the failed forwards; the rows whose own forward failed end with an error."""
        self.step_errors += out.errors
        if out.shared_error is not None:
            log.error(
                "%s forward of %d rows failed; running each alone",
                phase,
                len(rows),
                exc_info=out.shared_error,
            )
        for i, exc in out.failed.items():
            req = rows[i].req
            log.error("%s of request %d failed", phase, req.request_id, exc_info=exc, extra=req.log_extra)
            error = f"{phase} failed: {type(exc).__name__}: {exc}"[:300]
            self._finish(rows[i], TokenEvent(None, "", finish_reason="error", error=error))

    def _sample(self, rows: list[Row], logits: torch.Tensor) -> list[Sampled | Exception]:
        """sample_batch over the rows, with their samplers and sampling plan kept while the row list (the
        same list object: the engine replaces it whenever rows join or leave) stays the same."""
        cached = self._sampler_cache
        if cached is None or cached[0] is not rows:
            samplers = [r.sampler for r in rows]
            cached = (rows, samplers, sampling_plan(samplers, logits.shape[-1], logits.device))
            self._sampler_cache = cached
        return sample_batch(logits, cached[1], cached[2])

    def _accept_sampled(self, rows: list[Row], logits: torch.Tensor, advance: bool = False) -> None:
        """One token per row sampled from logits [B, V] (a row's sampling error is its own) and accepted:
        each row's event is delivered (a final one ends the row). `advance`: the rows were fed a token."""
        sampled = self._sample(rows, logits)
        eos_ids, max_context, capacity = self.runner.eos_ids, self.runner.max_context, self.row_capacity
        generated = 0
        for row, token in zip(rows, sampled, strict=True):
            if advance:
                row.next_pos += 1
                row.columns += 1
            elif not row.tokens and not isinstance(token, Exception):
                self.ttft_samples.append(time.monotonic() - row.pending.submitted)
            event = row.accept(token, eos_ids, max_context, capacity)
            if event.finish_reason is not None:
                generated += event.token_id is not None
                self._finish(row, event)
                continue
            generated += 1  # an event that is not final carries its token
            try:  # _send for an event that is not final
                row.pending.deliver(event)
            except Exception:
                self._undeliverable(row.pending)
        self.tokens_generated += generated

    def _finish(self, row: Row, event: TokenEvent) -> None:
        row.finished = True
        self._any_finished = True
        log.debug(
            "request %d finished: %s after %d tokens",
            row.req.request_id,
            event.finish_reason,
            len(row.tokens),
            extra=row.req.log_extra,
        )
        self._send(row.pending, event)

    def _send(self, pending: Pending, event: TokenEvent) -> None:
        """Deliver one event; a final event is counted by its finish_reason."""
        if event.finish_reason is not None:
            self.finished[event.finish_reason] = self.finished.get(event.finish_reason, 0) + 1
        try:
            pending.deliver(event)
        except Exception:
            self._undeliverable(pending)

    @staticmethod
    def _undeliverable(pending: Pending) -> None:
        """Delivery failed (e.g. the receiving event loop is closed: nobody listens any more): cancel it."""
        log.warning(
            "request %d: event delivery failed; cancelling it",
            pending.req.request_id,
            extra=pending.req.log_extra,
        )
        pending.req.cancelled.set()

    def _fail_rows(self, rows: list[Row], message: str) -> None:
        """Finish `rows` with finish_reason error; failing the running batch frees its slots too."""
        running = rows is self._rows
        for row in rows:
            if not row.finished:
                self._finish(row, TokenEvent(None, "", finish_reason="error", error=message))
        if running:
            self._clear_rows()

    def _clear_rows(self) -> None:
        self._state.retire(set(range(self._state.size)))
        self._rows = []

    def _compact(self) -> None:
        """Finished rows leave their KV slots; the last rows move into the holes (one row copied per hole)."""
        if not self._any_finished:  # no row finished since the last compaction
            return
        self._any_finished = False
        finished = {i for i, r in enumerate(self._rows) if r.finished}
        if not finished:
            return
        source = self._state.retire(finished)
        self._rows = [self._rows[i] for i in source]

    def _finish_everything(self, reason: str) -> None:
        waiting, warm = self._inbox.clear()
        for _, done in warm:
            done(False)
        for p in waiting:
            self._send(p, TokenEvent(None, "", finish_reason=reason))
        for row in self._rows:
            if not row.finished:
                self._finish(row, TokenEvent(None, "", finish_reason=reason))
        self._clear_rows()
