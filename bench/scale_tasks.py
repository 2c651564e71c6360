"""Scale in tasks: throughput and memory with 1 to 1000 registered tasks and bounded caches; cold loads.

Prints and writes bench/results/scale_tasks.md (+ .json) and bench/results/scale_tasks.png. The embedded
SmolLM2 (eos ignored) serves through the server's own path: a real store (a DiskStore in a temp dir, or
--store redis://...), a ServingCache (store watcher running) and the Engine's device KV-prefix cache, each
bounded to hold about --fit tasks, and server.service.prepare (cache.acquire -> leased TaskPrompt ->
GenerationRequest), wired as server/app.py's build_state does but with the engine stepped inline.
- tasks: 1, 10, 100, 1000 are registered in turn (one store, growing), every one with --virtual-tokens
  virtual tokens and the model's fingerprint (written by 16 threads); methods cycle prompt tuning (45%),
  prefix tuning (35%), P-tuning (10%), gist (5%) and ACCEPT (5%).
- workload, per task count: --requests requests whose tasks are drawn uniformly over all registered tasks
  (seeded), prepared and enqueued together; --new-tokens tokens each (greedy). --reps repetitions with new
  draws; the same questions and prefix lengths in every run, so every task count does the same work.
  decode tokens/s = rows / 20th-percentile full-batch step time; end-to-end = tokens / wall time from the
  first prepare (store reads, conversions, prefix KV, prefill) to the last token (median over reps).
  Cache hit rates, evictions, process RSS (psutil), cache bytes and store size are read after each count.
- cold load: --cold tasks never requested before (in no cache): time to first token of one request
  (prepare + prefill, max_new_tokens=1), split into store reads, validation + conversion, prefix KV and the
  rest (prefill forward), then the same request again (warm); p50 / p99.
Goals: decode and end-to-end tokens/s with 1000 tasks >= 0.9 x with 1 task; RSS growth from 1 to 1000 tasks
<= the two cache bounds; cold first token p50 <= 2 x warm p50.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import (  # noqa: E402
    QUESTIONS,
    RESULTS,
    Goal,
    add_device_args,
    bench_runner,
    chat_ids,
    hardware_line,
    savefig,
    write_report,
)

from prompt_store import Limits  # noqa: E402
from prompt_store.artifact import make_artifact  # noqa: E402
from prompt_store.backends import Store, open_store  # noqa: E402
from prompt_store.backends.base import ChangeEvent, TaskInfo  # noqa: E402
from prompt_store.cache import ServingCache  # noqa: E402
from prompt_store.types import Artifact, SoftPrompt  # noqa: E402
from prompt_store.validation import to_serving_form  # noqa: E402
from server.engine import Engine  # noqa: E402
from server.model_runner import ModelRunner  # noqa: E402
from server.requests import SamplingParams, TokenEvent  # noqa: E402
from server.service import Prepared, prepare  # noqa: E402
from server.settings import Settings, redact_store  # noqa: E402
from server.state import ServerState  # noqa: E402

COUNTS = (1, 10, 100, 1000)
# 20 slots: 9 prompt tuning, 7 prefix tuning, 2 P-tuning, 1 gist, 1 ACCEPT
MIX = ("prompt_tuning", "prefix_tuning") * 7 + ("prompt_tuning", "prompt_tuning", "p_tuning", "p_tuning")
MIX += ("gist", "accept")
MiB = 1024 * 1024


# ---- timing -----------------------------------------------------------------------------------------------


@dataclass
class Timers:
    """Seconds spent in instrumented calls since the last reset."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, dt: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + dt
        self.calls[name] = self.calls.get(name, 0) + 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def get(self, name: str) -> float:
        return self.seconds.get(name, 0.0)


