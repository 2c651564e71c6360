"""Prefix TTFT benchmark: time to first token with 20- and 100-token soft prompts vs the bare model.

Prints and writes bench/results/prefix_ttft.md and a bar chart bench/results/prefix_ttft.png. One request at a
time (max_new_tokens=1, greedy), the same chat-formatted input for every row:
- bare (engine): the engine with no task.
- engine, cached prefix: a prompt-tuning task of m virtual tokens whose KV prefix is already in the engine's
  prefix cache (the embedding prefix runs through the model once per task version, then it is reused).
- engine, cold: the first request of a new task version (conversion of the prefix + prefill), measured with
  a fresh task version every repetition.
- naive prepend (HF forward): model(inputs_embeds=[soft prompt ; embed(input)]) every request, i.e. prefill
  over m + n tokens, argmax of the last logits; also the bare HF forward over n tokens for reference.
Engine TTFT = enqueue -> first token delivered (one engine step). All configs are interleaved per repetition.
Goal: engine TTFT with a cached prefix <= 1.15 x bare (engine).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.stats import quantile  # noqa: E402
from harness import (  # noqa: E402
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

LENGTHS = (20, 100)
QUESTION = "Explain photosynthesis in one sentence for a child who is eight years old."


def soft_prompt(runner: ModelRunner, m: int, seed: int) -> SoftPrompt:
    """A prompt-tuning serving form: m embeddings of random vocabulary tokens (vocab init)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 10_000, (m,), generator=g)
    return SoftPrompt(embeds=runner.embed(ids).float().cpu(), next_position=m)  # [m, d]


def engine_ttft(engine: Engine, ids: list[int], task: TaskPrompt | None) -> tuple[float, int]:
    """Seconds from enqueue to the first token event, and that token."""
    got: list[tuple[float, int]] = []

    def deliver(event: TokenEvent) -> None:
        if event.token_id is not None and not got:
            got.append((time.perf_counter(), event.token_id))

    t0 = time.perf_counter()
    engine.enqueue(GenerationRequest(list(ids), SamplingParams(max_new_tokens=1), task), deliver)
    while engine.active or engine.queue_depth:
        engine.step()
    assert got, "no token"
    return got[0][0] - t0, got[0][1]


@torch.inference_mode()
def naive_ttft(runner: ModelRunner, ids: list[int], prompt: torch.Tensor | None) -> tuple[float, int]:
    """HF forward over [prompt ; embed(ids)] (prefill of m + n tokens), argmax of the last logits."""
    t0 = time.perf_counter()
    x = runner.model.get_input_embeddings()(torch.tensor(ids, device=runner.device))  # [n, d]
    if prompt is not None:
        x = torch.cat([prompt, x])  # [m + n, d]
    mask = torch.ones(1, x.shape[0], dtype=torch.long, device=runner.device)  # [1, m + n]
    out = runner.model(inputs_embeds=x[None], attention_mask=mask, use_cache=True, logits_to_keep=1)
    token = int(out.logits[0, -1].argmax())
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(parser)
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions per row (default: 30)")
    args = parser.parse_args()
    runner = bench_runner(args.device, args.dtype, args.threads)
    ids = chat_ids(runner, QUESTION)
    engine = Engine(runner, max_batch_size=4)
    prompts = {m: soft_prompt(runner, m, seed=m) for m in LENGTHS}
    device_prompts = {
        m: p.embeds.to(runner.device, runner.dtype) for m, p in prompts.items() if p.embeds is not None
    }
    tasks = {m: TaskPrompt(f"ttft-{m}", 1, f"sha-{m}-1", "prompt_tuning", prompts[m]) for m in LENGTHS}

    samples: dict[str, list[float]] = {}
    tokens: dict[str, set[int]] = {}

    def record(name: str, result: tuple[float, int]) -> None:
        samples.setdefault(name, []).append(result[0])
        tokens.setdefault(name, set()).add(result[1])

    # cold: the very first request of each task (before any warm-up of that task)
    first_cold = {m: engine_ttft(engine, ids, tasks[m])[0] for m in LENGTHS}
    for _ in range(3):  # warm-up of every path
        engine_ttft(engine, ids, None)
        for m in LENGTHS:
            engine_ttft(engine, ids, tasks[m])
            naive_ttft(runner, ids, device_prompts[m])
        naive_ttft(runner, ids, None)
    version = 1
    for rep in range(args.reps):
        version += 1
        runs = [("bare (engine)", lambda: engine_ttft(engine, ids, None))]
        runs.append(("bare (HF forward)", lambda: naive_ttft(runner, ids, None)))
        for m in LENGTHS:
            cold_task = TaskPrompt(f"ttft-{m}", version, f"sha-{m}-{version}", "prompt_tuning", prompts[m])
            runs.append((f"m={m} engine, cached prefix", lambda m=m: engine_ttft(engine, ids, tasks[m])))
            runs.append((f"m={m} engine, cold", lambda t=cold_task: engine_ttft(engine, ids, t)))
            runs.append(
                (f"m={m} naive prepend (HF forward)", lambda m=m: naive_ttft(runner, ids, device_prompts[m]))
            )
        shift = rep % len(runs)  # rotate the order so drift and noise hit every config alike
        for name, fn in runs[shift:] + runs[:shift]:
            record(name, fn())
    report = render(args, runner, ids, samples, tokens, first_cold)
    data = {"input_tokens": len(ids), "seconds": samples, "first_cold_s": first_cold}
    write_report("prefix_ttft", report, goals(samples), data)
    plot(samples, RESULTS / "prefix_ttft.png", runner)


