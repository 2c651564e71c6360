"""HTTP load benchmark: closed-loop streaming clients at increasing concurrency against a real server.

Starts `python -m server.cli serve` (embedded SmolLM2 unless --model, disk store in a temp dir, --device and
--dtype passed through, SOFTSERVE_MAX_BATCH_SIZE / SOFTSERVE_MAX_QUEUE from --max-batch / --max-queue), or
drives an already running server with --url. Registers a mixed set of tasks over HTTP (PUT /tasks/{id}):
prompt tuning, P-tuning, prefix tuning, ACCEPT (with SCAP) and gist artifacts built with prompt_store's API
against the served model's fingerprint, plus one gist made by the server (POST /tasks/{id}/compress).

Per concurrency level (--concurrency, default 1,4,16,48,64,128), that many httpx.AsyncClient workers run
closed-loop for --duration seconds: each sends POST /generate with `stream: true`, a chat-formatted question
(harness.QUESTIONS), greedy, max_new_tokens --new-tokens, round-robin over the tasks and the bare model,
reads the server-sent events, then sends the next one. A 429 is recorded (with its Retry-After header);
after a 429 or an error the worker waits Retry-After seconds (capped at 1 s), as a polite client would.
Per level: requests ok, 429s, other errors, tokens/s (completion tokens / wall time of the level),
request latency p50/p99 and time to first token (first SSE token event) p50/p99 over the ok requests, and
the server's batch size and queue depth sampled from GET /metrics.

Prompt cache (--prompt-cache both, the default): two servers start, one with the prompt cache on (the default
SOFTSERVE_PROMPT_CACHE_BYTES) and one with SOFTSERVE_PROMPT_CACHE_BYTES=0; every level runs on each in turn
(alternating which goes first), and the report puts them side by side with each level's hit rate (from the
softserve_prompt_cache_{hit,miss}_tokens counters of GET /metrics).
Goals (the cache-on pass; the cache-off pass is reported beside it): no non-429 errors; 429s only beyond
max_batch + max_queue concurrent requests (and from there on); every 429 carries Retry-After; tokens/s at the
highest level <= max_batch + max_queue without 429s or errors >= 6 x concurrency 1 (the batching gain).
--no-stream sends JSON requests instead (TTFT then from the
server's timings).
The client runs on the same machine, so the server's torch gets all cores but one (OMP_NUM_THREADS) unless
--threads says otherwise (--threads 0: torch's default).
Writes bench/results/http_load.md, .json and .png. The server is always stopped, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.artifacts import mixed_artifacts, upload  # noqa: E402
from common.http_load_analysis import (  # noqa: E402
    CACHE_OFF,
    CACHE_ON,
    Level,
    Result,
    cache_counters,
    cache_delta,
    goals,
    plot,
    render,
    render_comparison,
    summarize,
)
from common.servers import ServeProcess  # noqa: E402
from harness import QUESTIONS, RESULTS, add_device_args, write_report  # noqa: E402

from prompt_store import Artifact, to_bytes  # noqa: E402
from runtime.model_runner import load_model  # noqa: E402

GAUGES = ("softserve_batch_size ", "softserve_queue_depth ")
COMPRESS_INSTRUCTION = "Reply like a pirate."


def register_tasks(url: str, artifacts: list[Artifact], headers: dict[str, str]) -> list[str]:
    """PUT every artifact, compress one instruction on the server; the ids to serve."""
    served: list[str] = []
    with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
        for art in artifacts:
            task_id = art.task_id
            r = upload(client, "", task_id, to_bytes(art))
            if r.status_code != 201:
                raise RuntimeError(f"PUT /tasks/{task_id}: {r.status_code} {r.text[:500]}")
            if art.manifest.method != "gist_embedding":
                served.append(task_id)
        body = {"gist_task": "load-gist-tokens", "instruction": COMPRESS_INSTRUCTION}
        r = client.post("/tasks/load-gist-c/compress", json=body)
        if r.status_code != 201:
            raise RuntimeError(f"POST /tasks/load-gist-c/compress: {r.status_code} {r.text[:500]}")
        served.append("load-gist-c")
    return served


# ---- load ----------------------------------------------------------------------------------------------


async def one_request(
    client: httpx.AsyncClient, body: dict[str, Any], level: Level, window_end: float
) -> Result:
    t0 = time.perf_counter()
    res = Result(status=0)
    try:
        if not body["stream"]:
            return await one_json_request(client, body, level, window_end, res, t0)
        async with client.stream("POST", "/generate", json=body) as r:
            res.status = r.status_code
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                res.retry_after = r.headers.get("retry-after")
                if r.status_code != 429:
                    res.error = f"HTTP {r.status_code}: {text[:200]}"
                res.latency = time.perf_counter() - t0
                return res
            done, events = False, 0
            try:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    events += 1
                    event = json.loads(data)
                    if event.get("token") is not None:
                        now = time.perf_counter()
                        if res.ttft is None:
                            res.ttft = now - t0
                        res.tokens += 1
                        if now <= window_end:
                            level.tokens_in_window += 1
                    if event.get("finish_reason") is not None:
                        res.finish = event["finish_reason"]
                        if event.get("error") or res.finish in ("error", "timeout", "cancelled"):
                            res.error = f"finish_reason {res.finish}: {event.get('error')}"
            except httpx.HTTPError as exc:
                # 200 sent, then the server broke the body off before any event (not a client timeout)
                if events == 0 and not isinstance(exc, httpx.TimeoutException):
                    res.aborted = True
                    res.error = f"200, then the stream broke off before any event ({type(exc).__name__})"
                    res.latency = time.perf_counter() - t0
                    return res
                raise
            if not done and res.error is None:
                res.error = f"stream ended without [DONE] after {res.tokens} tokens (finish {res.finish})"
    except httpx.HTTPError as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    res.latency = time.perf_counter() - t0
    return res


async def one_json_request(
    client: httpx.AsyncClient, body: dict[str, Any], level: Level, window_end: float, res: Result, t0: float
) -> Result:
    """--no-stream: one JSON response; TTFT is the server's timings.time_to_first_token_ms."""
    r = await client.post("/generate", json=body)
    res.status = r.status_code
    res.latency = time.perf_counter() - t0
    if r.status_code == 429:
        res.retry_after = r.headers.get("retry-after")
    elif r.status_code != 200:
        res.error = f"HTTP {r.status_code}: {r.text[:200]}"
    else:
        out = r.json()
        res.tokens = len(out["tokens"])
        res.finish = out["finish_reason"]
        ttft_ms = out["timings"]["time_to_first_token_ms"]
        res.ttft = ttft_ms / 1e3 if ttft_ms is not None else None
        if time.perf_counter() <= window_end:
            level.tokens_in_window += res.tokens
    return res