class TimedStore(Store):
    """Delegates to a real store and times get() and info() (what a cache miss pays for the store)."""

    def __init__(self, inner: Store, timers: Timers) -> None:
        self.inner = inner
        self.timers = timers

    def put(self, artifact: Artifact) -> int:
        return self.inner.put(artifact)

    def get(self, task_id: str, version: int | None = None) -> Artifact:
        t = time.perf_counter()
        try:
            return self.inner.get(task_id, version)
        finally:
            self.timers.add("store", time.perf_counter() - t)

    def info(self, task_id: str) -> TaskInfo:
        t = time.perf_counter()
        try:
            return self.inner.info(task_id)
        finally:
            self.timers.add("store", time.perf_counter() - t)

    def list(self) -> list[TaskInfo]:
        return self.inner.list()

    def delete(self, task_id: str) -> None:
        self.inner.delete(task_id)

    def watch(self, stop: object | None = None, poll_interval: float = 1.0) -> Iterator[ChangeEvent]:
        return self.inner.watch(stop, poll_interval)

    def ping(self) -> None:
        self.inner.ping()

    def close(self) -> None:
        self.inner.close()


def time_calls(obj: Any, method: str, name: str, timers: Timers, sync: Callable[[], None]) -> None:
    """Time every call of obj.method (an instance attribute wraps the bound method) under `name`."""
    inner = getattr(obj, method)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        out = inner(*args, **kwargs)
        sync()
        timers.add(name, time.perf_counter() - t)
        return out

    setattr(obj, method, timed)


# ---- tasks ------------------------------------------------------------------------------------------------


class TaskFactory:
    """Artifacts for this model: vocab-initialised embeddings / real KV prefixes, plus per-task noise."""

    def __init__(self, runner: ModelRunner, m: int, seed: int = 0) -> None:
        self.runner, self.m, self.fp = runner, m, runner.fingerprint
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(100, 10_000, (m,), generator=g)
        self.embeds = runner.embed(ids).float().cpu()  # [m, d]
        keys, values = runner.prefix_kv(SoftPrompt(embeds=self.embeds.to(runner.device, runner.dtype)))
        self.keys, self.values = keys.float().cpu(), values.float().cpu()  # [L, Hkv, m, Dh] each
        self.scale = float(self.embeds.std())

    def method(self, i: int) -> str:
        return MIX[i % len(MIX)]

    def artifact(self, i: int) -> Artifact:
        g = torch.Generator().manual_seed(10_000 + i)
        method, m, d = self.method(i), self.m, self.fp.hidden_size
        tid = f"scale-{i:04d}"

        def noise(t: torch.Tensor) -> torch.Tensor:  # a per-task shift of every row (cheap to draw)
            return t + 0.05 * t.std() * torch.randn((*t.shape[:-1], 1), generator=g)

        if method in ("prompt_tuning", "p_tuning"):
            cfg: dict[str, Any] = {"num_virtual_tokens": m}
            if method == "p_tuning":
                cfg["encoder_type"] = "mlp"
            tensors = {"prompt": noise(self.embeds)}  # [m, d]
        elif method == "prefix_tuning":
            cfg = {"num_virtual_tokens": m}
            tensors = {"keys": noise(self.keys), "values": noise(self.values)}  # [L, Hkv, m, Dh] each
        elif method == "gist":  # m gist positions after a 2m-token instruction
            cfg = {"num_gist_tokens": m, "next_position": 2 * m}
            tensors = {"keys": noise(self.keys), "values": noise(self.values)}  # [L, Hkv, m, Dh] each
        else:  # ACCEPT: K = 4 subspaces of d/4, r = 8 codewords
            k, r = 4, 8
            codebook = self.embeds[:r].reshape(r, k, d // k).transpose(0, 1).contiguous()  # [K, r, d/K]
            weight = torch.softmax(torch.randn(m, k, r, generator=g) * 3, dim=-1)  # [m, K, r]
            cfg = {"num_virtual_tokens": m, "num_subspaces": k, "num_codewords": r}
            tensors = {"prompt_weight": weight, "prompt_codebook": noise(codebook)}
        return make_artifact(tid, method, cfg, tensors, self.fp, notes="bench/scale_tasks")


def task_id(i: int) -> str:
    return f"scale-{i:04d}"


def register(store: Store, factory: TaskFactory, start: int, stop: int) -> float:
    """Build and put tasks start..stop-1 from 16 threads (puts wait on fsync); seconds taken."""
    t = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: store.put(factory.artifact(i)), range(start, stop)))
    return time.perf_counter() - t


