"""Serve smoke benchmark: 16 and 64 concurrent requests over 16 mixed soft-prompt tasks vs the bare model.

Writes bench/results/serve_smoke.md, .json (goals + raw data) and .png. Every row generates exactly
--new-tokens tokens (greedy, eos ignored), so the mixed and the bare runs do the same amount of work:
- mixed: --requests rows over 16 tasks (4 requests per task at 64, each with a different question); tasks
  cycle through prompt tuning, P-tuning, prefix tuning, gist and ACCEPT (with SCAP) with KV prefix lengths
  2-30; task prefixes are warm in the device cache (converted once).
- bare (engine): the same engine with no task; each prompt has m + n tokens so the KV lengths match.
- bare (HF generate): the same bare batch through model.generate with left padding, for reference.
Goal for each request count: mixed decode tokens/s >= 0.9 x bare (engine).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

from prompt_store import SoftPrompt, TaskPrompt  # noqa: E402
from runtime.model_runner import ModelRunner  # noqa: E402
from server.engine import Engine  # noqa: E402
from server.requests import GenerationRequest, SamplingParams, TokenEvent  # noqa: E402

METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning", "gist", "accept")
GOAL = 0.9


def make_prompt(runner: ModelRunner, method: str, m: int, seed: int) -> SoftPrompt:
    g = torch.Generator().manual_seed(seed)
    d = runner.hidden_size
    ids = torch.randint(100, 10_000, (m,), generator=g)
    embeds = runner.embed(ids).float().cpu()  # [m, d]
    if method in ("prompt_tuning", "p_tuning"):
        return SoftPrompt(embeds=embeds, next_position=m)
    if method == "accept":
        added = torch.randn(4, d, generator=g) * 0.01  # [s, d]
        return SoftPrompt(embeds=embeds, next_position=m, added=added)
    keys, values = runner.prefix_kv(SoftPrompt(embeds=embeds))  # [L, Hkv, m, Dh] each
    if method == "gist":  # k gist positions computed after an m-token instruction
        k = max(1, m // 4)
        return SoftPrompt(keys=keys[:, :, -k:], values=values[:, :, -k:], next_position=m)
    return SoftPrompt(keys=keys, values=values, next_position=m)


def build_tasks(runner: ModelRunner, n: int, seed: int = 0) -> list[TaskPrompt]:
    tasks = []
    for i in range(n):
        method = METHODS[i % len(METHODS)]
        m = 4 + (i * 5) % 29
        prompt = make_prompt(runner, method, m, seed + i)
        tasks.append(TaskPrompt(f"task-{i:02d}", 1, f"bench-{i}", method, prompt))
    return tasks


def build_workload(
    runner: ModelRunner, tasks: list[TaskPrompt], n: int
) -> tuple[list[TaskPrompt], list[list[int]]]:
    """Request j goes to task j % T; the requests of one task ask different questions (while 8 last)."""
    row_tasks, prompts = [], []
    for j in range(n):
        t = j % len(tasks)
        row_tasks.append(tasks[t])
        prompts.append(chat_ids(runner, QUESTIONS[(t + j // len(tasks)) % len(QUESTIONS)]))
    return row_tasks, prompts


@dataclass
class Run:
    seconds: float  # end to end: admission, prefill and every decode step
    tokens: int
    decode_steps: list[tuple[float, int]]  # (seconds, rows) of each later step: one token per row

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def decode_rate(runs: list[Run], quantile: float = 0.2) -> float:
    """Rows / a low quantile of the full-batch decode step times pooled over runs.

    On a shared machine other processes only ever add time to a step, so a low quantile is the stable
    estimate of what a step costs; the median is reported next to it.
    """
    full = max(rows for r in runs for _, rows in r.decode_steps)
    times = sorted(t for r in runs for t, rows in r.decode_steps if rows == full)
    return full / times[min(len(times) - 1, int(quantile * len(times)))]


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for queued device work before a clock is read (a no-op off CUDA)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def run_engine(engine: Engine, requests: list[GenerationRequest]) -> Run:
    """All requests join at once; the first step prefills (untimed), each later one decodes a token a row."""
    counts = [0] * len(requests)
    sync = synchronizer(engine.runner.device)

    def counter(i: int) -> Callable[[TokenEvent], None]:
        def deliver(event: TokenEvent) -> None:
            counts[i] += event.token_id is not None

        return deliver

    sync()
    t0 = time.perf_counter()
    for i, req in enumerate(requests):
        engine.enqueue(req, counter(i))
    engine.step()
    steps = []
    while engine.active or engine.queue_depth:
        sync()
        rows, t = engine.active, time.perf_counter()
        engine.step()
        sync()
        steps.append((time.perf_counter() - t, rows))
    return Run(time.perf_counter() - t0, sum(counts), steps)


class _StepClock:
    """A logits processor that only notes the time: generate calls it once per generated token."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.sync()
        self.times.append(time.perf_counter())
        return scores