async def run_level(
    url: str, headers: dict[str, str], targets: list[str], concurrency: int, args: argparse.Namespace
) -> Level:
    level = Level(concurrency, args.duration)
    # idle connections are dropped before uvicorn's 5 s keep-alive timeout closes them from its side (with
    # both at 5 s a request sent on a connection the server is closing fails with ReadError)
    limits = httpx.Limits(
        max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8, keepalive_expiry=2.0
    )
    timeout = httpx.Timeout(args.request_timeout, connect=30)
    counter = iter(range(10**9))
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout) as client:
        start = time.perf_counter()
        window_end = start + args.duration

        async def worker() -> None:
            while time.perf_counter() < window_end:
                i = next(counter)
                body: dict[str, Any] = {
                    "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                    "max_new_tokens": args.new_tokens,
                    "stream": not args.no_stream,
                }
                target = targets[i % len(targets)]
                if target != "base":
                    body["task_id"] = target
                res = await one_request(client, body, level, window_end)
                level.results.append(res)
                if res.status == 429 or res.error is not None:  # back off; errors must not spin
                    try:
                        wait = float(res.retry_after or 1)
                    except ValueError:
                        wait = 1.0
                    await asyncio.sleep(min(wait, 1.0, max(0.0, window_end - time.perf_counter())))

        async def sampler() -> None:  # the server's own view: rows in the batch, requests waiting
            while time.perf_counter() < window_end:
                try:
                    r = await client.get("/metrics", timeout=5)
                    gauges = dict(line.split()[:2] for line in r.text.splitlines() if line.startswith(GAUGES))
                    level.batch_sizes.append(float(gauges.get("softserve_batch_size", "nan")))
                    level.queue_depths.append(float(gauges.get("softserve_queue_depth", "nan")))
                except (httpx.HTTPError, ValueError):
                    pass
                await asyncio.sleep(0.5)

        await asyncio.gather(sampler(), *(worker() for _ in range(concurrency)))
        level.wall_s = time.perf_counter() - start
        level.load_avg = os.getloadavg()[0]
    return level


