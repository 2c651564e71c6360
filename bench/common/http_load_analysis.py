"""bench/http_load.py's records (requests, levels), per-level summary rows, goals, report and plot."""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from harness import Goal, savefig

from common.stats import quantile

GAIN_TARGET = 6.0  # with the prompt cache on (issue 15; it was 4 before the cache)
CACHE_ON, CACHE_OFF = "prompt cache on", "prompt cache off"
CACHE_METRICS = ("softserve_prompt_cache_hit_tokens", "softserve_prompt_cache_miss_tokens")


def cache_counters(url: str, headers: dict[str, str]) -> dict[str, float]:
    """The server's prompt-cache hit and miss token counters (GET /metrics); {} when it has none."""
    try:
        text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        for name in CACHE_METRICS:
            if line.startswith((f"{name} ", f"{name}_total ")):
                out[name] = float(line.split()[1])
    return out


def cache_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Hit and miss tokens of one level, and its hit rate (prompt tokens reused / all prompt tokens)."""
    hit, miss = (after.get(n, 0.0) - before.get(n, 0.0) for n in CACHE_METRICS)
    return {
        "prompt_cache_hit_tokens": hit,
        "prompt_cache_miss_tokens": miss,
        "prompt_cache_hit_rate": hit / (hit + miss) if hit + miss else 0.0,
    }


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


def goals(rows: list[dict[str, Any]], limit: int, label: str = "") -> tuple[list[Goal], dict[str, Any]]:
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
            "without 429 or errors) / concurrency 1" + (f", {label}" if label else ""),
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
    reference: bool = False,
) -> str:
    """One pass's report; `reference`: a pass measured beside the goal pass (its goals shown unjudged)."""
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
    if reference:  # measured beside the goal pass, held to nothing
        lines += ["", "| measure (reference, no goal) | goal pass's target | measured |", "|---|---|---|"]
        lines += [f"| {g.measure} | {g.target} | {g.measured} |" for g in gl]
    else:
        lines += ["", "| goal | target | measured | met |", "|---|---|---|---|"]
        for g in gl:
            lines.append(f"| {g.measure} | {g.target} | {g.measured} | {'met' if g.met else 'NOT met'} |")
    lines.append("")
    return "\n".join(lines)


def render_comparison(
    passes: dict[str, list[dict[str, Any]]],
    per_pass: dict[str, tuple[list[Goal], dict[str, Any]]],
    limit: int,
) -> str:
    """The passes side by side per concurrency level (tokens/s, TTFT p50, prompt-cache hit rate)."""
    names = list(passes)
    lines = [
        "# HTTP load: prompt cache on vs off, side by side",
        "",
        "Both servers ran in the same run, every level on each in turn (alternating which goes first); "
        "details of each pass below.",
        "",
        "| concurrency | "
        + " | ".join(f"tokens/s, {n}" for n in names)
        + " | on / off | "
        + " | ".join(f"TTFT p50 ms, {n}" for n in names)
        + " | hit rate (cache on) |",
        "|---:|" + "---:|" * (2 * len(names) + 2),
    ]
    for i, first in enumerate(passes[names[0]]):
        row = [p[i] for p in passes.values()]
        ratio = row[0]["tokens_per_s"] / row[1]["tokens_per_s"] if row[1]["tokens_per_s"] else float("nan")
        lines.append(
            f"| {first['concurrency']} | "
            + " | ".join(f"{r['tokens_per_s']:.1f}" for r in row)
            + f" | {ratio:.2f} | "
            + " | ".join(f"{1e3 * r['ttft_p50_s']:.0f}" for r in row)
            + f" | {first.get('prompt_cache_hit_rate', 0.0):.3f} |"
        )
    lines.append("")
    for name, (_, extra) in per_pass.items():
        lines.append(
            f"- {name}: tokens/s at concurrency {extra['gain_level']} (highest <= {limit} without 429 or "
            f"errors) / concurrency 1 = **{extra['gain']:.2f}**"
            + (f" (goal >= {GAIN_TARGET:g})" if name == names[0] else " (reference, no goal)")
        )
    lines.append("")
    return "\n".join(lines)


def plot(passes: dict[str, list[dict[str, Any]]], limit: int, first_429: int | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = next(iter(passes.values()))
    c = [r["concurrency"] for r in rows]
    first_abort = next((r["concurrency"] for r in rows if r.get("aborted_streams")), None)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for k, (name, rs) in enumerate(passes.items()):
        style = "-" if k == 0 else ":"
        axes[0].plot(c, [r["tokens_per_s"] for r in rs], "o" + style, label=name)
        for ax, key in ((axes[1], "latency"), (axes[2], "ttft")):
            ax.plot(c, [1e3 * r[f"{key}_p50_s"] for r in rs], "o" + style, label=f"p50, {name}")
            ax.plot(c, [1e3 * r[f"{key}_p99_s"] for r in rs], "s" + style, label=f"p99, {name}")
    axes[0].set_ylabel("completion tokens/s")
    axes[0].set_title("throughput")
    for ax, title in ((axes[1], "request latency"), (axes[2], "time to first token")):
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