@torch.inference_mode()
def run_hf_generate(runner: ModelRunner, prompts: list[list[int]], new_tokens: int) -> Run:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), runner.pad_id, dtype=torch.long)  # [B, N]
    mask = torch.zeros(len(prompts), width, dtype=torch.long)  # [B, N]
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    ids, mask = ids.to(runner.device), mask.to(runner.device)
    sync = synchronizer(runner.device)
    clock = _StepClock(sync)
    sync()
    t0 = time.perf_counter()
    out = runner.model.generate(  # min_new_tokens: every row runs all steps, like eos-less engine rows
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=runner.pad_id,
        logits_processor=[clock],
    )
    sync()
    seconds = time.perf_counter() - t0
    steps = [(b - a, len(prompts)) for a, b in zip(clock.times[:-1], clock.times[1:], strict=True)]
    return Run(seconds, (out.shape[1] - width) * len(prompts), steps)


def measure(engine: Engine, tasks: list[TaskPrompt], n: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    """Mixed, bare and HF generate runs for n concurrent requests; rates, ratio and the workload's shape."""
    runner = engine.runner
    row_tasks, prompts = build_workload(runner, tasks, n)
    bare_prompts = [[p[0]] * t.prompt.num_virtual_tokens + p for t, p in zip(row_tasks, prompts, strict=True)]
    params = SamplingParams(max_new_tokens=new_tokens)
    runs: dict[str, list[Run]] = {"mixed": [], "bare": [], "hf": []}
    for _ in range(repeats):  # interleaved, so machine noise hits both alike
        mixed = [GenerationRequest(p, params, t) for t, p in zip(row_tasks, prompts, strict=True)]
        runs["mixed"].append(run_engine(engine, mixed))
        runs["bare"].append(run_engine(engine, [GenerationRequest(p, params) for p in bare_prompts]))
    for _ in range(max(1, repeats // 2)):
        runs["hf"].append(run_hf_generate(runner, bare_prompts, new_tokens))
    result: dict[str, Any] = {"requests": n, "tasks": len({t.task_id for t in row_tasks}), "repeats": repeats}
    for name, rs in runs.items():
        result[name] = {
            "decode": decode_rate(rs),
            "decode_median": decode_rate(rs, 0.5),
            "e2e": max(r.rate for r in rs),
            "e2e_all": [r.rate for r in rs],
        }
    result["ratio"] = result["mixed"]["decode"] / result["bare"]["decode"]
    result["ratio_median"] = result["mixed"]["decode_median"] / result["bare"]["decode_median"]
    result["ratio_e2e"] = result["mixed"]["e2e"] / result["bare"]["e2e"]
    result["prefix_lengths"] = sorted({t.prompt.num_virtual_tokens for t in row_tasks})
    result["prompt_lengths"] = [min(map(len, prompts)), max(map(len, prompts))]
    result["methods"] = {m: sum(t.method == m for t in row_tasks) for m in METHODS}
    return result


def request_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"request counts must be positive integers, got {text!r}")
    return sizes


def main() -> None:
    t_start = time.perf_counter()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_device_args(parser)
    parser.add_argument(
        "--requests",
        type=request_sizes,
        default=[16, 64],
        help="concurrent requests, a comma list (default: 16,64)",
    )
    parser.add_argument(
        "--tasks", type=int, default=16, help="distinct tasks the requests share (default: 16)"
    )
    parser.add_argument(
        "--new-tokens", type=int, default=32, help="tokens each row generates, >= 3 (default: 32)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=4,
        help="interleaved mixed/bare runs at <= 16 requests; scaled by 16/n above that, at least 2 "
        "(default: 4; HF generate runs half as often)",
    )
    args = parser.parse_args()
    if args.new_tokens < 3:
        parser.error(
            f"--new-tokens must be >= 3 (got {args.new_tokens}): the first engine step prefills and decodes "
            "2 tokens, only the later decode steps are timed"
        )
    if args.tasks <= 0 or args.repeats <= 0:
        parser.error("--tasks and --repeats must be positive")
    runner = bench_runner(args.device, args.dtype, args.threads)
    tasks = build_tasks(runner, args.tasks)
    engine = Engine(runner, max_batch_size=max(args.requests))
    warm_tasks, warm_prompts = build_workload(runner, tasks, len(tasks))  # converts every prefix once
    run_engine(
        engine,
        [
            GenerationRequest(p, SamplingParams(max_new_tokens=3), t)
            for t, p in zip(warm_tasks, warm_prompts, strict=True)
        ],
    )
    results = []
    for n in args.requests:
        repeats = max(2, round(args.repeats * 16 / max(n, 16))) if args.repeats > 1 else 1
        results.append(measure(engine, tasks, n, args.new_tokens, repeats))
        print(
            f"{n} requests: decode ratio mixed / bare = {results[-1]['ratio']:.3f} "
            f"({time.perf_counter() - t_start:.0f} s so far)",
            flush=True,
        )
    goals = [
        Goal(
            f"mixed-batch decode tokens/s / bare, {r['requests']} requests",
            f">= {GOAL}",
            f"{r['ratio']:.3f}",
            r["ratio"] >= GOAL,
        )
        for r in results
    ]
    elapsed = time.perf_counter() - t_start
    data = {
        "new_tokens": args.new_tokens,
        "device": str(runner.device),
        "results": results,
        "seconds": elapsed,
    }
    write_report("serve_smoke", render(args, runner, results), goals, data)
    plot(results, runner, RESULTS / "serve_smoke.png")
    print(f"elapsed {time.perf_counter() - t_start:.1f} s")


def render(args: argparse.Namespace, runner: ModelRunner, results: list[dict[str, Any]]) -> str:
    first = results[0]
    methods = ", ".join(f"{m} x{c}" for m, c in first["methods"].items())
    lines = [
        "# serve smoke: mixed soft-prompt batch vs bare model",
        "",
        hardware_line(runner),
        f"- {' and '.join(str(r['requests']) for r in results)} concurrent requests over {first['tasks']} "
        "tasks "
        f"(at {first['requests']}: {methods}); prefix lengths {min(first['prefix_lengths'])}-"
        f"{max(first['prefix_lengths'])}; {args.new_tokens} new tokens per row (greedy, eos ignored)",
        "- bare rows have m + n prompt tokens, so every row's KV length matches its mixed twin",
        "- decode tokens/s = rows / 20th-percentile full-batch step time pooled over runs "
        "(median in brackets); "
        "end-to-end = all tokens / wall time including prefill (best run); mixed and bare runs interleave",
        "",
        "| requests | runs | mixed decode tok/s | bare decode tok/s | HF generate decode tok/s | "
        "**mixed / bare** | median-step ratio | end-to-end mixed / bare / HF |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        m, b, h = r["mixed"], r["bare"], r["hf"]
        verdict = "met" if r["ratio"] >= GOAL else "NOT met"
        lines.append(
            f"| {r['requests']} | {r['repeats']} | {m['decode']:.1f} ({m['decode_median']:.1f}) | "
            f"{b['decode']:.1f} ({b['decode_median']:.1f}) | {h['decode']:.1f} ({h['decode_median']:.1f}) | "
            f"**{r['ratio']:.3f}** ({verdict}) | {r['ratio_median']:.3f} | "
            f"{m['e2e']:.1f} / {b['e2e']:.1f} / {h['e2e']:.1f} |"
        )
    lines += ["", f"Goal: mixed / bare decode ratio >= {GOAL} at every request count.", ""]
    return "\n".join(lines)


def device_name(runner: ModelRunner) -> str:
    if runner.device.type == "cuda":
        return torch.cuda.get_device_name(runner.device)
    return f"{torch.get_num_threads()} CPU threads, {os.cpu_count()} cores {platform.machine()}"


def plot(results: list[dict[str, Any]], runner: ModelRunner, path: Path) -> None:
    """Grouped bars per request count: mixed, bare and HF generate decode tokens/s, the ratio above."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [
        ("mixed", f"mixed {results[0]['tasks']} tasks (engine)", "tab:blue"),
        ("bare", "bare model (engine)", "tab:gray"),
        ("hf", "bare model (HF generate)", "tab:orange"),
    ]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    width = 0.26
    for k, (key, label, color) in enumerate(series):
        xs = [i + (k - 1) * width for i in range(len(results))]
        ys = [r[key]["decode"] for r in results]
        bars = ax.bar(xs, ys, width, label=label, color=color)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    for i, r in enumerate(results):
        top = max(r[key]["decode"] for key, _, _ in series)
        ax.annotate(
            f"mixed / bare = {r['ratio']:.3f}", (i, top * 1.09), ha="center", fontsize=10, weight="bold"
        )
    ax.set_xticks(range(len(results)), [f"{r['requests']} requests" for r in results])
    ax.set_ylabel("decode tokens/s (higher is better)")
    ax.set_ylim(0, 1.25 * max(r[key]["decode"] for r in results for key, _, _ in series))
    ax.set_title(
        f"Mixed soft-prompt batch vs bare model\n{runner.name} {str(runner.dtype).removeprefix('torch.')}, "
        f"{device_name(runner)}",
        fontsize=10,
    )
    ax.legend(loc="upper left", fontsize=9)
    savefig(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