def store_bytes(spec: str) -> int | None:
    """Bytes of the store's files on disk (None for a non-disk store)."""
    if "://" in spec:
        return None
    root = Path(spec.removeprefix("disk:"))
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


# ---- serving ----------------------------------------------------------------------------------------------


def build_serving(settings: Settings, runner: ModelRunner, store: Store) -> ServerState:
    """server/app.py's build_state with the given runner and store, minus the engine thread (stepped here)."""
    limits = Limits(max_virtual_tokens=settings.max_virtual_tokens, max_file_bytes=settings.max_body_bytes)
    cache = ServingCache(store, runner.fingerprint, settings.cache_bytes, limits=limits)
    cache.start_watch(settings.store_poll_interval)
    engine = Engine(
        runner,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        prefix_cache_bytes=settings.prefix_cache_bytes,
    )
    return ServerState(settings=settings, runner=runner, engine=engine, store=store, cache=cache)


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


def rss() -> int:
    return psutil.Process().memory_info().rss


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


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


# ---- main -------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(parser)
    parser.add_argument(
        "--counts", default=",".join(map(str, COUNTS)), help="task counts (default: 1,10,100,1000)"
    )
    parser.add_argument("--requests", type=int, default=32, help="requests per workload (default: 32)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens per request (default: 16)")
    parser.add_argument(
        "--reps", type=int, default=2, help="workload repetitions per task count (default: 2)"
    )
    parser.add_argument(
        "--virtual-tokens", type=int, default=20, help="virtual tokens per task (default: 20)"
    )
    parser.add_argument(
        "--fit", type=int, default=64, help="tasks whose prefixes fit the caches (default: 64)"
    )
    parser.add_argument(
        "--cold", type=int, default=20, help="cold tasks for the cold-load latency (default: 20)"
    )
    parser.add_argument("--store", default="", help="store spec (default: a DiskStore in a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    counts = sorted({int(c) for c in args.counts.split(",")})

    runner = bench_runner(args.device, args.dtype, args.threads)
    cuda = runner.device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(runner.device)

    m = args.virtual_tokens
    factory = TaskFactory(runner, m, args.seed)
    timers = Timers()
    time_calls(runner, "prefix_kv", "prefix_kv", timers, sync)  # the engine's prefix-cache misses
    elem = torch.empty((), dtype=runner.dtype).element_size()
    prefix_bytes = 2 * runner.num_layers * runner.num_kv_heads * m * runner.head_dim * elem  # one task's KV
    serve_sizes = [to_serving_form(factory.artifact(i)).nbytes() for i in range(len(MIX))]  # one cycle
    cache_bytes = args.fit * int(statistics.mean(serve_sizes))
    prefix_cache_bytes = args.fit * prefix_bytes

    tmp = None
    spec = args.store
    if not spec:
        tmp = tempfile.mkdtemp(prefix="softserve-scale-")
        spec = f"disk:{tmp}"
    settings = Settings(
        store=spec,
        cache_bytes=cache_bytes,
        prefix_cache_bytes=prefix_cache_bytes,
        max_batch_size=args.requests,
        max_queue=max(256, args.requests),
        request_timeout_s=3600.0,  # a loaded machine must not turn slow rows into timeouts
    )
    limits = Limits(max_virtual_tokens=settings.max_virtual_tokens, max_file_bytes=settings.max_body_bytes)
    inner = open_store(spec, limits=limits)
    if "://" in spec and inner.list():
        raise SystemExit(f"store {spec} is not empty; give an empty one (tasks scale-NNNN are written)")
    store = TimedStore(inner, timers)
    state = build_serving(settings, runner, store)
    time_calls(state.cache, "acquire", "acquire", timers, sync)  # what prepare() runs in a worker thread
    questions = [chat_ids(runner, q) for q in QUESTIONS]
    prompts = [questions[i % len(questions)] for i in range(args.requests)]

    # warm-up: the engine and allocator at full batch, bare rows with the same shapes (no task touched)
    warm = [("base", [p[0]] * m + p) for p in prompts]
    run_requests(state, warm, 3, sync, timers)
    rss_start = rss()

    rows: list[dict[str, Any]] = []
    registered, write_s = 0, 0.0
    used: set[str] = set()
    try:
        for n in counts:
            write_s += register(store, factory, registered, n)
            registered = n
            before = lru_counts(state)
            runs = []
            for rep in range(args.reps):
                rng = random.Random(args.seed * 1_000 + n * 10 + rep)
                reqs = [(task_id(rng.randrange(n)), p) for p in prompts]
                used.update(t for t, _ in reqs)
                runs.append(run_requests(state, reqs, args.new_tokens, sync, timers)[0])
            after = lru_counts(state)
            delta = {k: after[k] - before[k] for k in after}
            row = {
                "tasks": n,
                "decode_tps": decode_rate(runs),
                "decode_tps_median": decode_rate(runs, 0.5),
                "e2e_tps": statistics.median(r.rate for r in runs),
                "e2e_tps_all": [r.rate for r in runs],
                "prepare_s": statistics.median(r.prepare_s for r in runs),
                "prefill_s": statistics.median(r.prefill_s for r in runs),
                "store_s": statistics.median(r.timers.get("store", 0.0) for r in runs),
                "prefix_kv_s": statistics.median(r.timers.get("prefix_kv", 0.0) for r in runs),
                "seconds": statistics.median(r.seconds for r in runs),
                **delta,
                "serve_hit_rate": delta["serve_hits"] / max(1, delta["serve_hits"] + delta["serve_misses"]),
                "prefix_hit_rate": delta["prefix_hits"]
                / max(1, delta["prefix_hits"] + delta["prefix_misses"]),
                "serve_cache_bytes": state.cache.bytes,
                "serve_cache_entries": len(state.cache),
                "prefix_cache_bytes": state.engine.prefix_cache.bytes,
                "prefix_cache_entries": len(state.engine.prefix_cache),
                "rss": rss(),
                "cuda_allocated": torch.cuda.memory_allocated(runner.device) if cuda else None,
                "store_bytes": store_bytes(spec),
            }
            rows.append(row)
            print(
                f"{n:5d} tasks: decode {row['decode_tps']:.1f} tok/s, e2e {row['e2e_tps']:.1f} tok/s, "
                f"serve hit {row['serve_hit_rate']:.2f}, prefix hit {row['prefix_hit_rate']:.2f}, "
                f"rss {row['rss'] / MiB:.0f} MiB",
                flush=True,
            )
        cold = measure_cold(state, factory, registered, args.cold, used, questions[0], sync, timers)
        scan_s = time_scan(inner)
        rss_end = rss()
        rss_trimmed = malloc_trim()
    finally:
        state.cache.stop_watch()
        store.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    elapsed = time.perf_counter() - started
    info = {
        "requests": args.requests,
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "virtual_tokens": m,
        "fit": args.fit,
        "cache_bytes": cache_bytes,
        "prefix_cache_bytes": prefix_cache_bytes,
        "prefix_bytes_per_task": prefix_bytes,
        "store": "DiskStore (temp dir)" if tmp else redact_store(args.store),
        "write_s": write_s,
        "registered": registered,
        "rss_start": rss_start,
        "rss_end": rss_end,
        "rss_trimmed": rss_trimmed,
        "scan_s": scan_s,
        "poll_interval_s": settings.store_poll_interval,
        "elapsed_s": elapsed,
    }
    goals = make_goals(rows, cold, info)
    report = render(args, runner, rows, cold, info, goals)
    write_report("scale_tasks", report, goals, {"info": info, "rows": rows, "cold": cold})
    plot(rows, cold, RESULTS / "scale_tasks.png", runner)
    print(f"elapsed {time.perf_counter() - started:.1f} s")


def measure_cold(
    state: ServerState,
    factory: TaskFactory,
    registered: int,
    n: int,
    used: set[str],
    ids: list[int],
    sync: Callable[[], None],
    timers: Timers,
) -> dict[str, Any]:
    """First token of one request for tasks never requested (no serving form, no prefix), then warm."""
    prefixes = state.engine.prefix_cache.keys()  # a snapshot list
    known = used | {k[0] for k in state.cache.resident_keys()} | {k[0] for k in prefixes}
    untouched = [i for i in range(registered) if task_id(i) not in known][:n]
    out: dict[str, Any] = {"task": [], "method": [], "cold": [], "warm": [], "parts": []}
    for i in untouched:
        tid = task_id(i)
        run, first = run_requests(state, [(tid, ids)], 1, sync, timers)
        acquire = run.timers.get("acquire", 0.0)
        store_s = run.timers.get("store", 0.0)
        prefix_s = run.timers.get("prefix_kv", 0.0)
        parts = {
            "store": store_s,
            "convert": acquire - store_s,
            "prepare": run.prepare_s - acquire,
            "prefix_kv": prefix_s,
            "forward": first[0] - run.prepare_s - prefix_s,
        }
        warm, wfirst = run_requests(state, [(tid, ids)], 1, sync, timers)
        assert warm.timers.get("store", 0.0) == 0.0 and warm.timers.get("prefix_kv", 0.0) == 0.0, "not warm"
        out["task"].append(tid)
        out["method"].append(factory.method(i))
        out["cold"].append(first[0])
        out["warm"].append(wfirst[0])
        out["parts"].append(parts)
    return out


def malloc_trim() -> int | None:
    """RSS after glibc's malloc_trim(0) (None off glibc): shows freed memory that malloc had kept."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return rss()


def time_scan(store: Store) -> float | None:
    """One poll of the disk store's watcher over every task pointer (the watch thread's work per interval)."""
    scan = getattr(store, "_scan", None)
    if scan is None:
        return None
    t = time.perf_counter()
    scan()
    return time.perf_counter() - t


# ---- report -----------------------------------------------------------------------------------------------


def make_goals(rows: list[dict[str, Any]], cold: dict[str, Any], info: dict[str, Any]) -> list[Goal]:
    one, big = rows[0], rows[-1]
    label = f"{big['tasks']} tasks / {one['tasks']} task"
    dec = big["decode_tps"] / one["decode_tps"]
    e2e = big["e2e_tps"] / one["e2e_tps"]
    growth = big["rss"] - one["rss"]
    bound = info["cache_bytes"] + info["prefix_cache_bytes"]
    goals = [
        Goal(f"decode tokens/s, {label}", ">= 0.9", f"{dec:.3f}", dec >= 0.9),
        Goal(f"end-to-end tokens/s, {label}", ">= 0.9", f"{e2e:.3f}", e2e >= 0.9),
        Goal(
            f"RSS growth {one['tasks']} -> {big['tasks']} tasks",
            f"<= cache bounds ({bound / MiB:.0f} MiB)",
            f"{growth / MiB:.1f} MiB",
            growth <= bound,
        ),
    ]
    if cold["cold"]:
        c50, w50 = statistics.median(cold["cold"]), statistics.median(cold["warm"])
        goals.append(
            Goal(
                "cold first token p50 / warm p50",
                "<= 2.0",
                f"{c50 / w50:.2f} ({1e3 * c50:.1f} ms)",
                c50 <= 2 * w50,
            )
        )
    return goals


def render(
    args: argparse.Namespace,
    runner: ModelRunner,
    rows: list[dict[str, Any]],
    cold: dict[str, Any],
    info: dict[str, Any],
    goals: list[Goal],
) -> str:
    lines = [
        "# scale in tasks: throughput and memory vs registered tasks, cold loads",
        "",
        hardware_line(runner),
        f"- store: {info['store']}; tasks of {info['virtual_tokens']} virtual tokens, methods cycling "
        "prompt tuning 45%, prefix tuning 35%, P-tuning 10%, gist 5%, ACCEPT 5%; "
        f"{info['registered']} artifacts written in {info['write_s']:.1f} s",
        f"- ServingCache bound {info['cache_bytes'] / MiB:.1f} MiB, device prefix cache bound "
        f"{info['prefix_cache_bytes'] / MiB:.1f} MiB (= {info['fit']} tasks x "
        f"{info['prefix_bytes_per_task'] / 1024:.0f} KiB of KV); store watcher polling every "
        f"{info['poll_interval_s']:g} s",
        f"- workload: {args.requests} requests prepared (server.service.prepare) and enqueued together, "
        f"tasks drawn uniformly over the registered ones; {args.new_tokens} new tokens each "
        "(greedy, eos ignored); "
        f"{args.reps} reps per task count, new draws each",
        "- decode = rows / 20th-percentile full-batch step (median step in brackets); end-to-end = tokens / "
        "(first prepare -> last token), median over reps; store / prefix KV / prefill = seconds per run "
        "spent in store reads, prefix-KV conversion and the first engine step (median)",
        "- hit rates and evictions over the count's reps; RSS and cache bytes after them; RSS after the "
        f"bare warm-up: {info['rss_start'] / MiB:.0f} MiB",
        "",
        "| tasks | decode tok/s | end-to-end tok/s | store s | prefix KV s | prefill s | serving hit "
        "| prefix hit | evictions (serving / prefix) | serving cache MiB | prefix cache MiB | RSS MiB "
        "| store MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        sb = "" if r["store_bytes"] is None else f"{r['store_bytes'] / MiB:.1f}"
        lines.append(
            f"| {r['tasks']} | {r['decode_tps']:.1f} ({r['decode_tps_median']:.1f}) | {r['e2e_tps']:.1f} | "
            f"{r['store_s']:.3f} | {r['prefix_kv_s']:.3f} | {r['prefill_s']:.3f} | "
            f"{r['serve_hit_rate']:.2f} | {r['prefix_hit_rate']:.2f} | "
            f"{r['serve_evictions']} / {r['prefix_evictions']} | {r['serve_cache_bytes'] / MiB:.1f} | "
            f"{r['prefix_cache_bytes'] / MiB:.1f} | {r['rss'] / MiB:.0f} | {sb} |"
        )
    if rows[0].get("cuda_allocated") is not None:
        lines.append("")
        lines.append(
            "CUDA memory allocated after each count: "
            + ", ".join(f"{r['tasks']}: {r['cuda_allocated'] / MiB:.0f} MiB" for r in rows)
        )
    lines += [
        "",
        f"RSS after the cold-load runs: {info['rss_end'] / MiB:.0f} MiB"
        + (
            ""
            if info["rss_trimmed"] is None
            else f"; after malloc_trim(0): {info['rss_trimmed'] / MiB:.0f} MiB (the difference is freed "
            "memory glibc malloc had kept)"
        )
        + ".",
    ]
    if info["scan_s"] is not None:
        lines += [
            "",
            f"One store-watcher poll over all {info['registered']} task pointers: "
            f"{1e3 * info['scan_s']:.1f} ms (the watch thread does this every "
            f"{info['poll_interval_s']:g} s).",
        ]
    if cold["cold"]:
        n = len(cold["cold"])
        methods = ", ".join(f"{k} x{cold['method'].count(k)}" for k in dict.fromkeys(cold["method"]))
        lines += [
            "",
            f"## cold load: first token of a task in no cache ({n} tasks: {methods})",
            "",
            "One request (chat question, max_new_tokens=1): prepare (lease: store read + validate + convert) "
            "+ first engine step (prefix KV on a miss + prefill). Warm = the same request again. The store "
            "files were written seconds earlier, so the OS page cache holds them.",
            "",
            "| | p50 ms | p99 ms | mean ms |",
            "|---|---:|---:|---:|",
        ]
        for name in ("cold", "warm"):
            xs = cold[name]
            lines.append(
                f"| {name} first token | {1e3 * statistics.median(xs):.1f} | "
                f"{1e3 * quantile(xs, 0.99):.1f} | {1e3 * statistics.mean(xs):.1f} |"
            )
        for part, label in (
            ("store", "store info + get (sha256-verified read)"),
            ("convert", "validate + convert + lease (rest of cache.acquire)"),
            ("prepare", "rest of prepare (asyncio + worker-thread hop, limit checks)"),
            ("prefix_kv", "prefix KV (forward of the embeddings, or copy of KV)"),
            ("forward", "first token (prefill forward + sampling)"),
        ):
            xs = [p[part] for p in cold["parts"]]
            lines.append(
                f"| cold: {label} | {1e3 * statistics.median(xs):.1f} | {1e3 * quantile(xs, 0.99):.1f} | "
                f"{1e3 * statistics.mean(xs):.1f} |"
            )
        lines.append("")
        lines.append(f"p99 over {n} samples is their maximum.")
    lines += ["", "## goals", "", "| measure | goal | measured | met |", "|---|---|---|---|"]
    for g in goals:
        lines.append(f"| {g.measure} | {g.target} | {g.measured} | {'yes' if g.met else '**no**'} |")
    lines += ["", f"Run time: {info['elapsed_s']:.0f} s.", ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], cold: dict[str, Any], path: Path, runner: ModelRunner) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4.2))
    n = [r["tasks"] for r in rows]
    ax1.plot(n, [r["decode_tps"] for r in rows], "o-", label="decode")
    ax1.plot(n, [r["e2e_tps"] for r in rows], "s-", label="end-to-end")
    ax1.set_xscale("log")
    ax1.set_ylim(bottom=0)
    ax1.set_xlabel("registered tasks")
    ax1.set_ylabel("tokens/s")
    ax1.set_title("throughput")
    ax1.legend()
    ax2.plot(n, [r["rss"] / MiB for r in rows], "o-", label="process RSS")
    ax2.plot(
        n, [(r["serve_cache_bytes"] + r["prefix_cache_bytes"]) / MiB for r in rows], "s-", label="cache bytes"
    )
    ax2.set_xscale("log")
    ax2.set_ylim(bottom=0)
    ax2.set_xlabel("registered tasks")
    ax2.set_ylabel("MiB")
    ax2.set_title("memory")
    ax2.legend()
    if cold["cold"]:
        parts = ("store", "convert", "prepare", "prefix_kv", "forward")
        bottom = 0.0
        for part in parts:
            v = 1e3 * statistics.median(p[part] for p in cold["parts"])
            ax3.bar(["cold"], [v], bottom=[bottom], label=part)
            bottom += v
        ax3.bar(["warm"], [1e3 * statistics.median(cold["warm"])], color="tab:gray", label="warm")
        ax3.set_ylabel("first token, median ms")
        ax3.set_title("cold vs warm first token")
        ax3.legend(fontsize=8)
    fig.suptitle(f"scale in tasks, {runner.name} on {runner.device}")
    savefig(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
