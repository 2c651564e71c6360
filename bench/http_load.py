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

Goals: no non-429 errors; 429s only beyond max_batch + max_queue concurrent requests (and from there on);
every 429 carries Retry-After; tokens/s at the highest level <= max_batch + max_queue without 429s or
errors >= 4 x concurrency 1 (the batching gain). --no-stream sends JSON requests instead (TTFT then from the
server's timings).
The client runs on the same machine, so the server's torch gets all cores but one (OMP_NUM_THREADS) unless
--threads says otherwise (--threads 0: torch's default).
Writes bench/results/http_load.md, .json and .png. The server is always stopped, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import QUESTIONS, RESULTS, Goal, add_device_args, savefig, write_report  # noqa: E402

from prompt_store import Artifact, SoftPrompt, make_artifact, to_bytes  # noqa: E402
from server.model_runner import ModelRunner, load_model  # noqa: E402

STARTUP_S = 180.0
GAUGES = ("softserve_batch_size ", "softserve_queue_depth ")
GAIN_TARGET = 4.0
GIST_INSTRUCTION = "Answer in one short sentence, in French."
COMPRESS_INSTRUCTION = "Reply like a pirate."


# ---- tasks ---------------------------------------------------------------------------------------------


def _embeds(runner: ModelRunner, m: int, seed: int) -> torch.Tensor:
    """m input embeddings of random vocabulary tokens [m, d] (a vocab-initialised soft prompt)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 10_000, (m,), generator=g)
    return runner.embed(ids).float().cpu()  # [m, d]


def _text_embeds(runner: ModelRunner, text: str) -> torch.Tensor:
    ids = torch.tensor(runner.tokenizer(text)["input_ids"])
    return runner.embed(ids).float().cpu()  # [n, d]


@torch.inference_mode()
def build_artifacts(runner: ModelRunner) -> list[Artifact]:
    """11 artifacts over five methods with different prefix lengths, valid for `runner`'s fingerprint."""
    fp, d = runner.fingerprint, runner.hidden_size
    out: list[Artifact] = []
    for i, m in enumerate((8, 16, 32)):
        cfg = {"num_virtual_tokens": m, "init": "vocab"}
        out.append(make_artifact(f"load-pt-{i}", "prompt_tuning", cfg, {"prompt": _embeds(runner, m, i)}, fp))
    for i, m in enumerate((10, 20)):
        cfg = {"num_virtual_tokens": m, "encoder_type": "mlp"}
        prompt = _embeds(runner, m, 10 + i)
        out.append(make_artifact(f"load-ptune-{i}", "p_tuning", cfg, {"prompt": prompt}, fp))
    for i, m in enumerate((8, 24)):
        keys, values = runner.prefix_kv(SoftPrompt(embeds=_embeds(runner, m, 20 + i)))  # [L, Hkv, m, Dh]
        tensors = {"keys": keys.float().cpu(), "values": values.float().cpu()}
        out.append(make_artifact(f"load-prefix-{i}", "prefix_tuning", {"num_virtual_tokens": m}, tensors, fp))
    k_sub = 8  # subspaces; d / k_sub must be whole
    for i, m in enumerate((8, 16)):
        # identity mixing weights over m codewords per subspace: the composed prompt is the m embeddings
        emb = _embeds(runner, m, 30 + i)  # [m, d]
        weight = torch.eye(m)[:, None, :].expand(m, k_sub, m).contiguous()  # [m, K, r=m]
        codebook = emb.reshape(m, k_sub, d // k_sub).transpose(0, 1).contiguous()  # [K, r=m, d/K]
        g = torch.Generator().manual_seed(40 + i)
        tensors = {
            "prompt_weight": weight,
            "prompt_codebook": codebook,
            "added_weight": torch.randn(4, 4, 2, generator=g) * 0.1,  # [s, Ka, ra]
            "added_codebook": torch.randn(4, 2, d // 4, generator=g) * 0.01,  # [Ka, ra, d/Ka]
        }
        cfg = {
            "num_virtual_tokens": m,
            "num_subspaces": k_sub,
            "num_codewords": m,
            "added_length": 4,
            "added_subspaces": 4,
            "added_codewords": 2,
        }
        out.append(make_artifact(f"load-accept-{i}", "accept", cfg, tensors, fp))
    # gist: the KV of the last k positions of an instruction, next position after it
    instruction = _text_embeds(runner, GIST_INSTRUCTION)  # [n, d]
    keys, values = runner.prefix_kv(SoftPrompt(embeds=instruction))  # [L, Hkv, n, Dh]
    n = instruction.shape[0]
    for i, k in enumerate((2, 4)):
        tensors = {"keys": keys[:, :, -k:].float().cpu(), "values": values[:, :, -k:].float().cpu()}
        cfg = {"num_gist_tokens": k, "next_position": n}
        out.append(make_artifact(f"load-gist-{i}", "gist", cfg, tensors, fp))
    # learned gist tokens for the server-side compression (not served themselves)
    gists = _embeds(runner, 2, 50)  # [k, d]
    out.append(
        make_artifact(
            "load-gist-tokens", "gist_embedding", {"num_gist_tokens": 2}, {"gist_embeddings": gists}, fp
        )
    )
    return out


def register_tasks(url: str, artifacts: list[Artifact], headers: dict[str, str]) -> list[str]:
    """PUT every artifact, compress one instruction on the server; the ids to serve."""
    served: list[str] = []
    with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
        for art in artifacts:
            task_id = art.task_id
            files = {
                "file": (f"{task_id}.safetensors", io.BytesIO(to_bytes(art)), "application/octet-stream")
            }
            r = client.put(f"/tasks/{task_id}", files=files)
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


# ---- server --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`python -m server.cli serve` in its own session (Ctrl-C reaches only us; we stop it)."""

    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "server.log"
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "SOFTSERVE_MAX_BATCH_SIZE": str(args.max_batch),
            "SOFTSERVE_MAX_QUEUE": str(args.max_queue),
            "SOFTSERVE_DRAIN_TIMEOUT_S": "2",
            "SOFTSERVE_LOG_LEVEL": "WARNING",
        }
        for name in ("SOFTSERVE_ADMIN_KEY", "SOFTSERVE_API_KEY"):  # our server needs no keys
            env.pop(name, None)
        if args.threads:  # torch in the server reads it at start-up
            env["OMP_NUM_THREADS"] = str(args.threads)
        cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--store", f"disk:{folder / 'store'}", "--device", args.device, "--dtype", args.dtype]
        if args.model:
            cmd += ["--model", args.model]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {STARTUP_S:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# ---- load ----------------------------------------------------------------------------------------------


@dataclass
class Result:
    status: int  # HTTP status; 0 = transport error
    latency: float = 0.0
    ttft: float | None = None
    tokens: int = 0
    finish: str | None = None
    retry_after: str | None = None
    error: str | None = None
    aborted: bool = False  # HTTP 200, then the stream broke off before its first event


@dataclass
class Level:
    concurrency: int
    window_s: float
    wall_s: float = 0.0
    load_avg: float = 0.0  # 1-min load average of the machine at the end of the level
    tokens_in_window: int = 0
    results: list[Result] = field(default_factory=list)
    batch_sizes: list[float] = field(default_factory=list)  # /metrics samples every 0.5 s
    queue_depths: list[float] = field(default_factory=list)

    @property
    def ok(self) -> list[Result]:
        return [r for r in self.results if r.error is None and r.status == 200]

    @property
    def n429(self) -> int:
        return sum(r.status == 429 for r in self.results)

    @property
    def errors(self) -> list[Result]:
        return [r for r in self.results if r.status != 429 and (r.error is not None or r.status != 200)]


def quantile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


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
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
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


def summarize(level: Level) -> dict[str, Any]:
    ok = level.ok
    lat = [r.latency for r in ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    attempts = len(level.results)
    n429 = level.n429
    return {
        "concurrency": level.concurrency,
        "attempts": attempts,
        "ok": len(ok),
        "429": n429,
        "429_fraction": n429 / attempts if attempts else 0.0,
        "429_without_retry_after": sum(r.status == 429 and not r.retry_after for r in level.results),
        "errors": len(level.errors),
        "aborted_streams": sum(r.aborted for r in level.results),
        "error_samples": sorted({r.error or f"HTTP {r.status}" for r in level.errors})[:5],
        "completion_tokens": sum(r.tokens for r in ok),
        "tokens_in_window": level.tokens_in_window,
        "window_s": level.window_s,
        "wall_s": level.wall_s,
        "tokens_per_s": sum(r.tokens for r in ok) / level.wall_s if level.wall_s else 0.0,
        "window_tokens_per_s": level.tokens_in_window / level.window_s,
        "requests_per_s": len(ok) / level.wall_s if level.wall_s else 0.0,
        "latency_p50_s": quantile(lat, 0.5),
        "latency_p99_s": quantile(lat, 0.99),
        "ttft_p50_s": quantile(ttft, 0.5),
        "ttft_p99_s": quantile(ttft, 0.99),
        "load_avg": level.load_avg,
        "mean_batch_size": statistics.mean(level.batch_sizes) if level.batch_sizes else float("nan"),
        "max_queue_depth": max(level.queue_depths, default=float("nan")),
        "mean_tokens_per_request": statistics.mean([r.tokens for r in ok]) if ok else 0.0,
        "finish_reasons": {f: sum(r.finish == f for r in ok) for f in sorted({str(r.finish) for r in ok})},
    }


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


# ---- report --------------------------------------------------------------------------------------------


def goals(rows: list[dict[str, Any]], limit: int) -> tuple[list[Goal], dict[str, Any]]:
    errors = sum(r["errors"] for r in rows)
    first_429 = next((r["concurrency"] for r in rows if r["429"]), None)
    under = [r for r in rows if r["concurrency"] <= limit]
    over = [r for r in rows if r["concurrency"] > limit]
    early = [r["concurrency"] for r in under if r["429"]]
    missing = [r["concurrency"] for r in over if not r["429"]]
    n429 = sum(r["429"] for r in rows)
    no_header = sum(r["429_without_retry_after"] for r in rows)
    # the batching gain is read at the highest level the server is meant to take without shedding load
    clean = [r for r in under if not r["429"] and not r["errors"]]
    base = next((r for r in rows if r["concurrency"] == 1), None)
    top = max(clean, key=lambda r: r["concurrency"]) if clean else None
    gain = (
        top["tokens_per_s"] / base["tokens_per_s"] if top and base and base["tokens_per_s"] else float("nan")
    )
    where = f"first 429 at concurrency {first_429}" if first_429 is not None else "no 429 at any level"
    out = [
        Goal("HTTP load: non-429 errors, all levels", "0", str(errors), errors == 0),
        Goal(
            f"HTTP load: 429s only beyond max_batch + max_queue = {limit} concurrent",
            f"none at <= {limit}, some at every level > {limit}",
            where + (f"; 429 at {early}" if early else "") + (f"; none at {missing}" if missing else ""),
            not early and not missing and bool(over),
        ),
        Goal(
            "HTTP load: 429 responses with Retry-After", "all", f"{n429 - no_header}/{n429}", no_header == 0
        ),
        Goal(
            f"HTTP load: tokens/s at concurrency {top['concurrency'] if top else '?'} (highest <= {limit} "
            "without 429 or errors) / concurrency 1",
            f">= {GAIN_TARGET:g}",
            f"{gain:.2f}",
            gain >= GAIN_TARGET,
        ),
    ]
    return out, {"first_429": first_429, "gain": gain, "gain_level": top["concurrency"] if top else None}


def render(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    targets: list[str],
    info: dict[str, Any],
    gl: list[Goal],
) -> str:
    ms = 1e3
    limit = args.max_batch + args.max_queue
    lines = [
        "# HTTP load: streaming clients at increasing concurrency against a running server",
        "",
        f"- server: {info['server']}",
        f"- client: {info['client']}",
        f"- server limits: SOFTSERVE_MAX_BATCH_SIZE={args.max_batch}, SOFTSERVE_MAX_QUEUE={args.max_queue} "
        f"(so 429s are expected above {limit} concurrent requests)",
        f"- workload: {len(targets)} targets round-robin: "
        + ", ".join(targets)
        + f"; chat-formatted questions, greedy, max_new_tokens={args.new_tokens} (eos ends some earlier), "
        + (
            "POST /generate with `stream: false` (TTFT = the server's timings.time_to_first_token_ms)"
            if args.no_stream
            else "POST /generate with `stream: true`"
        ),
        f"- closed loop: each level runs N workers for {args.duration:g} s; after a 429 (or an error) a "
        "worker waits Retry-After (<= 1 s); tokens/s = completion tokens of the ok requests / wall time of "
        "the level (window + the tail until the last request ends); in window = tokens received inside "
        "the window / window (with --no-stream: tokens of the requests completed inside it); "
        "latency and TTFT over the ok requests (send -> last event, send -> first token event), "
        "including the ones finishing after the window; aborted = HTTP 200 whose stream the server broke "
        "off before its first event (counted in other errors); server batch / queue = "
        "softserve_batch_size and softserve_queue_depth from GET /metrics every 0.5 s",
        f"- load average of this machine (1 min) at the start / end of the run: {info['load']}",
        "",
        "| concurrency | ok | 429 (fraction) | other errors (aborted) | tokens/s (in window) | req/s "
        "| latency p50 / p99 ms "
        "| TTFT p50 / p99 ms | tokens/request | server batch (mean) / queue (max) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['concurrency']} | {r['ok']} | {r['429']} ({100 * r['429_fraction']:.0f}%) "
            f"| {r['errors']} ({r['aborted_streams']}) "
            f"| {r['tokens_per_s']:.1f} ({r['window_tokens_per_s']:.1f}) | {r['requests_per_s']:.2f} "
            f"| {ms * r['latency_p50_s']:.0f} / {ms * r['latency_p99_s']:.0f} "
            f"| {ms * r['ttft_p50_s']:.0f} / {ms * r['ttft_p99_s']:.0f} "
            f"| {r['mean_tokens_per_request']:.1f} "
            f"| {r['mean_batch_size']:.1f} / {r['max_queue_depth']:.0f} |"
        )
    lines.append("")
    first = info["first_429"]
    if first is None:
        lines.append("429s: none at any tested level.")
    else:
        row = next(r for r in rows if r["concurrency"] == first)
        lines.append(
            f"429s begin at concurrency **{first}** ({100 * row['429_fraction']:.0f}% of its attempts); "
            f"the limit is {args.max_batch} running + {args.max_queue} waiting = {limit}."
        )
    if any(r["aborted_streams"] for r in rows):
        lines.append(
            "Aborted streams: this server submits a streaming request to the engine only after the SSE "
            "response (200) has started, so a full queue reaches a streaming client as a 200 whose body "
            "breaks off, not as a 429 with Retry-After (rerun with --no-stream to see the 429s)."
        )
    busy = info.get("load_max", 0.0) > (os.cpu_count() or 1)
    if busy:
        lines.append(
            f"The machine was busy (1-min load average up to {info['load_max']:.1f} on "
            f"{os.cpu_count()} cores, other jobs included): the server got a fraction of the CPU, so "
            "these numbers are bound by contention, not by the server alone."
        )
    errs = [(r["concurrency"], r["error_samples"]) for r in rows if r["errors"]]
    for c, samples in errs:
        lines.append(f"- errors at concurrency {c}: " + "; ".join(samples))
    lines += ["", "| goal | target | measured | met |", "|---|---|---|---|"]
    for g in gl:
        lines.append(f"| {g.measure} | {g.target} | {g.measured} | {'met' if g.met else 'NOT met'} |")
    lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], limit: int, first_429: int | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = [r["concurrency"] for r in rows]
    first_abort = next((r["concurrency"] for r in rows if r.get("aborted_streams")), None)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    axes[0].plot(c, [r["tokens_per_s"] for r in rows], "o-", color="tab:blue")
    axes[0].set_ylabel("completion tokens/s")
    axes[0].set_title("throughput")
    for ax, key, title in ((axes[1], "latency", "request latency"), (axes[2], "ttft", "time to first token")):
        ax.plot(c, [1e3 * r[f"{key}_p50_s"] for r in rows], "o-", label="p50")
        ax.plot(c, [1e3 * r[f"{key}_p99_s"] for r in rows], "s--", label="p99")
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.set_title(title)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.axvline(limit, color="gray", ls=":", label=f"max_batch + max_queue = {limit}")
        if first_429 is not None:
            ax.axvline(first_429, color="tab:red", ls="-", alpha=0.6, label=f"first 429 (c={first_429})")
        if first_abort is not None:
            ax.axvline(
                first_abort,
                color="tab:purple",
                ls="--",
                alpha=0.6,
                label=f"first aborted stream (c={first_abort})",
            )
        ax.set_xticks(c, [str(x) for x in c])
    axes[2].legend(fontsize=8)
    axes[0].legend(fontsize=8)
    savefig(fig, path)
    plt.close(fig)


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
    parser.add_argument("--concurrency", default="1,4,16,48,64,128", help="levels (default: %(default)s)")
    parser.add_argument(
        "--duration", type=float, default=12.0, help="seconds per level (default: %(default)s)"
    )
    parser.add_argument("--new-tokens", type=int, default=24, help="max_new_tokens (default: %(default)s)")
    parser.add_argument("--max-batch", type=int, default=16, help="SOFTSERVE_MAX_BATCH_SIZE (default: 16)")
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
    server: Server | None = None
    tmp = tempfile.TemporaryDirectory(prefix="softserve-http-load-")
    try:
        if not args.url:
            server = Server(args, Path(tmp.name))  # loads its model while we build the artifacts
        # the served model's fingerprint: the same model loaded here, on the CPU
        runner = load_model(args.model, dtype="float32", device="cpu")
        artifacts = build_artifacts(runner)
        model_name = runner.name
        del runner
        url = args.url or (server.url if server else "")
        if server is not None:
            server.wait_ready()
        print(f"[{time.perf_counter() - t_start:5.1f}s] server ready at {url}", flush=True)
        targets = register_tasks(url, artifacts, headers)
        targets += ["base"] * max(1, len(targets) // 4)  # about 1 in 5 requests on the bare model
        asyncio.run(warm_up(url, headers, targets))
        print(
            f"[{time.perf_counter() - t_start:5.1f}s] {len(targets)} targets registered and warm", flush=True
        )
        rows = []
        for c in levels:
            level = asyncio.run(run_level(url, headers, targets, c, args))
            row = summarize(level)
            rows.append(row)
            print(
                f"[{time.perf_counter() - t_start:5.1f}s] c={c}: ok {row['ok']}, 429 {row['429']}, "
                f"errors {row['errors']}, {row['tokens_per_s']:.1f} tok/s, "
                f"p50 {1e3 * row['latency_p50_s']:.0f} ms, ttft p50 {1e3 * row['ttft_p50_s']:.0f} ms",
                flush=True,
            )
        if server is not None and server.proc.poll() is not None:
            raise RuntimeError(f"server died during the run:\n{server.log_tail()}")
    finally:
        if server is not None:
            server.stop()
        tmp.cleanup()

    limit = args.max_batch + args.max_queue
    gl, extra = goals(rows, limit)
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
    info = {
        "load": f"{load_start:.1f} / {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)",
        "load_max": max([load_start, os.getloadavg()[0]] + [r["load_avg"] for r in rows]),
        "server": server_line,
        "client": f"httpx {httpx.__version__} AsyncClient, same machine",
        **extra,
    }
    report = render(args, rows, targets, info, gl)
    elapsed = time.perf_counter() - t_start
    report += f"\nwhole run (server start, registration, warm-up, all levels): {elapsed:.0f} s\n"
    data = {
        "settings": {k: v for k, v in vars(args).items() if k != "key"},
        "targets": targets,
        "levels": rows,
        "info": info,
        **extra,
        "elapsed_s": elapsed,
    }
    write_report(args.name, report, gl, data)
    plot(rows, limit, extra["first_429"], RESULTS / f"{args.name}.png")
    print(f"elapsed {time.perf_counter() - t_start:.1f} s (server start, registration, warm-up, all levels)")


if __name__ == "__main__":
    main()
