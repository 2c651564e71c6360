"""Serve smoke benchmark: 16 requests of 16 mixed soft-prompt tasks vs the bare model on the same shapes.

Prints and writes bench/results/serve_smoke.md. Every row generates exactly --new-tokens tokens (greedy, eos
ignored), so the mixed and the bare runs do the same amount of work:
- mixed: one request per task; tasks cycle through prompt tuning, P-tuning, prefix tuning, gist and ACCEPT
  (with SCAP) with different prefix lengths; task prefixes are warm in the device cache (converted once).
- bare (engine): the same engine with no task; each prompt has m + n tokens so the KV lengths match.
- bare (HF generate): the same bare batch through model.generate with left padding, for reference.
Goal: mixed tokens/s >= 0.9 x bare (engine).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import QUESTIONS, bench_runner, chat_ids, hardware_line  # noqa: E402

from prompt_store import SoftPrompt  # noqa: E402
from server.engine import Engine  # noqa: E402
from server.model_runner import ModelRunner  # noqa: E402
from server.requests import GenerationRequest, SamplingParams, TaskPrompt, TokenEvent  # noqa: E402

METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning", "gist", "accept")


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


def build_workload(runner: ModelRunner, n: int, seed: int = 0) -> tuple[list[TaskPrompt], list[list[int]]]:
    tasks, prompts = [], []
    for i in range(n):
        method = METHODS[i % len(METHODS)]
        m = 4 + (i * 5) % 29
        prompt = make_prompt(runner, method, m, seed + i)
        tasks.append(TaskPrompt(f"task-{i:02d}", 1, f"bench-{i}", method, prompt))
        question = QUESTIONS[i % len(QUESTIONS)]
        prompts.append(chat_ids(runner, question))
    return tasks, prompts


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


def run_engine(engine: Engine, requests: list[GenerationRequest]) -> Run:
    """All requests join at once; the first step prefills them, every later step decodes one token per row."""
    counts = [0] * len(requests)

    def counter(i: int) -> Callable[[TokenEvent], None]:
        def deliver(event: TokenEvent) -> None:
            counts[i] += event.token_id is not None

        return deliver

    t0 = time.perf_counter()
    for i, req in enumerate(requests):
        engine.enqueue(req, counter(i))
    engine.step()
    steps = []
    while engine.active or engine.queue_depth:
        rows, t = engine.active, time.perf_counter()
        engine.step()
        steps.append((time.perf_counter() - t, rows))
    return Run(time.perf_counter() - t0, sum(counts), steps)


@torch.inference_mode()
def run_hf_generate(runner: ModelRunner, prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), runner.pad_id, dtype=torch.long)  # [B, N]
    mask = torch.zeros(len(prompts), width, dtype=torch.long)  # [B, N]
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    t0 = time.perf_counter()
    out = runner.model.generate(  # min_new_tokens: every row runs all steps, like eos-less engine rows
        input_ids=ids.to(runner.device),
        attention_mask=mask.to(runner.device),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=runner.pad_id,
    )
    return time.perf_counter() - t0, (out.shape[1] - width) * len(prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_smoke.md"))
    args = parser.parse_args()
    runner = bench_runner(args.device, args.dtype, args.threads)
    tasks, prompts = build_workload(runner, args.requests)
    n_new = args.new_tokens
    bare_prompts = [[p[0]] * t.prompt.num_virtual_tokens + p for t, p in zip(tasks, prompts, strict=True)]
    engine = Engine(runner, max_batch_size=args.requests)

    def mixed() -> Run:
        reqs = [
            GenerationRequest(p, SamplingParams(max_new_tokens=n_new), t)
            for t, p in zip(tasks, prompts, strict=True)
        ]
        return run_engine(engine, reqs)

    def bare() -> Run:
        return run_engine(
            engine, [GenerationRequest(p, SamplingParams(max_new_tokens=n_new)) for p in bare_prompts]
        )

    run_engine(
        engine,
        [
            GenerationRequest(p, SamplingParams(max_new_tokens=3), t)
            for t, p in zip(tasks, prompts, strict=True)
        ],
    )
    runs: dict[str, list[Run]] = {"mixed": [], "bare": []}
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        runs["mixed"].append(mixed())
        runs["bare"].append(bare())
    hf = []
    for _ in range(args.repeats):
        seconds, tokens = run_hf_generate(runner, bare_prompts, n_new)
        hf.append(tokens / seconds)
    report = render(args, runner, tasks, prompts, runs, hf)
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(f"wrote {out}")


def render(
    args: argparse.Namespace,
    runner: ModelRunner,
    tasks: list[TaskPrompt],
    prompts: list[list[int]],
    runs: dict[str, list[Run]],
    hf: list[float],
) -> str:
    mixed, bare = runs["mixed"], runs["bare"]
    decode_m, decode_b = decode_rate(mixed), decode_rate(bare)
    median_m, median_b = decode_rate(mixed, 0.5), decode_rate(bare, 0.5)
    e2e_m, e2e_b = max(r.rate for r in mixed), max(r.rate for r in bare)
    ratio = decode_m / decode_b
    methods = ", ".join(f"{m} x{sum(t.method == m for t in tasks)}" for m in METHODS)
    prefix = [t.prompt.num_virtual_tokens for t in tasks]
    verdict = "met" if ratio >= 0.9 else "NOT met"
    lines = [
        "# serve smoke: mixed soft-prompt batch vs bare model",
        "",
        hardware_line(runner),
        f"- {len(tasks)} requests, one per task ({methods}); prefix lengths {min(prefix)}-{max(prefix)}, "
        f"prompt lengths {min(map(len, prompts))}-{max(map(len, prompts))}; "
        f"{args.new_tokens} new tokens each (greedy, eos ignored)",
        "- bare rows have m + n prompt tokens, so every row's KV length matches its mixed twin",
        f"- {args.repeats} interleaved runs each; decode tokens/s = 16 rows / 20th-percentile step time "
        "pooled over runs (median in brackets);",
        "  end-to-end = all tokens / wall time including prefill (best run)",
        "",
        "| run | decode tokens/s | end-to-end tokens/s | end-to-end, all runs |",
        "|---|---:|---:|---|",
        f"| mixed 16 tasks (engine) | {decode_m:.1f} ({median_m:.1f}) | {e2e_m:.1f} | {_fmt(mixed)} |",
        f"| bare model (engine) | {decode_b:.1f} ({median_b:.1f}) | {e2e_b:.1f} | {_fmt(bare)} |",
        f"| bare model (HF generate, left-padded) | | {max(hf):.1f} | {', '.join(f'{r:.1f}' for r in hf)} |",
        "",
        f"**decode ratio mixed / bare = {ratio:.3f}** (goal >= 0.9: {verdict}); "
        f"median-step ratio = {median_m / median_b:.3f}; end-to-end ratio = {e2e_m / e2e_b:.3f}; "
        f"mixed end-to-end / HF generate = {e2e_m / max(hf):.3f}",
        "",
    ]
    return "\n".join(lines)


def _fmt(runs: list[Run]) -> str:
    return ", ".join(f"{r.rate:.1f}" for r in runs)


if __name__ == "__main__":
    main()
