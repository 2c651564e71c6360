"""Shared-prefix benchmark: the prompt cache (automatic prefix caching of prompt tokens) on SmolLM2.

Writes bench/results/shared_prefix.md, .json and .png. Two in-process engines over the same runner, one with
the prompt cache on (prompt_cache_bytes --cache-mib MiB) and one with it off (0), side by side in one run:
- TTFT (enqueue -> first token, max_new_tokens=1, greedy, one request at a time): a request made of a
  --prefix-tokens system prompt that is already cached (one warm-up request first) + a distinct
  --suffix-tokens suffix, vs a plain --suffix-tokens prompt (distinct every repetition, so never a hit); the
  same long request with the cache off for reference. All rows interleaved in rotating order over --reps.
  Goal: median TTFT with the cached prefix / median TTFT of the plain short prompt <= 1.25.
- Throughput: --requests requests enqueued at once, each the shared system prompt + a distinct short suffix,
  --new-tokens tokens each (eos ignored), batch --requests; tokens/s = generated tokens / wall time from the
  first enqueue to the last token. Cache on (its system prompt cached by one earlier request, as for a
  prompt every caller of a task sends) vs cache off, alternating, --batch-reps times; the cache's hit rate is
  printed. Goal: median tokens/s cache on / cache off >= 3.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.stats import quantile  # noqa: E402
from harness import (  # noqa: E402
    QUESTIONS,
    RESULTS,
    Goal,
    add_device_args,
    bench_runner,
    hardware_line,
    savefig,
    write_report,
)

from runtime.model_runner import ModelRunner  # noqa: E402
from server.engine import Engine  # noqa: E402
from server.requests import GenerationRequest, SamplingParams, TokenEvent  # noqa: E402

TTFT_GOAL = 1.25
THROUGHPUT_GOAL = 3.0
SYSTEM = (
    "You are the support assistant of Northwind Outfitters, a retailer of outdoor gear. Answer politely and "
    "briefly. Rules: never invent order numbers; quote prices in euros; refer warranty claims older than two "
    "years to a human agent; recommend products only from the current catalogue; when a customer is upset, "
    "apologise once and then solve the problem. Catalogue: tents (two-person, four-person, ultralight), "
    "sleeping bags rated to minus five and minus fifteen degrees, stoves that burn gas or alcohol, water "
    "filters, headlamps, trekking poles, rain jackets in six sizes, and hiking boots for wide feet. "
)


def tokens(runner: ModelRunner, text: str) -> list[int]:
    return [int(t) for t in runner.tokenizer(text, add_special_tokens=False)["input_ids"]]


def exact(ids: list[int], n: int) -> list[int]:
    """`ids` cut or cycled to exactly n tokens."""
    return [ids[i % len(ids)] for i in range(n)]


def system_prompt(runner: ModelRunner, n: int) -> list[int]:
    """A realistic system prompt of exactly n tokens (the instructions repeated as few-shot padding)."""
    return exact(tokens(runner, SYSTEM * (1 + 4 * n // max(1, len(SYSTEM.split())))), n)


def suffix(runner: ModelRunner, i: int, n: int) -> list[int]:
    """A distinct user turn of exactly n tokens (its first tokens carry i, so no two share a block)."""
    return exact(tokens(runner, f" Ticket {i}: {QUESTIONS[i % len(QUESTIONS)]}"), n)


def run_batch(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, int, list[float]]:
    """Enqueue every prompt at once, step until all finish: (wall s, tokens generated, TTFTs)."""
    counts = [0] * len(prompts)
    first: list[float] = [0.0] * len(prompts)
    t0 = time.perf_counter()

    def deliver_for(i: int) -> Any:
        def deliver(event: TokenEvent) -> None:
            if event.token_id is not None:
                if counts[i] == 0:
                    first[i] = time.perf_counter() - t0
                counts[i] += 1

        return deliver

    for i, ids in enumerate(prompts):
        engine.enqueue(
            GenerationRequest(list(ids), SamplingParams(max_new_tokens=new_tokens)), deliver_for(i)
        )
    while engine.active or engine.queue_depth:
        engine.step()
    return time.perf_counter() - t0, sum(counts), first


def ttft(engine: Engine, ids: list[int]) -> float:
    wall, n, _ = run_batch(engine, [ids], 1)
    assert n == 1, "no token"
    return wall


def hit_counts(engine: Engine) -> tuple[int, int]:
    s = engine.stats()
    return int(s["prompt_cache_hit_tokens"]), int(s["prompt_cache_miss_tokens"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(parser)
    parser.add_argument("--prefix-tokens", type=int, default=500, help="shared system prompt (default: 500)")
    parser.add_argument("--suffix-tokens", type=int, default=20, help="distinct suffix / plain prompt (20)")
    parser.add_argument("--reps", type=int, default=15, help="TTFT repetitions per row (default: 15)")
    parser.add_argument("--requests", type=int, default=64, help="requests in the throughput run (64)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens per request, throughput (16)")
    parser.add_argument("--batch-reps", type=int, default=2, help="throughput runs per cache setting (2)")
    parser.add_argument("--cache-mib", type=int, default=256, help="prompt cache MiB when on (default: 256)")
    args = parser.parse_args()
    runner = bench_runner(args.device, args.dtype, args.threads)
    system = system_prompt(runner, args.prefix_tokens)
    capacity = args.prefix_tokens + args.suffix_tokens + args.new_tokens + 8
    engines = {
        on: Engine(
            runner,
            max_batch_size=args.requests,
            max_queue=args.requests,
            row_capacity=capacity,
            prompt_cache_bytes=args.cache_mib * 2**20 if on else 0,
        )
        for on in (True, False)
    }
    on, off = engines[True], engines[False]
    serial = iter(range(10**9))

    def long_prompt() -> list[int]:
        return system + suffix(runner, next(serial), args.suffix_tokens)

    def plain_prompt() -> list[int]:
        return suffix(runner, next(serial), args.suffix_tokens)

    # ---- TTFT: warm-up (every path, and the system prompt into the cache), then interleaved reps ----
    for _ in range(2):
        ttft(on, long_prompt())
        ttft(off, long_prompt())
        ttft(on, plain_prompt())
        ttft(off, plain_prompt())
    hits0 = hit_counts(on)
    runs = [
        ("cache on: cached system prompt + suffix", lambda: ttft(on, long_prompt())),
        ("cache on: plain short prompt", lambda: ttft(on, plain_prompt())),
        ("cache off: system prompt + suffix", lambda: ttft(off, long_prompt())),
        ("cache off: plain short prompt", lambda: ttft(off, plain_prompt())),
    ]
    samples: dict[str, list[float]] = {name: [] for name, _ in runs}
    for rep in range(args.reps):
        shift = rep % len(runs)  # rotate the order so drift and noise hit every row alike
        for name, fn in runs[shift:] + runs[:shift]:
            samples[name].append(fn())
    hits1 = hit_counts(on)
    ttft_hit = (hits1[0] - hits0[0], hits1[1] - hits0[1])
    print(
        f"TTFT done: { ({k: round(1e3 * statistics.median(v), 1) for k, v in samples.items()}) }", flush=True
    )

    # ---- throughput: the requests at once, cache on vs off, alternating ----
    batch: dict[str, list[dict[str, float]]] = {"cache on": [], "cache off": []}
    for rep in range(args.batch_reps):
        order = (
            (("cache on", on), ("cache off", off)) if rep % 2 == 0 else (("cache off", off), ("cache on", on))
        )
        for name, engine in order:
            prompts = [long_prompt() for _ in range(args.requests)]
            before = hit_counts(engine)
            wall, n, first = run_batch(engine, prompts, args.new_tokens)
            after = hit_counts(engine)
            hit, miss = after[0] - before[0], after[1] - before[1]
            row = {
                "wall_s": wall,
                "tokens": n,
                "tokens_per_s": n / wall,
                "ttft_p50_s": statistics.median(first),
                "hit_tokens": hit,
                "miss_tokens": miss,
                "hit_rate": hit / (hit + miss) if hit + miss else 0.0,
            }
            batch[name].append(row)
            print(
                f"{name} rep {rep}: {n} tokens in {wall:.2f} s = {n / wall:.1f} tok/s, "
                f"hit rate {row['hit_rate']:.3f}",
                flush=True,
            )
    stats_on = on.stats()
    report, gl = render(args, runner, samples, batch, ttft_hit, stats_on)
    data = {
        "settings": vars(args),
        "ttft_seconds": samples,
        "ttft_hit_miss_tokens": ttft_hit,
        "throughput": batch,
        "engine_stats_cache_on": {k: v for k, v in stats_on.items() if k.startswith("prompt_cache")},
    }
    write_report("shared_prefix", report, gl, data)
    plot(samples, batch, RESULTS / "shared_prefix.png", runner)


def medians(batch: dict[str, list[dict[str, float]]], key: str) -> dict[str, float]:
    return {name: statistics.median(r[key] for r in rows) for name, rows in batch.items()}


def render(
    args: argparse.Namespace,
    runner: ModelRunner,
    samples: dict[str, list[float]],
    batch: dict[str, list[dict[str, float]]],
    ttft_hit: tuple[int, int],
    stats_on: dict[str, Any],
) -> tuple[str, list[Goal]]:
    plain = statistics.median(samples["cache on: plain short prompt"])
    cached = statistics.median(samples["cache on: cached system prompt + suffix"])
    ratio = cached / plain
    tps = medians(batch, "tokens_per_s")
    speedup = tps["cache on"] / tps["cache off"]
    hit_rate = statistics.median(r["hit_rate"] for r in batch["cache on"])
    gl = [
        Goal(
            f"TTFT, cached {args.prefix_tokens}-token system prompt + {args.suffix_tokens}-token suffix / "
            f"plain {args.suffix_tokens}-token prompt",
            f"<= {TTFT_GOAL:g}",
            f"{ratio:.3f}",
            ratio <= TTFT_GOAL,
        ),
        Goal(
            f"tokens/s, {args.requests} requests sharing a {args.prefix_tokens}-token prefix, "
            "prompt cache on / off",
            f">= {THROUGHPUT_GOAL:g}",
            f"{speedup:.2f} (hit rate {hit_rate:.3f})",
            speedup >= THROUGHPUT_GOAL,
        ),
    ]
    ms = 1e3
    lines = [
        "# shared prefix: the prompt cache (automatic prefix caching) on vs off",
        "",
        hardware_line(runner),
        f"- prompts: a {args.prefix_tokens}-token system prompt shared by every long request + a distinct "
        f"{args.suffix_tokens}-token user turn; plain = a distinct {args.suffix_tokens}-token prompt alone; "
        f"greedy, eos ignored; prompt cache {args.cache_mib} MiB when on, 0 when off; KV rows of "
        f"{args.prefix_tokens + args.suffix_tokens + args.new_tokens + 8} tokens",
        f"- TTFT: one request at a time, enqueue -> first token, {args.reps} repetitions per row, rows "
        "interleaved in rotating order; the system prompt was cached by a warm-up request",
        f"- throughput: {args.requests} requests enqueued at once (batch {args.requests}), "
        f"{args.new_tokens} new tokens each; tokens/s = generated tokens / wall time (enqueue -> last "
        "token); median of "
        f"{args.batch_reps} runs per setting, alternating; with the cache on the system prompt was cached by "
        "earlier requests",
        "",
        "| TTFT row | median ms | p90 ms | median / plain (cache on) |",
        "|---|---:|---:|---:|",
    ]
    for name, xs in samples.items():
        med = statistics.median(xs)
        lines.append(f"| {name} | {ms * med:.1f} | {ms * quantile(xs, 0.9):.1f} | {med / plain:.3f} |")
    hit, miss = ttft_hit
    lines += [
        "",
        f"prompt cache during the TTFT rows: {hit} hit tokens, {miss} miss tokens "
        f"(hit rate {hit / (hit + miss) if hit + miss else 0.0:.3f}; the plain prompts always miss)",
        "",
        "| throughput | tokens/s (median) | runs tok/s | wall s (median) | TTFT p50 ms (median) | hit rate |",
        "|---|---:|---|---:|---:|---:|",
    ]
    walls, firsts, rates = medians(batch, "wall_s"), medians(batch, "ttft_p50_s"), medians(batch, "hit_rate")
    for name, rows in batch.items():
        each = ", ".join(f"{r['tokens_per_s']:.1f}" for r in rows)
        lines.append(
            f"| {name} | {tps[name]:.1f} | {each} | {walls[name]:.2f} | {ms * firsts[name]:.0f} "
            f"| {rates[name]:.3f} |"
        )
    lines += [
        "",
        f"prompt cache at the end (cache on): {stats_on['prompt_cache_blocks']} blocks, "
        f"{stats_on['prompt_cache_bytes'] / 2**20:.1f} MiB, {stats_on['prompt_cache_evictions']} evictions, "
        f"overall hit rate {stats_on['prompt_cache_hit_rate']:.3f}",
        "",
        f"- **TTFT cached / plain = {ratio:.3f}** (goal <= {TTFT_GOAL:g}: "
        f"{'met' if gl[0].met else 'NOT met'})",
        f"- **throughput cache on / off = {speedup:.2f}x** (goal >= {THROUGHPUT_GOAL:g}: "
        f"{'met' if gl[1].met else 'NOT met'}); hit rate {hit_rate:.3f}",
        "",
    ]
    return "\n".join(lines), gl


def plot(
    samples: dict[str, list[float]], batch: dict[str, list[dict[str, float]]], path: Path, runner: ModelRunner
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    names = list(samples)
    med = [1e3 * statistics.median(samples[n]) for n in names]
    colors = ["tab:green" if n.startswith("cache on") else "tab:gray" for n in names]
    ax0.barh(names, med, color=colors)
    ax0.invert_yaxis()
    ax0.set_xlabel("median time to first token (ms)")
    ax0.set_title(f"TTFT, {runner.name} on {runner.device}")
    tps = medians(batch, "tokens_per_s")
    ax1.bar(list(tps), list(tps.values()), color=["tab:green", "tab:gray"])
    ax1.set_ylabel("tokens/s")
    ax1.set_title("shared-prefix batch throughput")
    savefig(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
