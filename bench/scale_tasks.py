"""Scale in tasks: throughput and memory with 1 to 1000 registered tasks and bounded caches; cold loads.

Prints and writes bench/results/scale_tasks.md (+ .json) and bench/results/scale_tasks.png. The embedded
SmolLM2 (eos ignored) serves through the server's own path: a real store (a DiskStore in a temp dir, or
--store redis://...), a ServingCache (store watcher running) and the Engine's device KV-prefix cache, each
bounded to hold about --fit tasks, and server.service.prepare (cache.acquire -> leased TaskPrompt ->
GenerationRequest), built by server/app.py's build_state with the engine stepped inline.
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
  rest (prefill forward), then the same task again (warm) with the prompt's tokens rotated by one (the same
  length, not in the prompt cache); p50 / p99.
- --prompt-cache off (the default) for the goals: with 1 task every request would share the chat template's
  tokens, and the second rep would repeat the first's prompts, in the prompt cache, which is text reuse
  (measured by shared_prefix and http_load), not the cost of serving many tasks.
Goals: decode and end-to-end tokens/s with 1000 tasks >= 0.9 x with 1 task; RSS growth from 1 to 1000 tasks
<= the three cache bounds (serving, prefix KV and prompt cache, each sized for --fit tasks: the prompt cache
holds --fit x 4 blocks of prompt KV); cold first token p50 <= 2 x warm p50.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.artifacts import vocab_embeds  # noqa: E402
from common.inline_serving import decode_rate, lru_counts, run_requests  # noqa: E402
from common.scale_tasks_report import MiB, make_goals, plot, render  # noqa: E402
from common.timing import TimedStore, Timers, time_calls  # noqa: E402
from harness import QUESTIONS, RESULTS, add_device_args, bench_runner, chat_ids, write_report  # noqa: E402

from prompt_store import Limits  # noqa: E402
from prompt_store.artifact import make_artifact  # noqa: E402
from prompt_store.backends import Store, open_store  # noqa: E402
from prompt_store.types import Artifact, SoftPrompt  # noqa: E402
from prompt_store.validation import to_serving_form  # noqa: E402
from runtime.model_runner import ModelRunner  # noqa: E402
from runtime.prompt_cache import BLOCK as PROMPT_BLOCK  # noqa: E402
from server.app import build_state  # noqa: E402
from server.settings import Settings, redact_store  # noqa: E402
from server.state import ServerState  # noqa: E402

COUNTS = (1, 10, 100, 1000)
# 20 slots: 9 prompt tuning, 7 prefix tuning, 2 P-tuning, 1 gist, 1 ACCEPT
MIX = ("prompt_tuning", "prefix_tuning") * 7 + ("prompt_tuning", "prompt_tuning", "p_tuning", "p_tuning")
MIX += ("gist", "accept")


# ---- tasks ------------------------------------------------------------------------------------------------


class TaskFactory:
    """Artifacts for this model: vocab-initialised embeddings / real KV prefixes, plus per-task noise."""

    def __init__(self, runner: ModelRunner, m: int, seed: int = 0) -> None:
        self.runner, self.m, self.fp = runner, m, runner.fingerprint
        self.embeds = vocab_embeds(runner, m, seed)  # [m, d]
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


def rss() -> int:
    return psutil.Process().memory_info().rss


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
    parser.add_argument(
        "--prompt-cache",
        choices=("off", "on"),
        default="off",
        help="the prompt cache (default: off: with one task every request shares the chat template's "
        "tokens and the second rep repeats the first's prompts, so the cache would measure text reuse, "
        "which shared_prefix and http_load measure, rather than the cost of many tasks)",
    )
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
    # the engine's prefix-cache misses: one forward each, or one batched forward per admission
    time_calls(runner, "prefix_kv", "prefix_kv", timers, sync)
    time_calls(runner, "embedding_prefix_kvs", "prefix_kv", timers, sync)
    elem = torch.empty((), dtype=runner.dtype).element_size()
    prefix_bytes = 2 * runner.num_layers * runner.num_kv_heads * m * runner.head_dim * elem  # one task's KV
    serve_sizes = [to_serving_form(factory.artifact(i)).nbytes() for i in range(len(MIX))]  # one cycle
    cache_bytes = args.fit * int(statistics.mean(serve_sizes))
    prefix_cache_bytes = args.fit * prefix_bytes
    # the prompt cache (runtime/prompt_cache.py) keeps prompt KV blocks per task version: sized like the two
    # others, 4 blocks of prompt KV per task that fits
    prompt_cache_bytes = args.fit * 4 * (prefix_bytes // m) * PROMPT_BLOCK if args.prompt_cache == "on" else 0

    tmp = None
    spec = args.store
    if not spec:
        tmp = tempfile.mkdtemp(prefix="softserve-scale-")
        spec = f"disk:{tmp}"
    settings = Settings(
        store=spec,
        cache_bytes=cache_bytes,
        prefix_cache_bytes=prefix_cache_bytes,
        prompt_cache_bytes=prompt_cache_bytes,
        max_batch_size=args.requests,
        max_queue=max(256, args.requests),
        request_timeout_s=3600.0,  # a loaded machine must not turn slow rows into timeouts
    )
    limits = Limits(max_virtual_tokens=settings.max_virtual_tokens, max_file_bytes=settings.max_body_bytes)
    inner = open_store(spec, limits=limits)
    if "://" in spec and inner.list():
        raise SystemExit(f"store {spec} is not empty; give an empty one (tasks scale-NNNN are written)")
    store = TimedStore(inner, timers)
    state = build_state(settings, runner, store, start_engine=False)  # the engine is stepped inline
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
                "prompt_cache_bytes": state.engine.prompt_cache.blocks.bytes,
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
        "prompt_cache_bytes": prompt_cache_bytes,
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
        # warm: the same task and prompt length, but a prompt the prompt cache has not seen (the tokens
        # rotated by one), so warm vs cold compares the task's load, not a prompt-cache hit
        warm, wfirst = run_requests(state, [(tid, ids[1:] + ids[:1])], 1, sync, timers)
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


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
