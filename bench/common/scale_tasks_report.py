"""bench/scale_tasks.py's goals, Markdown report and plot."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from harness import Goal, hardware_line, savefig

from common.stats import quantile
from runtime.model_runner import ModelRunner

MiB = 1024 * 1024


def make_goals(rows: list[dict[str, Any]], cold: dict[str, Any], info: dict[str, Any]) -> list[Goal]:
    one, big = rows[0], rows[-1]
    label = f"{big['tasks']} tasks / {one['tasks']} task"
    dec = big["decode_tps"] / one["decode_tps"]
    e2e = big["e2e_tps"] / one["e2e_tps"]
    growth = big["rss"] - one["rss"]
    bound = info["cache_bytes"] + info["prefix_cache_bytes"] + info.get("prompt_cache_bytes", 0)
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
        f"{info['poll_interval_s']:g} s; prompt cache {args.prompt_cache} "
        f"({info.get('prompt_cache_bytes', 0) / MiB:.1f} MiB; off for the goals: with 1 task it would hold "
        "every request's chat template and the second rep's whole prompts, text reuse that shared_prefix "
        "and http_load measure)",
        f"- workload: {args.requests} requests prepared (server.service.prepare) and enqueued together, "
        f"tasks drawn uniformly over the registered ones; {args.new_tokens} new tokens each "
        "(greedy, eos ignored); "
        f"{args.reps} reps per task count, new draws each",
        "- decode = rows / 20th-percentile full-batch step (median step in brackets); end-to-end = tokens / "
        "(first prepare -> last token), median over reps; store / prefix KV / prefill = seconds per run "
        "spent in store reads, prefix-KV conversion and the first engine step (median)",
        "- hit rates and evictions over the count's reps (serving: one lookup per request; prefix: one per "
        "distinct task per admission step); RSS and cache bytes after them; RSS after the "
        f"bare warm-up: {info['rss_start'] / MiB:.0f} MiB",
        "",
        "| tasks | decode tok/s | end-to-end tok/s | store s | prefix KV s | prefill s | serving hit "
        "| prefix hit | evictions (serving / prefix) | serving cache MiB | prefix cache MiB "
        "| prompt cache MiB | RSS MiB "
        "| store MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sb = "" if r["store_bytes"] is None else f"{r['store_bytes'] / MiB:.1f}"
        lines.append(
            f"| {r['tasks']} | {r['decode_tps']:.1f} ({r['decode_tps_median']:.1f}) | {r['e2e_tps']:.1f} | "
            f"{r['store_s']:.3f} | {r['prefix_kv_s']:.3f} | {r['prefill_s']:.3f} | "
            f"{r['serve_hit_rate']:.2f} | {r['prefix_hit_rate']:.2f} | "
            f"{r['serve_evictions']} / {r['prefix_evictions']} | {r['serve_cache_bytes'] / MiB:.1f} | "
            f"{r['prefix_cache_bytes'] / MiB:.1f} | {r.get('prompt_cache_bytes', 0) / MiB:.1f} "
            f"| {r['rss'] / MiB:.0f} | {sb} |"
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
