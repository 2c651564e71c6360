"""The server's serving path in-process: server/app.py's build_state (store, ServingCache with its watcher,
Engine) with the engine stepped inline by the benchmark; runs and cache counters."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from common.timing import Timers
from server.requests import SamplingParams, TokenEvent
from server.service import Prepared, prepare
from server.state import ServerState


async def _prepare_all(state: ServerState, reqs: list[tuple[str, list[int]]], n_new: int) -> list[Prepared]:
    params = SamplingParams(max_new_tokens=n_new)
    return [await prepare(state, tid, list(ids), params) for tid, ids in reqs]


@dataclass
class Run:
    seconds: float  # first prepare -> last token
    prepare_s: float  # leases: store reads + conversions
    prefill_s: float  # the first engine step: prefix KV of uncached tasks + prefill of every row
    tokens: int
    decode_steps: list[tuple[float, int]]  # (seconds, rows) of every later step
    timers: dict[str, float]

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def run_requests(
    state: ServerState,
    reqs: list[tuple[str, list[int]]],
    n_new: int,
    sync: Callable[[], None],
    timers: Timers,
) -> tuple[Run, list[float]]:
    """Prepare every request (lease its task), enqueue them together, step to the end; first-token times."""
    engine = state.engine
    counts = [0] * len(reqs)
    first: list[float] = [0.0] * len(reqs)
    errors: list[str] = []

    def counter(i: int) -> Callable[[TokenEvent], None]:
        def deliver(event: TokenEvent) -> None:
            if event.token_id is not None:
                if not counts[i]:
                    first[i] = time.perf_counter()
                counts[i] += 1
            if event.finish_reason not in (None, "length"):
                errors.append(f"request {i} ({reqs[i][0]}) ended {event.finish_reason}: {event.error}")

        return deliver

    timers.reset()
    sync()
    t0 = time.perf_counter()
    prepared = asyncio.run(_prepare_all(state, reqs, n_new))
    t_prep = time.perf_counter()
    try:
        for i, p in enumerate(prepared):
            engine.enqueue(p.request, counter(i))
        engine.step()
        sync()
        t_prefill = time.perf_counter()
        steps = []
        while engine.active or engine.queue_depth:
            rows, t = engine.active, time.perf_counter()
            engine.step()
            sync()
            steps.append((time.perf_counter() - t, rows))
    finally:
        for p in prepared:
            p.release()
    end = time.perf_counter()
    if errors:
        raise RuntimeError("; ".join(errors))
    run = Run(end - t0, t_prep - t0, t_prefill - t_prep, sum(counts), steps, dict(timers.seconds))
    return run, [f - t0 for f in first]


def decode_rate(runs: list[Run], quantile: float = 0.2) -> float:
    """Rows / a low quantile of the full-batch decode step times pooled over runs (noise only adds time)."""
    if not any(r.decode_steps for r in runs):
        return float("nan")
    full = max(rows for r in runs for _, rows in r.decode_steps)
    times = sorted(t for r in runs for t, rows in r.decode_steps if rows == full)
    return full / times[min(len(times) - 1, int(quantile * len(times)))]


def lru_counts(state: ServerState) -> dict[str, int]:
    c, p = state.cache.lru, state.engine.prefix_cache
    return {
        "serve_hits": c.hits,
        "serve_misses": c.misses,
        "serve_evictions": c.evictions,
        "prefix_hits": p.hits,
        "prefix_misses": p.misses,
        "prefix_evictions": p.evictions,
    }