def goals(samples: dict[str, list[float]]) -> list[Goal]:
    bare = statistics.median(samples["bare (engine)"])
    out = []
    for m in LENGTHS:
        ratio = statistics.median(samples[f"m={m} engine, cached prefix"]) / bare
        out.append(
            Goal(f"TTFT with a cached {m}-token soft prompt / bare", "<= 1.15", f"{ratio:.3f}", ratio <= 1.15)
        )
    return out


def render(
    args: argparse.Namespace,
    runner: ModelRunner,
    ids: list[int],
    samples: dict[str, list[float]],
    tokens: dict[str, set[int]],
    first_cold: dict[int, float],
) -> str:
    bare = statistics.median(samples["bare (engine)"])
    lines = [
        "# prefix TTFT: cached soft-prompt prefixes vs bare model vs naive prepending",
        "",
        hardware_line(runner),
        f"- one request at a time, input {len(ids)} tokens (chat-formatted question), first token only "
        "(greedy); prompt-tuning soft prompts of m = " + ", ".join(map(str, LENGTHS)) + " virtual tokens",
        f"- {args.reps} repetitions per row, all rows interleaved in rotating order; ratios are medians over "
        "bare (engine) from the same run",
        "- engine = enqueue -> first token event; cold = a new task version (KV prefix computed + prefill); "
        "naive prepend = HF forward over [soft prompt ; input] (m + n tokens) every request",
        "",
        "| run | median ms | p90 ms | median / bare (engine) | first tokens |",
        "|---|---:|---:|---:|---|",
    ]
    for name, xs in samples.items():
        med = statistics.median(xs)
        toks = ",".join(map(str, sorted(tokens[name])))
        lines.append(
            f"| {name} | {1e3 * med:.1f} | {1e3 * quantile(xs, 0.9):.1f} | {med / bare:.3f} | {toks} |"
        )
    lines.append("")
    lines.append(
        "very first request of each task (cold, before any warm-up): "
        + ", ".join(f"m={m}: {1e3 * t:.1f} ms" for m, t in first_cold.items())
    )
    lines.append("")
    verdicts = []
    for m in LENGTHS:
        cached = statistics.median(samples[f"m={m} engine, cached prefix"])
        naive = statistics.median(samples[f"m={m} naive prepend (HF forward)"])
        same = tokens[f"m={m} engine, cached prefix"] == tokens[f"m={m} naive prepend (HF forward)"]
        verdict = "met" if cached / bare <= 1.15 else "NOT met"
        verdicts.append(
            f"- m={m}: **cached / bare = {cached / bare:.3f}** (goal <= 1.15: {verdict}); "
            f"naive prepend / cached = {naive / cached:.2f}x; same first token as naive prepend: {same}"
        )
    lines += verdicts
    lines.append("")
    return "\n".join(lines)


def plot(samples: dict[str, list[float]], path: Path, runner: ModelRunner) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(samples)
    med = [1e3 * statistics.median(samples[n]) for n in names]
    p90 = [1e3 * quantile(samples[n], 0.9) for n in names]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.barh(names, med, color="tab:blue", label="median")
    ax.errorbar(
        med,
        names,
        xerr=[[0] * len(med), [p - m for p, m in zip(p90, med, strict=True)]],
        fmt="none",
        ecolor="black",
        capsize=3,
        label="p90",
    )
    ax.invert_yaxis()
    ax.set_xlabel("time to first token (ms)")
    ax.set_title(f"TTFT, {runner.name} on {runner.device}")
    ax.legend(loc="lower right")
    savefig(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