async def warm_up(url: str, headers: dict[str, str], targets: list[str]) -> None:
    """One short request per target, so every task's prefix is converted and cached before timing."""
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
        for target in targets:
            body: dict[str, Any] = {
                "messages": [{"role": "user", "content": QUESTIONS[0]}],
                "max_new_tokens": 2,
            }
            if target != "base":
                body["task_id"] = target
            r = await client.post("/generate", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"warm-up request for {target}: {r.status_code} {r.text[:500]}")


# ---- main ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(parser)
    # the load generator shares the machine: the server's torch gets all cores but one (--threads 0: all)
    parser.set_defaults(threads=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument(
        "--url", help="drive this running server instead of starting one (its limits must match)"
    )
    parser.add_argument("--model", help="HF model name or path (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--key", help="admin/API key for --url (default: $SOFTSERVE_ADMIN_KEY)")
    parser.add_argument("--concurrency", default="1,16,48,96", help="levels (default: %(default)s)")
    parser.add_argument(
        "--duration", type=float, default=30.0, help="seconds per level (default: %(default)s)"
    )
    parser.add_argument("--new-tokens", type=int, default=24, help="max_new_tokens (default: %(default)s)")
    parser.add_argument("--max-batch", type=int, default=48, help="SOFTSERVE_MAX_BATCH_SIZE (default: 48)")
    parser.add_argument("--max-queue", type=int, default=32, help="SOFTSERVE_MAX_QUEUE (default: 32)")
    parser.add_argument(
        "--no-stream",
        action="store_true",
        help="JSON responses (TTFT from the server's timings) instead of SSE",
    )
    parser.add_argument("--request-timeout", type=float, default=120.0, help="client read timeout, s")
    parser.add_argument(
        "--name", default="http_load", help="report name under bench/results (default: %(default)s)"
    )
    parser.add_argument(
        "--prompt-cache",
        choices=("both", "on", "off"),
        default="both",
        help="both: a second server with SOFTSERVE_PROMPT_CACHE_BYTES=0, every level run on each in turn "
        "(default: %(default)s); on / off: one server",
    )
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if not levels or min(levels) < 1 or args.duration <= 0 or args.new_tokens < 1:
        parser.error("--concurrency needs positive integers; --duration and --new-tokens must be positive")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    key = args.key or os.environ.get("SOFTSERVE_ADMIN_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key and args.url else {}

    # SIGTERM too ends in the finally below (Ctrl-C raises KeyboardInterrupt), so the server never outlives us
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    wanted = [CACHE_ON, CACHE_OFF] if args.prompt_cache == "both" else [f"prompt cache {args.prompt_cache}"]
    names = ["running server"] if args.url else wanted
    servers: dict[str, ServeProcess] = {}
    tmp = tempfile.TemporaryDirectory(prefix="softserve-http-load-")
    try:
        for name in [] if args.url else names:
            folder = Path(tmp.name) / name.replace(" ", "-")
            limits = {
                "SOFTSERVE_MAX_BATCH_SIZE": str(args.max_batch),
                "SOFTSERVE_MAX_QUEUE": str(args.max_queue),
                "SOFTSERVE_DRAIN_TIMEOUT_S": "2",
            }
            if name == CACHE_OFF:
                limits["SOFTSERVE_PROMPT_CACHE_BYTES"] = "0"
            folder.mkdir(parents=True)
            servers[name] = ServeProcess(
                args, f"disk:{folder / 'store'}", folder / "server.log", limits
            )  # loads its model while we build the artifacts
        # the served model's fingerprint: the same model loaded here, on the CPU
        runner = load_model(args.model, dtype="float32", device="cpu")
        artifacts = mixed_artifacts(runner)
        model_name = runner.name
        del runner
        urls = {name: servers[name].url if name in servers else args.url for name in names}
        targets: list[str] = []
        for name in names:
            if name in servers:
                servers[name].wait_ready()
            print(f"[{time.perf_counter() - t_start:5.1f}s] {name}: ready at {urls[name]}", flush=True)
            targets = register_tasks(urls[name], artifacts, headers)
            targets += ["base"] * max(1, len(targets) // 4)  # about 1 in 5 requests on the bare model
            asyncio.run(warm_up(urls[name], headers, targets))
        print(
            f"[{time.perf_counter() - t_start:5.1f}s] {len(targets)} targets registered and warm", flush=True
        )
        passes: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for i, c in enumerate(levels):  # each level on every server in turn, alternating who goes first
            for name in names[i % len(names) :] + names[: i % len(names)]:
                before = cache_counters(urls[name], headers)
                level = asyncio.run(run_level(urls[name], headers, targets, c, args))
                row = summarize(level)
                row.update(cache_delta(before, cache_counters(urls[name], headers)))
                passes[name].append(row)
                print(
                    f"[{time.perf_counter() - t_start:5.1f}s] {name} c={c}: ok {row['ok']}, "
                    f"429 {row['429']}, "
                    f"errors {row['errors']}, {row['tokens_per_s']:.1f} tok/s, "
                    f"p50 {1e3 * row['latency_p50_s']:.0f} ms, ttft p50 {1e3 * row['ttft_p50_s']:.0f} ms, "
                    f"prompt cache hit rate {row['prompt_cache_hit_rate']:.3f}",
                    flush=True,
                )
        for name, server in servers.items():
            if server.proc.poll() is not None:
                raise RuntimeError(f"{name} server died during the run:\n{server.log_tail()}")
    finally:
        for server in servers.values():
            server.stop()
        tmp.cleanup()

    limit = args.max_batch + args.max_queue
    per_pass = {name: goals(rows, limit, name) for name, rows in passes.items()}
    main_pass = names[0]  # the goals are the prompt cache's (on); the cache-off pass is reported beside it
    rows = passes[main_pass]
    gl, extra = per_pass[main_pass]
    device = args.device
    if args.url:
        server_line = f"{args.url} (running server; limits assumed {args.max_batch}/{args.max_queue})"
    else:
        gpu = (
            f", {torch.cuda.get_device_name()}"
            if device.startswith("cuda") and torch.cuda.is_available()
            else ""
        )
        threads = f", OMP_NUM_THREADS={args.threads}" if args.threads else ""
        server_line = (
            f"`python -m server.cli serve`, {model_name} ({args.dtype}, device {device}{gpu}{threads}); "
            f"torch {torch.__version__}; {platform.machine()}, {os.cpu_count()} cores"
        )
    all_rows = [r for rs in passes.values() for r in rs]
    info = {
        "load": f"{load_start:.1f} / {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)",
        "load_max": max([load_start, os.getloadavg()[0]] + [r["load_avg"] for r in all_rows]),
        "server": server_line,
        "client": f"httpx {httpx.__version__} AsyncClient, same machine",
        **extra,
    }
    report = render_comparison(passes, per_pass, limit) if len(passes) > 1 else ""
    for name, (pass_goals, pass_extra) in per_pass.items():
        detail = render(args, passes[name], targets, {**info, **pass_extra}, pass_goals, name != main_pass)
        report += f"\n## {name}\n" + detail.split("\n", 1)[1] if len(passes) > 1 else detail
    elapsed = time.perf_counter() - t_start
    report += f"\nwhole run (server start, registration, warm-up, all levels): {elapsed:.0f} s\n"
    data = {
        "settings": {k: v for k, v in vars(args).items() if k != "key"},
        "targets": targets,
        "levels": rows,
        "passes": passes,
        "gains": {name: ex["gain"] for name, (_, ex) in per_pass.items()},
        "info": info,
        **extra,
        "elapsed_s": elapsed,
    }
    write_report(args.name, report, gl, data)
    plot(passes, limit, extra["first_429"], RESULTS / f"{args.name}.png")
    print(f"elapsed {time.perf_counter() - t_start:.1f} s (server start, registration, warm-up, all levels)")


if __name__ == "__main__":
    main()
